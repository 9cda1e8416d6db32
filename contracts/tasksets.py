"""An imported task set as stored under `$AUTOVIBE_DATA/tasks/<name>/`, and its validation.

`set.json` holds the tasks as trials run them (`contracts.config.Task`, the repository named
by URL and pinned to its base commit) with what only validation may see: the gold patch, or a
Harbor task's `solution/` files.
`validation.json` holds the verdict of `autovibe tasks validate` for every task.
"""

from __future__ import annotations

import datetime
from typing import Literal

from pydantic import BaseModel, Field

from contracts.config import Slug, Task

SET_FILE = "set.json"
VALIDATION_FILE = "validation.json"


class TaskSetEntry(BaseModel):
    task: Task
    """The task as a trial runs it; `task.id` is the instance id made a slug."""
    instance_id: str
    """As in the imported file."""
    repo_name: str
    """`owner/name` as in the file (SWE-bench's `repo`)."""
    gold_patch: str = ""
    """The reference solution (SWE-bench's `patch`): applied by the oracle agent in validation
    only, never shown to a trial's agent (the data root is hidden from the sandbox)."""
    version: str | None = None
    environment_setup_commit: str | None = None
    solution: dict[str, str] = Field(default_factory=dict)
    """A Harbor task's reference solution: its `solution/` files by relative path
    (`solve.sh` first of all), which the oracle runs in validation only."""


class TaskSet(BaseModel):
    name: Slug
    kind: Literal["swebench", "harbor"]
    source: str
    """The file it was imported from."""
    imported_at: datetime.datetime
    entries: list[TaskSetEntry] = Field(min_length=1)

    def entry(self, task_id: str) -> TaskSetEntry | None:
        return next((e for e in self.entries if e.task.id == task_id), None)


AgentVerdict = Literal["oracle", "empty"]


class TaskVerdict(BaseModel):
    task: str
    """The task's id."""
    valid: bool
    reason: str = ""
    """Why it is invalid: what the oracle or the empty agent got, in words."""
    oracle: str
    """The oracle's grade (`resolved`, `partial`, `unresolved`, `error`)."""
    empty: str
    """The empty agent's grade."""
    wall_s: float = 0


class SetValidation(BaseModel):
    validated_at: datetime.datetime
    verdicts: list[TaskVerdict]

    def invalid(self) -> dict[str, str]:
        """Task id -> why it is invalid."""
        return {v.task: v.reason for v in self.verdicts if not v.valid}
