"""The concierge: a request in plain language becomes a draft trial for the operator to confirm.

The model plane writes the draft with its output constrained to a JSON Schema (llama.cpp's
`response_format: {"type": "json_object", "schema": …}`, turned into a grammar): the trial's
required fields, with the agents, model pairs, currencies, task folders and task sets this
server knows as enums, so even the tiny model writes a draft that parses and names only what
exists. Names the request gives that are no agent go into `unknown_agents`. The draft is then
validated against `TrialConfig` with the server's limits, and what would stop it is stated as a
problem (an unknown or uninstalled agent, an impossible budget, any invalid field); nothing is
submitted here.

The concierge's own calls go through the metering proxy with a machine credential of its
project (`concierge.project`, machine `concierge`), whose budget scopes and ledger it opens:
they are priced, reserved, settled, spooled and posted like any worker's.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field, ValidationError

from budget.scopes import open_project
from contracts.config import TrialConfig, describe_errors
from contracts.credentials import MachineIdentity, mint, proxy_url, revoke
from contracts.intake import ConciergeIntake
from orchestrator.platform import Platform
from orchestrator.taskstore import RESERVED, TaskStore
from workers.agents import AGENTS, SPEAKS
from workers.agents import install as agent_install

MACHINE = "concierge"
HARNESS_AGENTS = frozenset({"command"})
"""Agents a draft never names: `command` runs a program the trial gives, not a coding agent."""
_MONEY = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*([A-Z]{3})\b")
SLUG = "^[a-z][a-z0-9-]{2,30}$"
REQUIRED = ("name", "project", "budget", "agents", "unknown_agents", "model_pairs", "tasks")
"""Every field of a draft is written, so the grammar leaves the model no way to stop early."""


class ConciergeUnavailable(Exception):
    """No draft could be written: the proxy or the model plane did not answer, or the
    concierge's budget refused the call (the message says which)."""


class ConciergeDraft(BaseModel):
    """What `POST /v1/concierge` answers: the draft, and what stands in its way."""

    request: str
    draft: dict[str, Any]
    """The trial as drafted (TrialConfig fields; submit it as it is once `valid`)."""
    problems: list[str]
    """What would stop the trial, each naming the field: empty when `valid`."""
    notes: list[str] = []
    """What was changed in the model's draft, and why (the request's own budget, repeats)."""
    valid: bool
    tokens: int = 0
    """Prompt and answer tokens the model plane reported for this draft (metered)."""


@dataclass(frozen=True)
class Choices:
    """What a draft may name on this server."""

    agents: list[str]
    pairs: list[str]
    currencies: list[str]
    repos: list[str]
    """Task folders: each folder directly under a task root."""
    task_sets: list[str]


def choices_for(platform: Platform) -> Choices:
    roots = platform.settings.allowed_task_roots
    private = set(platform.settings.private_task_folders)
    repos = sorted(
        str(folder)
        for root in roots
        if root.is_dir()
        for folder in root.iterdir()
        if folder.is_dir() and not folder.name.startswith(".") and folder.resolve() not in private
    )
    sets = TaskStore(platform.root)
    # The data root's tasks/ holds imported sets and the mirrors' own folders: not repositories.
    not_repos = {str((sets.folder / name).resolve()) for name in (*RESERVED, *sets.names())}
    cpu_pairs = [n for n, p in platform.catalog.models.pairs.items() if p.device == "cpu"]
    runnable = [
        name
        for name in sorted(AGENTS)
        if name not in HARNESS_AGENTS
        and SPEAKS.get(name)
        and agent_install.is_installed(name, platform.root.root)
    ]
    return Choices(
        agents=runnable,
        pairs=sorted(cpu_pairs),
        currencies=sorted(platform.catalog.prices.fx),
        repos=[r for r in repos if r not in not_repos],
        task_sets=sets.names(),
    )


def draft_schema(choices: Choices) -> dict[str, Any]:
    """The JSON Schema the model's answer must satisfy: TrialConfig's required fields, with
    what exists here as enums and every free text bounded, so the answer always ends."""
    text = {"type": "string", "minLength": 1, "maxLength": 100}
    task = {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": SLUG},
            "repo": {"enum": choices.repos},
            "prompt": text,
            "test_command": text,
            "fail_to_pass": {"type": "array", "items": text, "minItems": 1, "maxItems": 6},
        },
        "required": ["id", "repo", "prompt", "test_command", "fail_to_pass"],
        "additionalProperties": False,
    }
    tasks: dict[str, Any] = {"type": "array", "items": task, "minItems": 1, "maxItems": 4}
    if choices.task_sets:
        from_set = {
            "type": "object",
            "properties": {
                "set": {"enum": choices.task_sets},
                "sample": {"type": "integer", "minimum": 1, "maximum": 100},
            },
            "required": ["set"],
            "additionalProperties": False,
        }
        tasks = {"anyOf": [tasks, from_set]} if choices.repos else from_set
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": SLUG},
            "project": {"type": "string", "pattern": SLUG},
            "budget": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number"},
                    "currency": {"enum": choices.currencies},
                },
                "required": ["amount", "currency"],
                "additionalProperties": False,
            },
            "agents": {
                "type": "array",
                "items": {"enum": choices.agents},
                "minItems": 1,
                "maxItems": 4,
            },
            "unknown_agents": {
                "type": "array",
                "items": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,40}$"},
                "maxItems": 4,
            },
            "model_pairs": {
                "type": "array",
                "items": {"enum": choices.pairs},
                "minItems": 1,
                "maxItems": 4,
            },
            "tasks": tasks,
        },
        "required": [*REQUIRED],
        "additionalProperties": False,
    }


