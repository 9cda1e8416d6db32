"""What every agent installed into the data root shares: its folder, version and sandbox view.

An adapter of an installed agent says how to start the program (`command`) and how to read
what it left (`collect`); its environment is set on the command line (`env K=V … program`),
so the argv alone tells an operator exactly what ran. HOME is the assignment's `home/`
folder: agents write their settings and caches there, and the host's HOME is read-only in
the sandbox.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workers.agents import install
from workers.agents.base import AgentRun, AgentUsage, ExitCause, read_output

BUDGET_MARKERS = ("402", "Payment Required", "no_budget", "budget_exhausted")
"""What the proxy's refusal looks like in an agent's error text."""


class InstalledAgent:
    """Base of the adapters whose agent lives in `<data>/agents/<name>/`."""

    name = ""

    def __init__(self, root: Path | None = None) -> None:
        self.root = install.data_root(root)

    @property
    def program(self) -> Path:
        return install.executable(self.name, self.root)

    def version(self) -> str:
        found = install.read_installed(self.name, self.root)
        return found.version if found else "unknown"

    def read_only_paths(self, root: Path) -> list[Path]:
        """The install folder, shown read-only in the sandbox that hides the data root."""
        return [install.agent_dir(self.name, root)]

    def home(self, run: AgentRun) -> Path:
        """The agent's HOME, created here: some agents fail on a HOME that does not exist."""
        home = run.artifacts / "home"
        home.mkdir(parents=True, exist_ok=True)
        return home

    def env_prefix(self, run: AgentRun, **env: str) -> list[str]:
        """`env HOME=… K=V …`: the agent's own settings, on top of the worker's environment."""
        pairs = {"HOME": str(self.home(run)), **env}
        return ["env", *(f"{k}={v}" for k, v in pairs.items())]


def exit_cause(exit_code: int | None, timed_out: bool, error_text: str = "") -> ExitCause:
    """The runner's view first (timeout), then a 402 in the agent's words, then the exit code."""
    if timed_out:
        return "timeout"
    if error_text and any(m in error_text for m in BUDGET_MARKERS):
        return "budget_exhausted"
    if exit_code != 0:
        return "crashed"
    return "finished"


def json_events(path: Path) -> list[dict[str, Any]]:
    """JSON objects in a file that holds one object or one per line (stream-json), in order.

    Lines that are not JSON objects (a banner, a line cut short by a kill) are left out.
    """
    text = read_output(path)
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        return [whole]
    if isinstance(whole, list):
        return [e for e in whole if isinstance(e, dict)]
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def add_usage(usage: AgentUsage, reported: object) -> None:
    """Add one call's usage, in OpenAI (`prompt_tokens`) or Anthropic (`input_tokens`) terms."""
    if not isinstance(reported, dict):
        return
    usage.prompt_tokens += int(
        reported.get("prompt_tokens")
        or (reported.get("input_tokens") or 0)
        + (reported.get("cache_read_input_tokens") or 0)
        + (reported.get("cache_creation_input_tokens") or 0)
    )
    usage.completion_tokens += int(
        reported.get("completion_tokens") or reported.get("output_tokens") or 0
    )
