"""The imported task sets under `$AUTOVIBE_DATA/tasks/<name>/`: written whole, read by name.

A set is written to a hidden folder beside its place and renamed in, so an import that fails
half-way leaves nothing; `validation.json` is replaced atomically. Trials name a set
(`tasks: {set: NAME, ids: [...]}` or `sample: N`); `TaskStore.select` expands the reference
into the set's tasks, leaving out those its validation found invalid.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from contracts.config import Task, TaskSetRef
from contracts.dataroot import DataRoot, atomic_write
from contracts.tasksets import SET_FILE, VALIDATION_FILE, SetValidation, TaskSet

RESERVED = ("mirrors", "trees", "sources")
"""Folders of `tasks/` that are not sets (`orchestrator.mirrors`, `orchestrator.harborimport`)."""


class TaskSetError(ValueError):
    """A set cannot be read, written or selected from; the message names it and why."""


@dataclass(frozen=True)
class TaskStore:
    root: DataRoot

    @property
    def folder(self) -> Path:
        return self.root.root / "tasks"

    def path(self, name: str) -> Path:
        if name in RESERVED:
            raise TaskSetError(f"{name!r} is a folder of the task store, not a set name")
        return self.folder / name

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        found = (p.parent.name for p in self.folder.glob(f"*/{SET_FILE}"))
        return sorted(n for n in found if not n.startswith("."))  # not a write under way

    def load(self, name: str) -> TaskSet:
        path = self.path(name) / SET_FILE
        try:
            return TaskSet.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            known = ", ".join(self.names()) or "none"
            raise TaskSetError(f"no task set {name!r} (imported: {known})") from None
        except ValidationError as exc:
            raise TaskSetError(f"{path} is not a task set: {exc}") from None

    def validation(self, name: str) -> SetValidation | None:
        path = self.path(name) / VALIDATION_FILE
        if not path.exists():
            return None
        return SetValidation.model_validate_json(path.read_bytes())

    def write(self, taskset: TaskSet, *, replace: bool = False) -> Path:
        """Write `taskset` whole (its earlier validation is dropped with it when replaced)."""
        dest = self.path(taskset.name)
        if dest.exists() and not replace:
            raise TaskSetError(f"task set {taskset.name!r} exists (--replace to import it again)")
        DataRoot.ensure(self.folder)
        partial = Path(tempfile.mkdtemp(prefix=f".{taskset.name}.", dir=self.folder))
        old = None
        try:
            atomic_write(partial / SET_FILE, taskset.model_dump_json(indent=2))
            if dest.exists():
                old = dest.with_name(f"{partial.name}.old")
                os.replace(dest, old)
            os.replace(partial, dest)
        finally:
            if partial.exists():
                shutil.rmtree(partial)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return dest

    def record(self, name: str, validation: SetValidation) -> Path:
        path = self.path(name) / VALIDATION_FILE
        atomic_write(path, validation.model_dump_json(indent=2))
        return path

    def select(self, ref: TaskSetRef, seed: int) -> list[Task]:
        """The tasks `ref` names (all the valid ones without `ids` or `sample`), as copies;
        TaskSetError naming each task that is not in the set or is invalid, and why."""
        taskset = self.load(ref.set)
        validation = None
        with contextlib.suppress(OSError, ValidationError):
            validation = self.validation(ref.set)
        invalid = validation.invalid() if validation is not None else {}
        if ref.ids is not None:
            problems = []
            for task_id in ref.ids:
                if taskset.entry(task_id) is None:
                    problems.append(f"{task_id}: not in the set")
                elif task_id in invalid:
                    problems.append(f"{task_id}: invalid ({invalid[task_id]})")
            if problems:
                raise TaskSetError(f"task set {ref.set!r}: {'; '.join(problems)}")
            chosen = [e.task for e in taskset.entries if e.task.id in ref.ids]
        else:
            chosen = [e.task for e in taskset.entries if e.task.id not in invalid]
            if ref.sample is not None:
                if ref.sample > len(chosen):
                    raise TaskSetError(
                        f"task set {ref.set!r} has {len(chosen)} valid tasks, fewer than "
                        f"sample: {ref.sample}"
                    )
                drawn = set(random.Random(seed).sample([t.id for t in chosen], ref.sample))
                chosen = [t for t in chosen if t.id in drawn]
            if not chosen:
                raise TaskSetError(f"task set {ref.set!r} has no valid task")
        return [t.model_copy(deep=True) for t in chosen]
