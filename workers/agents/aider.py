"""aider (PyPI `aider-chat`): one `--message-file` turn, every question answered yes, no git.

The model is `openai/<model>` at `--openai-api-base` (litellm underneath); the workspace is
not a git repository aider may commit to (`--no-git`; the runner diffs the workspace
itself). aider has no step limit: one message is one turn of edits plus its reflections,
bounded by the runner's timeout. Its chat history (Markdown) is the transcript; the token
counts it prints there ("Tokens: 1.2k sent, 45 received.") are its reported usage, and its
LLM history file counts the calls (no token line follows a reply cut at the token limit).

Nothing but model calls leaves the sandbox: no analytics, no update check, and a model
metadata file for `openai/<model>`, without which aider downloads litellm's price list from
GitHub at start; `BROWSER=true` answers its "Open URL for more info?" (which `--yes-always`
accepts) without starting a browser.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from workers.agents.base import AgentOutcome, AgentRun, AgentUsage, read_output
from workers.agents.installed import InstalledAgent, exit_cause

CHAT_HISTORY = "aider.chat.history.md"
LLM_HISTORY = "aider.llm.history"
MODEL_METADATA = "aider.model.metadata.json"
MODEL_SETTINGS = "aider.model.settings.yml"
TOKENS = re.compile(r"Tokens: ([\d.]+)(k?) sent(?:,[^,\n]*?)*?, ([\d.]+)(k?) received")
LLM_RESPONSE = re.compile(r"^LLM RESPONSE ", re.MULTILINE)


@dataclass(frozen=True)
class AiderConfig:
    max_tokens: int | None = None
    """Completion length per call (the model's `extra_params`); None: the server's default."""


class AiderAgent(InstalledAgent):
    name = "aider"

    def __init__(self, root: Path | None = None, config: AiderConfig | None = None) -> None:
        super().__init__(root)
        self.config = config or AiderConfig()

    def command(self, run: AgentRun) -> list[str]:
        model = f"openai/{run.model}"
        # Known to aider, so it looks nothing up; prices are the proxy's business.
        prices = {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0}
        metadata = {model: {"litellm_provider": "openai", "mode": "chat", **prices}}
        (run.artifacts / MODEL_METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
        settings: dict[str, object] = {"name": model}
        if self.config.max_tokens is not None:
            settings["extra_params"] = {"max_tokens": self.config.max_tokens}
        # aider reads YAML, of which JSON is a subset.
        (run.artifacts / MODEL_SETTINGS).write_text(json.dumps([settings], indent=2) + "\n")
        return [
            *self.env_prefix(
                run,
                AIDER_ANALYTICS="false",
                LITELLM_LOCAL_MODEL_COST_MAP="True",
                BROWSER="true",
            ),
            str(self.program),
            "--model", model,
            "--openai-api-base", run.endpoint,
            "--message-file", str(run.artifacts / "prompt.txt"),
            "--yes-always",
            "--no-git",
            "--no-auto-commits",
            "--no-check-update",
            "--no-analytics",
            "--no-show-model-warnings",
            "--no-show-release-notes",
            "--no-pretty",
            "--no-fancy-input",
            "--no-detect-urls",
            "--map-tokens", "0",
            "--chat-history-file", str(run.artifacts / CHAT_HISTORY),
            "--input-history-file", str(run.artifacts / "aider.input.history"),
            "--llm-history-file", str(run.artifacts / LLM_HISTORY),
            "--model-metadata-file", str(run.artifacts / MODEL_METADATA),
            "--model-settings-file", str(run.artifacts / MODEL_SETTINGS),
        ]  # fmt: skip

    def collect(self, run: AgentRun, exit_code: int | None, timed_out: bool) -> AgentOutcome:
        transcript = run.artifacts / CHAT_HISTORY
        text = _read(transcript)
        usage = chat_usage(text)
        # A reply cut at the token limit has no token line; the LLM history has every call.
        usage.calls = max(
            usage.calls, len(LLM_RESPONSE.findall(_read(run.artifacts / LLM_HISTORY)))
        )
        log = _read(run.log) if run.log else ""
        return AgentOutcome(
            exit_cause=exit_cause(exit_code, timed_out, _errors(text + "\n" + log)),
            exit_code=exit_code,
            transcript=transcript,
            usage=usage,
            version=self.version(),
            detail=f"{usage.calls} model calls reported in {CHAT_HISTORY}"
            if text
            else f"no {CHAT_HISTORY}: aider ended before its first turn",
        )


def chat_usage(text: str) -> AgentUsage:
    """Calls and tokens from aider's "Tokens: … sent, … received." lines."""
    usage = AgentUsage()
    for sent, sent_k, received, received_k in TOKENS.findall(text):
        usage.calls += 1
        usage.prompt_tokens += round(float(sent) * (1000 if sent_k else 1))
        usage.completion_tokens += round(float(received) * (1000 if received_k else 1))
    return usage


def _errors(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "Error" in line or "402" in line)


def _read(path: Path) -> str:
    return read_output(path)
