"""The workspace: a private git baseline of the task repo, and the patch against it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from worker_harness import EXAMPLES

from workers.workspace import WorkspaceError, checkout, patch, prepare


def git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, capture_output=True, text=True, check=True).stdout


CACHES = (".pytest_cache", "__pycache__")


def test_prepare_copies_without_history_or_caches_and_commits_a_baseline(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    # The caches are made below; a developer's own run of the example's tests leaves some.
    shutil.copytree(EXAMPLES / "mathkit", repo, ignore=shutil.ignore_patterns(*CACHES))
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/somebody-elses-history\n")
    (repo / "mathkit" / "__pycache__").mkdir()
    (repo / "mathkit" / "__pycache__" / "basic.cpython-311.pyc").write_bytes(b"\0")
    (repo / ".pytest_cache").mkdir()
    ws = tmp_path / "ws"
    # A partial copy from an earlier, interrupted attempt is replaced, not merged.
    ws.mkdir()
    (ws / "leftover.txt").write_text("from last time\n")

    prepare(repo, ws)

    tracked = set(git(ws, "ls-files").split())
    assert tracked == {
        "pyproject.toml",
        "mathkit/__init__.py",
        "mathkit/basic.py",
        "tests/test_basic.py",
    }
    assert not (ws / "leftover.txt").exists()
    assert not (ws / ".pytest_cache").exists()
    assert (
        git(ws, "log", "--format=%an <%ae> %s").strip() == "autovibe <autovibe@localhost> baseline"
    )
    assert patch(ws) == ""


def test_patch_shows_edits_and_new_files_but_not_caches(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    prepare(EXAMPLES / "textkit", ws)
    source = ws / "textkit" / "strings.py"
    source.write_text(source.read_text().replace("return len(text.split())", "return 0"))
    (ws / "textkit" / "extra.py").write_text("ANSWER = 42\n")
    (ws / "textkit" / "__pycache__").mkdir()
    (ws / "textkit" / "__pycache__" / "strings.cpython-311.pyc").write_bytes(b"\0")
    (ws / "textkit" / "strings.pyc").write_bytes(b"\0")

    diff = patch(ws)

    assert "-    return len(text.split())\n+    return 0\n" in diff
    assert "+++ b/textkit/extra.py\n" in diff
    assert "+ANSWER = 42" in diff
    assert ".pyc" not in diff
    # Asking twice gives the same patch: nothing is committed along the way.
    assert patch(ws) == diff


def test_the_baseline_and_the_agents_git_are_a_few_files_whatever_the_repo_holds(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    for i in range(200):
        (repo / "pkg" / f"m{i}.py").write_text(f"X = {i}\n")
    ws, baseline = tmp_path / "ws", tmp_path / "baseline.git"

    prepare(repo, ws, baseline)

    # One pack of blobs, no sample hooks: not a loose object per file, twice over.
    for git_dir in (baseline, ws / ".git"):
        assert len([p for p in git_dir.rglob("*") if p.is_file()]) < 30, git_dir
    assert git(ws, "status", "--porcelain") == ""  # the agent's git reads its copy
    (repo / "pkg" / "m7.py").unlink()  # the baseline holds its own blobs, not the repo's
    (ws / "pkg" / "m3.py").write_text("X = 'three'\n")
    assert "+X = 'three'" in patch(ws, baseline)


def test_prepare_names_a_missing_repo(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="no-such-repo"):
        prepare(tmp_path / "no-such-repo", tmp_path / "ws")


def _repo_with_two_commits(path: Path) -> tuple[str, str]:
    shutil.copytree(EXAMPLES / "mathkit", path)
    git(path, "init", "--quiet", "--initial-branch=main")
    git(path, "add", "-A")
    git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "one")
    first = git(path, "rev-parse", "HEAD").strip()
    (path / "CHANGES").write_text("two\n")
    git(path, "add", "-A")
    git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "two")
    return first, git(path, "rev-parse", "HEAD").strip()


def test_checkout_pins_a_commit_and_leaves_the_repo_alone(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    first, second = _repo_with_two_commits(repo)
    (repo / "mathkit" / "basic.py").write_text("# uncommitted\n")
    status = git(repo, "status", "--porcelain")
    dest = tmp_path / "checkouts" / "mathkit"
    # A leftover of an interrupted checkout is cleared, never used.
    (tmp_path / "checkouts" / "mathkit.partial").mkdir(parents=True)

    assert checkout(repo, first[:8], dest) == dest
    assert git(dest, "rev-parse", "HEAD").strip() == first
    assert not (dest / "CHANGES").exists()
    assert "raise NotImplementedError" in (dest / "mathkit" / "basic.py").read_text()
    assert not (tmp_path / "checkouts" / "mathkit.partial").exists()
    # Reused while at the commit; replaced when asked for another one.
    (dest / "scratch").write_text("kept")
    checkout(repo, first, dest)
    assert (dest / "scratch").exists()
    checkout(repo, second, dest)
    assert (dest / "CHANGES").exists()
    assert not (dest / "scratch").exists()
    # The source repository: same HEAD, same working tree.
    assert git(repo, "rev-parse", "HEAD").strip() == second
    assert git(repo, "status", "--porcelain") == status
    # A workspace made from the checkout is the commit's tree.
    ws = tmp_path / "ws"
    prepare(dest, ws)
    assert (ws / "CHANGES").read_text() == "two\n"


def test_checkout_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="not a git repository"):
        checkout(EXAMPLES / "mathkit", "HEAD", tmp_path / "x")
    repo = tmp_path / "repo"
    _repo_with_two_commits(repo)
    with pytest.raises(WorkspaceError, match="rev-parse"):
        checkout(repo, "0" * 40, tmp_path / "y")
