"""What the agent adapter tests share: real installs into a data root, an AgentRun."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.agents import install
from workers.agents.base import AgentRun


def installed(name: str, root: Path) -> install.Installed:
    """Install `name` into `root` for real (fast on a warm uv/npm cache); FAIL if it cannot."""
    try:
        return install.install(name, root)
    except install.InstallError as exc:
        pytest.fail(f"installing {name} failed (CI reaches PyPI and npm):\n{exc}", pytrace=False)


def agent_run(workspace: Path, artifacts: Path, *, endpoint: str, timeout_s: int = 600) -> AgentRun:
    """An AgentRun with its artifacts folder ready, as the runner leaves it before `command()`."""
    run = AgentRun(
        workspace=workspace,
        prompt="Implement `add` in mathkit/basic.py so that tests/test_basic.py passes.",
        endpoint=endpoint,
        model="tiny",
        artifacts=artifacts,
        timeout_s=timeout_s,
    )
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "prompt.txt").write_text(run.prompt)
    return run
