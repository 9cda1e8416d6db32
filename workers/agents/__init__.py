"""Agent adapters, picked by short name from the trial config."""

from __future__ import annotations

from importlib import import_module

from workers.agents.base import Agent

# short name -> "module:Class"; imported only when used, so an agent's deps stay optional.
AGENTS: dict[str, str] = {
    "builtin": "workers.agents.builtin:BuiltinAgent",
}


class UnknownAgent(KeyError):
    pass


def get_agent(name: str) -> Agent:
    try:
        module, cls = AGENTS[name].split(":")
    except KeyError as exc:
        raise UnknownAgent(f"unknown agent {name!r}; allowed: {', '.join(sorted(AGENTS))}") from exc
    agent: Agent = getattr(import_module(module), cls)()
    return agent
