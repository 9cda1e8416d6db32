"""Intake channels' configuration, and the task a GitHub issue asks for.

Each channel is off unless the intake file (`$AUTOVIBE_INTAKE_CONFIG`, YAML) has its section.
A channel runs what an issue or a message asks under a trial template the operator wrote: the
project, budget, agents and model pairs come from here, never from the person asking.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contracts.config import ConfigError, Currency, Slug, describe_errors, read_yaml

REPO_NAME = r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$"
TEMPLATE_OWNED = ("name", "tasks", "task_set")
"""Trial fields a channel fills in itself; a template that sets them is refused."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GithubRepo(_Strict):
    name: str = Field(pattern=REPO_NAME)
    """`owner/name` on GitHub."""
    clone_url: str | None = None
    """Where the task's repository is fetched from and the branch is pushed to; default
    `https://github.com/<name>.git` (a `file://` URL under the task roots in tests)."""

    @property
    def url(self) -> str:
        return self.clone_url or f"https://github.com/{self.name}.git"


class GithubIntake(_Strict):
    """The GitHub issue queue: issues labelled `label` in `repos` become trials."""

    repos: list[GithubRepo] = Field(min_length=1)
    trial: dict[str, Any]
    """The trial every issue runs under: TrialConfig fields except name and tasks (project,
    budget, agents, model_pairs, …)."""
    agent_command: list[str] | None = Field(default=None, min_length=1)
    """argv of the `command` agent for every issue's task, when the template runs it."""
    label: str = "autovibe"
    """Issues carrying this label are taken (adding a label needs triage rights on GitHub)."""
    api_url: str = "https://api.github.com"
    """REST API base URL (GitHub Enterprise: `https://HOST/api/v3`)."""
    token_secret: str = "intake/github/token"
    """Secret-store path of the token (issues, pull requests and contents: read and write)."""
    webhook_secret: str = "intake/github/webhook-secret"
    """Secret-store path of the webhook's shared secret (`POST /v1/intake/github`)."""
    poll_interval_s: float = Field(default=60, gt=0)
    """Seconds between polls (and between looks at the running trials)."""
    poll: bool = True
    """Whether `autovibe intake github` lists the issues itself (conditional requests), or
    only acts on what the webhook queued."""
    max_running: int = Field(default=1, ge=1)
    """Issues run at once; the others wait labelled `autovibe:queued`."""
    pull_requests: bool = True
    """Open a pull request from a branch for each accepted patch."""
    rate_floor: int = Field(default=50, ge=0)
    """Requests of the hourly allowance kept in hand: below it, calls wait for the reset."""


class ConciergeIntake(_Strict):
    """The concierge: a request in plain language becomes a draft trial, never submitted
    without the operator's confirmation."""

    pair: str = "tiny"
    """The model pair whose normal model writes the drafts (through the metering proxy)."""
    project: Slug = "concierge"
    """The project the concierge's own calls are charged to."""
    budget: Decimal = Field(default=Decimal("1"), ge=0)
    """What the concierge may spend per `period`, in `currency`."""
    currency: Currency = "CAD"
    period: Literal["daily", "weekly", "biweekly", "monthly", "once"] = "monthly"
    max_tokens: int = Field(default=700, ge=64, le=8192)
    """Output cap of one draft."""
    timeout_s: float = Field(default=180, gt=0)
    min_assignment_cost: Decimal = Field(default=Decimal("0.01"), ge=0)
    """Least a draft's budget must give each assignment (task × agent × model pair × runs),
    in the draft's currency; less is stated as an impossible budget."""


class TelegramIntake(_Strict):
    """The Telegram bot: operators on the allowlist run, follow, report and cancel trials."""

    allowed_users: list[int] = Field(min_length=1)
    """Telegram user ids that may use the bot; anyone else gets one refusal, audited."""
    token_secret: str = "intake/telegram/token"
    """Secret-store path of the bot token (from @BotFather)."""
    api_url: str = "https://api.telegram.org"
    """Bot API server (a local `telegram-bot-api` server, or a stand-in in tests)."""
    trials_dir: Path = Path("configs/trials")
    """`/run NAME` submits `<trials_dir>/NAME.yaml` (relative to the working directory)."""
    per_user_per_minute: int = Field(default=10, ge=1)
    overall_per_minute: int = Field(default=100, ge=1)
    poll_timeout_s: int = Field(default=25, ge=0, le=50)
    """getUpdates long-polling timeout."""


class IntakeConfig(_Strict):
    github: GithubIntake | None = None
    concierge: ConciergeIntake | None = None
    telegram: TelegramIntake | None = None


def load_intake(path: Path) -> IntakeConfig:
    """The intake file, or `ConfigError` naming each bad field by line."""
    data, lines = read_yaml(path)
    try:
        config = IntakeConfig.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(str(path), describe_errors(exc, lines)) from exc
    if config.github is not None:
        owned = [k for k in TEMPLATE_OWNED if k in config.github.trial]
        if owned:
            raise ConfigError(
                str(path),
                [f"github.trial.{k}: set by the intake from each issue, not here" for k in owned],
            )
    return config


class IssueTask(_Strict):
    """What an issue (or the repository's `.autovibe.yaml`) says about running the task."""

    test_command: str = Field(min_length=1)
    fail_to_pass: list[str] = Field(min_length=1)
    pass_to_pass: list[str] = Field(default_factory=list)
    timeout_s: int | None = Field(default=None, ge=1, le=7 * 24 * 3600)
    parser: str | None = None


_FENCE = re.compile(r"^```[ \t]*(autovibe|ya?ml)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


class IssueSpecError(Exception):
    """An issue's task block (or `.autovibe.yaml`) is missing or wrong; the message says how."""


def task_block(body: str) -> str | None:
    """The first fenced ```autovibe or ```yaml block of an issue body holding `test_command`."""
    for match in _FENCE.finditer(body.replace("\r\n", "\n")):
        if match[1] == "autovibe" or "test_command" in match[2]:
            return match[2]
    return None


def parse_issue_task(text: str, where: str) -> IssueTask:
    """`text` (YAML) as an IssueTask, or `IssueSpecError` naming each bad field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise IssueSpecError(f"{where}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise IssueSpecError(f"{where}: a YAML mapping (test_command, fail_to_pass, …)")
    try:
        return IssueTask.model_validate(data)
    except ValidationError as exc:
        raise IssueSpecError("; ".join(f"{where}: {p}" for p in describe_errors(exc))) from exc


__all__ = [
    "ConciergeIntake",
    "ConfigError",
    "GithubIntake",
    "GithubRepo",
    "IntakeConfig",
    "IssueSpecError",
    "IssueTask",
    "TelegramIntake",
    "load_intake",
    "parse_issue_task",
    "task_block",
]
