"""The runner's `result.json` as the orchestrator reads it back: a model, never a dict read by key.

The runner writes one of two shapes (`workers.runner`): a run that ended (its agent outcome,
its grade, where its patch and report are) or the runner's own failure (`infra_error`). The
file lies in the host-only artifacts folder, but it is still read as untrusted: never through a
symlink, at most `LIMIT` bytes, and nothing the runner does not write (a `confidence`, a
`cancelled`) is accepted from it; a cancel is the orchestrator's own decision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from contracts.dataroot import read_untrusted
from workers.agents.base import ExitCause
from workers.grading import GradeStatus

LIMIT = 16 * 1024 * 1024
"""Most bytes read of a result.json; a larger one is cut short and so fails to parse."""


class AgentResult(BaseModel):
    """`AgentOutcome.to_json()`: what the scheduler reads of it is typed, the rest is kept."""

    model_config = ConfigDict(extra="allow")
    exit_cause: ExitCause
    exit_code: int | None = None
    detail: str = ""


class GradeResult(BaseModel):
    """`GradeReport.to_json()`: what the scheduler reads of it is typed, the rest is kept."""

    model_config = ConfigDict(extra="allow")
    status: GradeStatus
    fail_to_pass: dict[str, str] = {}
    pass_to_pass: dict[str, str] = {}
    tests_tampered: bool = False


class RunnerResult(BaseModel):
    """One runner's ending: `agent` and `grade`, or `infra_error`."""

    model_config = ConfigDict(extra="forbid")
    assignment: str
    started: float | None = None
    finished: float | None = None
    wall_s: float | None = None
    agent: AgentResult | None = None
    grade: GradeResult | None = None
    patch: str | None = None
    """Where the runner wrote the patch; informative only: readers take the data root's
    `patch.diff` of the assignment, never a path from this file."""
    report: str | None = None
    infra_error: str | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> RunnerResult:
        if self.infra_error is None and (self.agent is None or self.grade is None):
            raise ValueError("a result needs `agent` and `grade`, or `infra_error`")
        return self

    def to_json(self) -> dict[str, Any]:
        """The fields the runner wrote, as the state DB stores them."""
        return self.model_dump(mode="json", exclude_unset=True)


def read_result(path: Path, assignment: str) -> RunnerResult:
    """The result.json at `path` for `assignment`; `OSError` (a symlink, not a regular file)
    or `ValueError` (malformed, not this assignment's) with the reason."""
    result = RunnerResult.model_validate_json(read_untrusted(path, path.parent, LIMIT))
    if result.assignment != assignment:
        raise ValueError(f"it is assignment {result.assignment!r}'s, not {assignment!r}'s")
    return result


def read_patch(artifacts: Path) -> str:
    """The patch the runner wrote in an assignment's folder (`DataRoot.assignment_dir`), ""
    when there is none; never read through a symlink, never from a path a result names."""
    try:
        return read_untrusted(artifacts / "patch.diff", artifacts, LIMIT).decode(errors="replace")
    except OSError:
        return ""
