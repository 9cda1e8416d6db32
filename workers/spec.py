"""What the orchestrator hands a worker: one assignment, self-contained, as JSON on disk."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel


class AssignmentSpec(BaseModel):
    assignment: str
    project: str
    trial: str
    machine: str
    task_id: str
    repo: Path
    prompt: str
    """Full prompt, budget preamble first."""
    test_command: str
    fail_to_pass: list[str]
    pass_to_pass: list[str]
    timeout_s: int
    agent: str
    model: str
    endpoint: str
    env: dict[str, str]
    """Worker environment: proxy with machine credential, CA bundle, model endpoint."""
    artifacts: Path
    """The assignment's folder under worker-artifacts/<project>/<trial>/<assignment>/."""

    @property
    def workspace(self) -> Path:
        return self.artifacts / "workspace"

    @property
    def result_path(self) -> Path:
        return self.artifacts / "result.json"

    @property
    def lock_path(self) -> Path:
        return self.artifacts / "runner.lock"
