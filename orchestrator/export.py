"""Export of a trial's accepted results: one patch file per assignment, or one git branch each.

A result is exported when the confidence gate accepted it (`result.confidence.accepted`; for
results scored before the gate existed, or with it switched off: when resolved); results
flagged for review only when asked. A patch is relative to the task's repository folder, so
`git apply --check` takes it there. A branch is made in a given repository at the task's base
commit (the HEAD of the task's checkout; for a task folder that is no repository of its own,
the given repository's HEAD) with the patch committed on top, without touching that
repository's working tree, index or HEAD.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy import select

from contracts.dataroot import DataRoot
from orchestrator.state import Assignment, Store, Trial, stored_config
from workers.result import read_patch
from workers.workspace import WorkspaceError, git


@dataclass(frozen=True)
class Exported:
    assignment: str
    task: str
    outcome: Literal["patch", "branch", "skipped"]
    detail: str
    """The patch file, the branch name, or why it was skipped."""
    confidence: float | None = None
    accepted: bool | None = None


@dataclass(frozen=True)
class _Candidate:
    assignment: str
    task: str
    repo: Path | str
    """The task's repository: a folder, or a git URL whose pinned commit is the base."""
    commit: str | None
    patch: str
    confidence: float | None
    accepted: bool


def export_trial(
    store: Store,
    root: DataRoot,
    trial_id: str,
    out: Path,
    *,
    branch: str | None = None,
    repo: Path | None = None,
    include_review: bool = False,
) -> list[Exported]:
    """Write `<assignment>.patch` into `out` for each exported result and, with `branch` and
    `repo`, a branch `<branch>/<assignment>` in `repo`; `out/export.json` lists what was done."""
    if (branch is None) != (repo is None):
        raise ValueError("--branch and --repo go together")
    out.mkdir(parents=True, exist_ok=True)
    done: list[Exported] = []
    for c in _candidates(store, root, trial_id):
        if not c.accepted and not include_review:
            continue
        if not c.patch.strip():
            done.append(
                Exported(c.assignment, c.task, "skipped", "empty patch", c.confidence, c.accepted)
            )
            continue
        path = out / f"{c.assignment}.patch"
        path.write_text(c.patch)
        done.append(Exported(c.assignment, c.task, "patch", str(path), c.confidence, c.accepted))
        if branch is not None and repo is not None:
            try:
                name = make_branch(repo, f"{branch}/{c.assignment}", c, path, trial_id)
                done.append(
                    Exported(c.assignment, c.task, "branch", name, c.confidence, c.accepted)
                )
            except WorkspaceError as exc:
                done.append(
                    Exported(c.assignment, c.task, "skipped", str(exc), c.confidence, c.accepted)
                )
    (out / "export.json").write_text(json.dumps([asdict(e) for e in done], indent=2) + "\n")
    return done


def _candidates(store: Store, root: DataRoot, trial_id: str) -> list[_Candidate]:
    with store.session() as s:
        trial = s.get(Trial, trial_id)
        if trial is None:
            raise LookupError(f"no trial {trial_id}")
        config = stored_config(trial.config)
        rows = list(
            s.scalars(
                select(Assignment)
                .where(Assignment.trial_id == trial_id, Assignment.state == "finished")
                .order_by(Assignment.index)
            )
        )
    tasks = {t.id: t for t in config.tasks}
    out = []
    for a in rows:
        gate = a.ending.confidence
        accepted = bool(gate.accepted) if gate is not None else a.status == "resolved"
        # The data root's own patch.diff: a path written in the result is never read.
        patch = read_patch(root.assignment_dir(config.project, trial_id, a.id))
        out.append(
            _Candidate(
                assignment=a.id,
                task=a.task_id,
                repo=tasks[a.task_id].repo,
                commit=tasks[a.task_id].commit,
                patch=patch,
                confidence=gate.score if gate is not None else None,
                accepted=accepted,
            )
        )
    return out


def make_branch(repo: Path, name: str, c: _Candidate, patch: Path, trial_id: str) -> str:
    """Branch `name` in `repo`: the task's base commit plus the patch, as one commit."""
    git(repo, "check-ref-format", "--branch", name)
    base = _base_commit(repo, c.repo, c.commit)
    with tempfile.TemporaryDirectory() as tmp:
        # A private index: the repository's own index and working tree are never touched.
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        git(repo, "read-tree", base, env=env)
        git(repo, "apply", "--cached", "--binary", str(patch), env=env)
        tree = git(repo, "write-tree", env=env).strip()
    message = f"autovibe: {c.task} by assignment {c.assignment}\n\nTrial: {trial_id}\n"
    if c.confidence is not None:
        message += f"Confidence: {c.confidence}\n"
    ref = f"refs/heads/{name}"
    existing = git(repo, "for-each-ref", "--format=%(objectname)", ref).strip()
    if existing:
        if git(repo, "rev-parse", f"{existing}^{{tree}}").strip() == tree:
            return name  # exported before: the same change
        raise WorkspaceError(f"branch {name} exists in {repo} with another change")
    commit = git(repo, "commit-tree", tree, "-p", base, "-m", message).strip()
    git(repo, "update-ref", ref, commit, "")
    return name


def _base_commit(repo: Path, task_repo: Path | str, commit: str | None) -> str:
    """The task's pinned commit (a repo named by URL), the task checkout's HEAD when the task
    folder is a repository, else `repo`'s HEAD."""
    if commit is not None:
        base = commit
    elif isinstance(task_repo, str) or not (task_repo / ".git").exists():
        return git(repo, "rev-parse", "HEAD").strip()
    else:
        base = git(task_repo, "rev-parse", "HEAD").strip()
    try:
        git(repo, "cat-file", "-e", f"{base}^{{commit}}")
    except WorkspaceError as exc:
        raise WorkspaceError(
            f"the task's base commit {base} is not in {repo}: export into the task's own repository"
        ) from exc
    return base