def instructions(choices: Choices) -> str:
    """The system message: the job, and what exists."""
    return (
        "You turn an operator's request into a draft trial for autovibe, which runs coding "
        "agents on tasks and compares them. Answer with one JSON object only.\n"
        f"Agents: {', '.join(choices.agents)}. Any agent the request names that is not in "
        "this list goes into unknown_agents, spelled as in the request; name each once.\n"
        f"Model pairs: {', '.join(choices.pairs)}.\n"
        f"Currencies: {', '.join(choices.currencies)}; the budget is the most the request "
        "allows to spend (amount and currency as it says them).\n"
        f"Task folders: {', '.join(choices.repos) or 'none'}.\n"
        f"Task sets: {', '.join(choices.task_sets) or 'none'}.\n"
        "Use python -m pytest -q as test_command unless the request says otherwise."
    )


def review(
    request: str,
    answer: str,
    platform: Platform,
    config: ConciergeIntake,
    tokens: int = 0,
) -> ConciergeDraft:
    """The model's `answer` as a draft, with every problem that would stop it stated."""
    try:
        draft = json.loads(answer)
    except ValueError as exc:
        return ConciergeDraft(
            request=request, draft={}, problems=[f"the model's answer is not JSON: {exc}"],
            valid=False, tokens=tokens,
        )  # fmt: skip
    if not isinstance(draft, dict):
        draft = {}
    notes = _tidy(request, draft)
    problems = []
    choices = choices_for(platform)
    other_names = {
        *(r.rsplit("/", 1)[-1] for r in choices.repos),
        *choices.task_sets,
        *choices.pairs,
    }
    for name in draft.pop("unknown_agents", None) or []:
        if name in draft.get("agents", []):
            continue  # the model listed it twice
        if name in other_names or name.lower() not in request.lower():
            # A small model's slip: a task folder, set or pair, or a name never asked for.
            notes.append(f"unknown_agents: {name!r} dropped: not an agent the request names")
            continue
        if name in AGENTS:
            problems.append(f"agents: {agent_install.install_hint(name)}")
        else:
            known = ", ".join(sorted(set(AGENTS) - HARNESS_AGENTS))
            problems.append(f"agents: unknown agent {name!r}; known: {known}")
    try:
        trial = TrialConfig.model_validate(draft, context=platform.catalog.validation_context())
    except ValidationError as exc:
        problems += describe_errors(exc)
        trial = None
    problems += _budget_problems(draft, trial, config)
    if trial is not None:
        problems += [
            f"agents.{i}: {agent_install.install_hint(name)}"
            for i, name in enumerate(trial.agents)
            if not agent_install.is_installed(name, platform.root.root)
        ]
    return ConciergeDraft(
        request=request, draft=draft, problems=problems, notes=notes, valid=not problems,
        tokens=tokens,
    )  # fmt: skip


def _tidy(request: str, draft: dict[str, Any]) -> list[str]:
    """Naive fixes a small model needs, each noted: a list's repeats dropped (a grammar cannot
    forbid them), and the budget the request states in so many words (`5 CAD`) kept over the
    model's figure."""
    notes = []
    for key in ("agents", "model_pairs", "unknown_agents"):
        items = draft.get(key)
        if isinstance(items, list) and len(set(map(str, items))) < len(items):
            draft[key] = list(dict.fromkeys(items))
            notes.append(f"{key}: repeats dropped")
    stated = {(Decimal(n), c) for n, c in _MONEY.findall(request)}
    budget = draft.get("budget")
    if len(stated) == 1 and isinstance(budget, dict):
        ((amount, currency),) = stated
        written = (budget.get("amount"), budget.get("currency"))
        try:
            same = Decimal(str(written[0])) == amount and written[1] == currency
        except InvalidOperation:
            same = False
        if not same:
            draft["budget"] = {**budget, "amount": str(amount), "currency": currency}
            notes.append(
                f"budget: {amount} {currency} as the request says (the model wrote "
                f"{written[0]} {written[1]})"
            )
    return notes


