"""An assignment's workspace: a private git copy of the task repo, and its patch against it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

# Never copied in, never part of a patch: the task's own history and what tools leave behind.
IGNORED = (".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.pyc")

_GIT = (
    "git",
    "-c",
    "user.name=autovibe",
    "-c",
    "user.email=autovibe@localhost",
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "commit.gpgsign=false",
)


class WorkspaceError(Exception):
    """A git command in the workspace failed; the message carries its output."""


def _git(workspace: Path, *args: str) -> str:
    proc = subprocess.run(
        [*_GIT, *args], cwd=workspace, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise WorkspaceError(
            f"git {' '.join(args)} failed in {workspace} (exit {proc.returncode}): "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout


def prepare(repo: Path, workspace: Path) -> None:
    """Copy `repo` into `workspace` (replacing a partial copy) and commit it as the baseline."""
    if not repo.is_dir():
        raise WorkspaceError(f"task repository {repo} is not a folder")
    if workspace.exists():
        shutil.rmtree(workspace)
    shutil.copytree(repo, workspace, ignore=shutil.ignore_patterns(*IGNORED), symlinks=True)
    _git(workspace, "init", "--quiet", "--initial-branch=baseline")
    # Keep caches out of the baseline and of every later patch, whatever the repo's own
    # .gitignore says.
    (workspace / ".git" / "info").mkdir(exist_ok=True)
    (workspace / ".git" / "info" / "exclude").write_text("\n".join(IGNORED[1:]) + "\n")
    _git(workspace, "add", "--all")
    _git(workspace, "commit", "--quiet", "--no-verify", "--allow-empty", "-m", "baseline")


def patch(workspace: Path) -> str:
    """Unified diff of everything changed in `workspace` since the baseline, new files included."""
    _git(workspace, "add", "--all")
    return _git(workspace, "diff", "--cached", "--binary", "HEAD")
