"""An assignment's workspace: a private copy of the task repo, and its patch against it.

The baseline (the task as copied, committed once) lives in a git directory the host keeps
outside the workspace, which the agent never sees: the workspace's own `.git` is a copy the
agent may use and break as it likes, and is no more than data to the host. Patch extraction
runs git with that host-only directory, no system or global configuration, and attributes
switched off, so nothing the agent wrote (a `.git/config` with `core.fsmonitor`, hooks, a
`.gitattributes` filter or diff driver) is ever executed; symlinks are recorded as symlinks.

A task pinned to a commit (SWE-bench's `base_commit`) is first checked out at that commit with
`checkout`; the workspace is then a copy of that checkout like of any other folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
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
    "core.fsmonitor=false",
    "-c",
    "core.pager=cat",
    "-c",
    "commit.gpgsign=false",
)
_ISOLATED = (
    "-c",
    "core.attributesFile=/dev/null",
    "-c",
    "core.excludesFile=/dev/null",
    "-c",
    "core.symlinks=true",
    "-c",
    "core.autocrlf=false",
    "-c",
    "core.untrackedCache=false",
    "-c",
    "submodule.recurse=false",
)
# In the host-only git dir's info/attributes, which outranks every .gitattributes in the tree:
# no filter, no text conversion, no diff driver (only git's own binary detection).
NEUTRAL_ATTRIBUTES = "* -filter -text -ident !diff !merge !eol !working-tree-encoding\n"


class WorkspaceError(Exception):
    """A git command in the workspace failed; the message carries its output."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output
        """What git said, alone."""


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


def baseline_git(baseline: Path, workspace: Path, *args: str) -> bytes:
    """Output of git on the host-only `baseline` dir with `workspace` as its work tree, reading
    no configuration but the baseline's own (which the host wrote) and nothing from the tree."""
    return isolated_git(baseline, *args, work_tree=workspace, what=str(workspace))


def isolated_git(
    git_dir: Path,
    *args: str,
    work_tree: Path | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    what: str | None = None,
    cwd: Path | None = None,
) -> bytes:
    """Output of git on `git_dir` reading no system or global configuration, no hooks, no
    fsmonitor, no terminal prompt; `env`: variables added (a proxy, HOME for ssh keys); `cwd`
    (default: the git dir) matters to `apply`. Raises WorkspaceError naming `what` (default:
    the git dir) and git's message."""
    full_env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(git_dir),
        "LC_ALL": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_ATTR_NOSYSTEM": "1",
        "GIT_DIR": str(git_dir),
        "GIT_TERMINAL_PROMPT": "0",
        **({"GIT_WORK_TREE": str(work_tree)} if work_tree is not None else {}),
        **(env or {}),
    }
    # A session of its own: on timeout the whole group goes, the transport git started
    # (git-remote-http, ssh) with it; killing git alone left those holding the pipes.
    proc = subprocess.Popen(
        [*_GIT, *_ISOLATED, *args],
        cwd=cwd or (git_dir if git_dir.is_dir() else git_dir.parent),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=full_env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise WorkspaceError(
            f"git {' '.join(args)} on {what or git_dir} took over {timeout_s:.0f}s"
        ) from exc
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode != 0:
        message = (stderr.strip() or stdout.strip()).decode(errors="replace")
        raise WorkspaceError(
            f"git {' '.join(args)} failed on {what or git_dir} (exit {proc.returncode}): {message}",
            message,
        )
    return stdout


def default_baseline(workspace: Path) -> Path:
    """The baseline beside the workspace; the runner passes one the sandbox cannot reach."""
    return workspace.with_name(workspace.name + ".baseline")


def prepare(repo: Path, workspace: Path, baseline: Path | None = None) -> None:
    """Copy `repo` into `workspace` (replacing a partial copy) and commit it as the baseline in
    `baseline`, a git dir the caller keeps out of the agent's reach (default: beside it)."""
    baseline = baseline or default_baseline(workspace)
    if not repo.is_dir():
        raise WorkspaceError(f"task repository {repo} is not a folder")
    for old in (workspace, baseline):
        if old.is_symlink():
            old.unlink()
        elif old.exists():
            shutil.rmtree(old)
    shutil.copytree(repo, workspace, ignore=shutil.ignore_patterns(*IGNORED), symlinks=True)
    baseline.parent.mkdir(parents=True, exist_ok=True)
    # No template: no sample hooks to write here and copy again into the agent's .git.
    git(
        baseline.parent,
        "init", "--quiet", "--template=", "--bare", "--initial-branch=baseline", str(baseline),
    )  # fmt: skip
    # Caches stay out of every patch, whatever the repo's own .gitignore says.
    (baseline / "info").mkdir(exist_ok=True)
    (baseline / "info" / "exclude").write_text("\n".join(IGNORED[1:]) + "\n")
    (baseline / "info" / "attributes").write_text(NEUTRAL_ATTRIBUTES)
    # --force: the baseline is the whole copy, files the task's .gitignore names included.
    # bigFileThreshold=1 (this command only: above it files never get diffs) sends every blob
    # into one pack instead of a loose object each: a few files to write and copy, not hundreds.
    baseline_git(baseline, workspace, "-c", "core.bigFileThreshold=1", "add", "--all", "--force")
    baseline_git(
        baseline, workspace, "commit", "--quiet", "--no-verify", "--allow-empty", "-m", "baseline"
    )
    # The agent's repository: the same commit and index, its to use (git diff, git stash).
    agents = workspace / ".git"
    shutil.copytree(baseline, agents, symlinks=True)
    (agents / "info" / "attributes").unlink()
    git(workspace, "config", "--file", str(agents / "config"), "core.bare", "false")


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


def patch(workspace: Path, baseline: Path | None = None) -> str:
    """Unified diff of everything changed in `workspace` since the baseline, new files included.

    Symlinks are recorded as links, never followed; FIFOs, sockets and devices (no patch can
    hold them, and git stops at them) are removed first; the agent's `.git` is left out.
    """
    baseline = baseline or default_baseline(workspace)
    if workspace.is_symlink() or not workspace.is_dir():
        raise WorkspaceError(f"workspace {workspace} is not a folder")
    remove_special_files(workspace)
    baseline_git(baseline, workspace, "add", "--all")
    diff = baseline_git(
        baseline, workspace, "diff", "--cached", "--binary", "--no-ext-diff", "--no-textconv",
        "--no-color", "HEAD",
    )  # fmt: skip
    return diff.decode(errors="surrogateescape")


def remove_special_files(workspace: Path) -> list[str]:
    """Remove what is neither a file, a folder nor a symlink under `workspace`; their paths."""
    removed = []
    for folder, dirs, files in os.walk(workspace):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                path.unlink()
                removed.append(str(path.relative_to(workspace)))
    return removed
