"""Agent adapters, picked by short name from the trial config."""

from __future__ import annotations

from pathlib import Path

from contracts.adapters import resolve
from contracts.providers import Wire
from workers.agents.base import Agent

# short name -> "module:Class"; imported only when used, so an agent's deps stay optional.
AGENTS: dict[str, str] = {
    "builtin": "workers.agents.builtin:BuiltinAgent",
    "mini-swe-agent": "workers.agents.mini_swe_agent:MiniSweAgent",
    "aider": "workers.agents.aider:AiderAgent",
    "claude-code": "workers.agents.claude_code:ClaudeCodeAgent",
    "qwen-code": "workers.agents.qwen_code:QwenCodeAgent",
    "cursor-cli": "workers.agents.cursor_cli:CursorCliAgent",
    "command": "workers.agents.command:CommandAgent",
}

VALIDATION_AGENTS: dict[str, str] = {
    "oracle": "workers.agents.oracle:OracleAgent",
    "empty": "workers.agents.oracle:EmptyAgent",
}
"""Agents only `autovibe tasks validate` runs: not in `AGENTS`, so no trial can name them (the
oracle applies the gold patch)."""

SPEAKS: dict[str, frozenset[Wire]] = {
    "builtin": frozenset({"openai"}),  # completions, or chat for a chat model
    "mini-swe-agent": frozenset({"openai"}),  # litellm `openai/<model>` at the base URL
    "aider": frozenset({"openai"}),
    "claude-code": frozenset({"anthropic"}),
    "qwen-code": frozenset({"openai"}),
    "cursor-cli": frozenset(),  # only Cursor's own service: it takes no base URL
    "command": frozenset({"openai", "anthropic"}),  # the task's program gets both base URLs
}
"""The wire formats each agent speaks; a trial pairing it with a model that speaks none of
them is refused at submission (the proxy does not translate)."""


def get_agent(name: str, root: Path | None = None) -> Agent:
    """The adapter for `name` (a short name only: a trial names it); every adapter is built
    with the data root `root` its install lives under (default: `Settings().data`).
    `contracts.adapters.UnknownAdapter` lists the allowed names."""
    registry = AGENTS | VALIDATION_AGENTS  # a trial's names were checked against AGENTS alone
    agent: Agent = resolve("agent", name, registry, dotted=False)(root=root)
    return agent
