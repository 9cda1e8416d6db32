"""Agent adapters, picked by short name from the trial config."""

from __future__ import annotations

import inspect
from importlib import import_module
from pathlib import Path

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


class UnknownAgent(KeyError):
    pass


def get_agent(name: str, root: Path | None = None) -> Agent:
    """The adapter for `name`; installed agents are looked up under data root `root`
    (default: `Settings().data`)."""
    try:
        module, cls = AGENTS[name].split(":")
    except KeyError as exc:
        raise UnknownAgent(f"unknown agent {name!r}; allowed: {', '.join(sorted(AGENTS))}") from exc
    factory = getattr(import_module(module), cls)
    # Adapters of installed agents find their install under the data root; others need nothing.
    takes_root = "root" in inspect.signature(factory).parameters
    agent: Agent = factory(root=root) if takes_root else factory()
    return agent