def _budget_problems(
    draft: dict[str, Any], trial: TrialConfig | None, config: ConciergeIntake
) -> list[str]:
    budget = draft.get("budget")
    if not isinstance(budget, dict):
        return []  # named by the validation already
    try:
        amount = Decimal(str(budget.get("amount")))
    except InvalidOperation:
        return []  # named by the validation already
    currency = budget.get("currency", "")
    if amount <= 0:
        return [f"budget.amount: impossible budget: {amount} {currency} pays for no call"]
    if trial is None:
        return []
    tasks = len(trial.tasks)
    runs = tasks * len(trial.agents) * len(trial.model_pairs) * trial.assignment.trials_per_task
    least = config.min_assignment_cost * runs
    if amount < least:
        return [
            f"budget.amount: impossible budget: {amount} {currency} for {runs} assignments "
            f"({tasks} tasks × {len(trial.agents)} agents × {len(trial.model_pairs)} pairs) "
            f"is under the least they cost ({config.min_assignment_cost} each, {least})"
        ]
    return []


class Concierge:
    """Drafts trials with the model plane, through the metering proxy."""

    def __init__(self, platform: Platform, config: ConciergeIntake) -> None:
        self.platform = platform
        self.config = config

    def draft(self, request: str) -> ConciergeDraft:
        choices = choices_for(self.platform)
        messages = [
            {"role": "system", "content": instructions(choices)},
            {"role": "user", "content": request},
        ]
        answer, tokens = self.ask(messages, draft_schema(choices))
        return review(request, answer, self.platform, self.config, tokens)

    def ask(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> tuple[str, int]:
        """The model's answer and the tokens reported, through the proxy as project
        `concierge.project`, machine `concierge`; `ConciergeUnavailable` when it fails."""
        settings = self.platform.settings
        assignment = f"concierge-{secrets.token_hex(6)}"
        self._open_budget()
        identity = MachineIdentity(
            project=self.config.project,
            trial="concierge",
            assignment=assignment,
            machine=MACHINE,
            expires=time.time() + self.config.timeout_s + 60,
        )
        token = mint(self.platform.credential_key, identity)
        proxy = proxy_url(settings.host, settings.proxy_port, MACHINE, token)
        body = {
            "model": self.config.pair,
            "messages": messages,
            "max_tokens": self.config.max_tokens,
            "temperature": 0,
            "response_format": {"type": "json_object", "schema": schema},
        }
        url = f"{settings.model_url}/chat/completions"
        try:
            with httpx.Client(proxy=proxy, trust_env=False, timeout=self.config.timeout_s) as http:
                resp = http.post(url, json=body)
        except httpx.HTTPError as exc:
            raise ConciergeUnavailable(f"{url} through the proxy: {exc}") from exc
        finally:
            revoke(self.platform.root, assignment)
        if resp.status_code == 402:
            raise ConciergeUnavailable(f"the concierge's budget refused the call: {resp.text}")
        if not resp.is_success:
            raise ConciergeUnavailable(f"{url}: HTTP {resp.status_code}: {resp.text[:300]}")
        try:
            data = resp.json()
            text = str(data["choices"][0]["message"]["content"])
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ConciergeUnavailable(f"{url}: not a chat completion: {resp.text[:300]}") from exc
        return text, int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))

    def _open_budget(self) -> None:
        """The concierge's project: its budget scopes (the proxy charges them) and its ledger
        (usage is posted there hourly), opened idempotently."""
        c = self.config
        counters = self.platform.counters()
        try:
            open_project(
                counters, c.project, [MACHINE], amount=c.budget, daily_allowance=c.budget,
                currency=c.currency, period=c.period, now=time.time(),
            )  # fmt: skip
        finally:
            counters.close()
        self.platform.ledger(c.project).open(
            c.project, c.budget, c.currency, self.platform.catalog.prices.fx, dt.date.today(),
            funding="concierge",
        )  # fmt: skip


class ConciergeRequest(BaseModel):
    request: str = Field(min_length=1, max_length=4000)
    """What the operator wants, in plain language."""


def router(platform: Platform, config: ConciergeIntake | None) -> APIRouter:
    """`POST /v1/concierge`: a request → a draft with its problems (never submitted)."""
    api = APIRouter()

    @api.post("/v1/concierge")
    def concierge(body: ConciergeRequest) -> ConciergeDraft:
        if config is None:
            raise HTTPException(404, "the concierge is not configured (AUTOVIBE_INTAKE_CONFIG)")
        try:
            return Concierge(platform, config).draft(body.request)
        except ConciergeUnavailable as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "30"}) from exc

    return api
