"""An assignment's workspace: a private git copy of the task repo, and its patch against it.

A task pinned to a commit (SWE-bench's `base_commit`) is first checked out at that commit with
`checkout`; the workspace is then a copy of that checkout like of any other folder.
"""

from __future__ import annotations

import os
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


def git(workspace: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Output of a git command run in `workspace` as autovibe (no hooks, no signing); raises
    WorkspaceError with git's message. `env`: variables added to this process's environment."""
    proc = subprocess.run(
        [*_GIT, *args],
        cwd=workspace,
        capture_output=True,
        text=True,
        check=False,
        env=None if env is None else {**os.environ, **env},
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
    git(workspace, "init", "--quiet", "--initial-branch=baseline")
    # Keep caches out of the baseline and of every later patch, whatever the repo's own
    # .gitignore says.
    (workspace / ".git" / "info").mkdir(exist_ok=True)
    (workspace / ".git" / "info" / "exclude").write_text("\n".join(IGNORED[1:]) + "\n")
    git(workspace, "add", "--all")
    git(workspace, "commit", "--quiet", "--no-verify", "--allow-empty", "-m", "baseline")


def checkout(repo: Path, commit: str, dest: Path) -> Path:
    """`dest` holding `repo` at `commit` (detached), made once and reused while it is there.

    A shared clone: the objects are borrowed from `repo`, whose refs, index and working tree
    are left alone. It is built beside `dest` and renamed into place, so an interrupted
    checkout is never mistaken for a finished one.
    """
    if not (repo / ".git").exists():
        raise WorkspaceError(f"{repo} is not a git repository")
    wanted = git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}").strip()
    if (dest / ".git").exists():
        if git(dest, "rev-parse", "HEAD").strip() == wanted:
            return dest
        shutil.rmtree(dest)
    partial = dest.with_name(dest.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    dest.parent.mkdir(parents=True, exist_ok=True)
    git(dest.parent, "clone", "--quiet", "--shared", "--no-checkout", str(repo), str(partial))
    git(partial, "checkout", "--quiet", "--detach", wanted)
    os.replace(partial, dest)
    return dest


def patch(workspace: Path) -> str:
    """Unified diff of everything changed in `workspace` since the baseline, new files included."""
    git(workspace, "add", "--all")
    return git(workspace, "diff", "--cached", "--binary", "HEAD")
