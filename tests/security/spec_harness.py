"""A whole AssignmentSpec for the tests that read or drive one without running its agent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workers.spec import AssignmentSpec


def plain_spec(assignment: str, artifacts: Path, repo: Path, **fields: Any) -> AssignmentSpec:
    """Assignment `assignment` of project p1 (trial t1, machine m1, agent builtin, model tiny)
    in `artifacts`; `fields` override any of it."""
    values: dict[str, Any] = {
        "assignment": assignment,
        "project": "p1",
        "trial": "t1",
        "machine": "m1",
        "task_id": "fix-f",
        "repo": repo,
        "prompt": "Implement f.",
        "test_command": "python -m pytest -q",
        "fail_to_pass": [],
        "pass_to_pass": [],
        "timeout_s": 60,
        "agent": "builtin",
        "model": "tiny",
        "endpoint": "http://127.0.0.1:9/v1",
        "env": {},
        "artifacts": artifacts,
    }
    return AssignmentSpec.model_validate(values | fields)
