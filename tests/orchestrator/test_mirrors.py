"""Task repositories named by URL, over real git transports on 127.0.0.1 (no internet): a bare
repository with a known bug and its fix, served by `git daemon` and by `git http-backend`.

A trial on the URL runs through the API (which fetches the mirror and pins the commit at
submission), the scheduler and the real runner: the workspace holds the bug's tree in a
repository of one commit, with no remote, from which the fix commit cannot be reached. The
mirror is cloned once and then only fetched; a pinned commit it holds costs no network.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from git_servers import (
    CALC_BUG,
    BugAndFix,
    bug_and_fix,
    git,
    git_daemon,
    git_http,
    hanging_http,
)
from trial_runs import operator_api, run_to_the_end, trial_settings

from contracts.dataroot import DataRoot
from contracts.settings import free_port
from orchestrator.mirrors import Mirrors, RepoError, mirror_name
from orchestrator.platform import Platform
from orchestrator.state import Trial

FIX_AGENT = "import pathlib; p = pathlib.Path('calc.py'); p.write_text(p.read_text().replace('a - b', 'a + b'))"  # noqa: E501


@pytest.fixture
def repo(tmp_path: Path) -> BugAndFix:
    return bug_and_fix(tmp_path / "git")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, Platform]]:
    """The control API without its scheduler thread; trials run unsandboxed, task roots are
    pytest's folder, and git servers on loopback are allowed (AUTOVIBE_REPO_ALLOW)."""
    # repo_allow: the test's git servers
    with operator_api(trial_settings(tmp_path, repo_allow=["127.0.0.1"])) as api:
        yield api


def trial(name: str, **task: Any) -> dict[str, Any]:
    return {
        "name": name,
        "project": "urls",
        "budget": {"amount": "1", "currency": "CAD", "period": "monthly"},
        "agents": ["command"],
        "model_pairs": ["tiny"],
        "sandbox": {"kind": "none"},
        "tasks": [
            {
                "id": "calc",
                "prompt": "Fix add().",
                "test_command": "python -m pytest -q",
                "fail_to_pass": ["tests/test_calc.py::test_add"],
                "timeout_s": 60,
                "agent_command": ["python3", "-c", FIX_AGENT],
                **task,
            }
        ],
    }


@pytest.mark.slow  # two trials through the runner each: 17-19 s at load 5-7
@pytest.mark.parametrize("serve", [git_daemon, git_http], ids=["git-daemon", "http-backend"])
def test_a_trial_on_a_url_sees_the_bug_and_no_history_and_the_next_reuses_the_mirror(
    api: tuple[TestClient, Platform],
    repo: BugAndFix,
    serve: Callable[[Path], AbstractContextManager[str]],
) -> None:
    client, platform = api
    with serve(repo.served) as base:
        url = f"{base}/calc.git"
        resp = client.post("/v1/trials", json=trial("first", repo=url, ref="v1"))
        assert resp.status_code == 201, resp.text
        trial_id = resp.json()["id"]
        # The ref was resolved at submission: the stored trial is pinned to its commit.
        with platform.store.session() as s:
            task = s.get_one(Trial, trial_id).config["tasks"][0]
        assert (task["repo"], task["commit"]) == (url, repo.bug)
        a = run_to_the_end(platform, trial_id)
    assert (a.state, a.status) == ("finished", "resolved"), a.result
    # The server is gone: a second trial on the pinned commit runs from the same mirror.
    mirror = Mirrors(platform.root).mirror(url)
    (mirror / "cloned-once").write_text("")
    resp = client.post("/v1/trials", json=trial("second", repo=url, commit=repo.bug))
    assert resp.status_code == 201, resp.text
    again = run_to_the_end(platform, resp.json()["id"])
    assert (again.state, again.status) == ("finished", "resolved"), again.result
    assert (mirror / "cloned-once").exists()
    assert [p.name for p in platform.root.task_mirrors.glob("*.git")] == [mirror.name]
    artifacts = platform.root.assignment_dir("urls", trial_id, a.id)
    ws = artifacts / "workspace"
    assert (ws / "tests" / "test_calc.py").exists()
    # One commit, the task's tree, no remote; the fix is not an object of the workspace.
    assert git(ws, "log", "--format=%s").splitlines() == ["baseline"]
    assert git(ws, "remote") == ""
    assert git(ws, "show", "HEAD:calc.py") == CALC_BUG
    missing = subprocess.run(
        ["git", "-C", str(ws), "cat-file", "-e", f"{repo.fix}^{{commit}}"], capture_output=True
    )
    assert missing.returncode != 0
    tree = platform.root.task_trees / mirror_name(url).removesuffix(".git") / repo.bug
    assert (tree / "calc.py").read_text() == CALC_BUG and not (tree / ".git").exists()


def test_the_mirror_is_cloned_once_then_fetched_and_a_held_commit_needs_no_server(
    tmp_path: Path, repo: BugAndFix
) -> None:
    mirrors = Mirrors(DataRoot.at(tmp_path / "data"))
    with git_http(repo.served) as base:
        url = f"{base}/calc.git"
        assert mirrors.resolve(url, ref="main") == repo.fix
        mirror = mirrors.mirror(url)
        (mirror / "cloned-once").write_text("")
        newer = repo.push_commit("newer")
        assert mirrors.resolve(url, ref="main") == newer  # fetched into the same mirror
        assert mirrors.resolve(url, commit=repo.bug[:10]) == repo.bug
    assert (mirror / "cloned-once").exists()
    # The server is gone: a commit the mirror holds is resolved and exported all the same.
    assert mirrors.resolve(url, commit=repo.bug) == repo.bug
    tree = mirrors.tree(url, repo.bug)
    assert (tree / "calc.py").read_text() == CALC_BUG
    assert sorted(p.name for p in tree.iterdir()) == ["calc.py", "tests"]
    assert mirrors.tree(url, repo.bug) == tree
    # The commits used are pinned: no fetch or gc loses them.
    assert repo.bug in git(mirror, "for-each-ref", "refs/autovibe/commits/")


def test_unreachable_url_and_missing_commit_are_refused_at_submission_naming_the_task(
    api: tuple[TestClient, Platform], repo: BugAndFix
) -> None:
    client, platform = api
    closed = f"git://127.0.0.1:{free_port()}/calc.git"
    resp = client.post("/v1/trials", json=trial("closed", repo=closed, commit=repo.bug))
    assert resp.status_code == 422
    (error,) = resp.json()["detail"]
    assert error["loc"] == ["body", "tasks", 0, "repo"]
    assert error["msg"].startswith(f"task calc: cannot fetch {closed}:"), error
    # Nothing half-made: no mirror, no partial clone.
    assert not any(p.suffix in (".git", ".partial") for p in platform.root.task_mirrors.iterdir())

    with git_daemon(repo.served) as base:
        url = f"{base}/calc.git"
        absent = "0123456789abcdef0123456789abcdef01234567"
        resp = client.post("/v1/trials", json=trial("absent", repo=url, commit=absent))
        assert resp.status_code == 422
        assert resp.json()["detail"][0]["msg"] == (
            f"task calc: commit {absent} is not in {url} (fetched its branches and tags)"
        )
        resp = client.post("/v1/trials", json=trial("noref", repo=url, ref="nope"))
        assert resp.json()["detail"][0]["msg"] == f"task calc: {url} has no branch or tag 'nope'"
        resp = client.post("/v1/trials", json=trial("unpinned", repo=url))
        assert resp.status_code == 422
        assert "a git URL repo needs `commit` (or `ref`)" in resp.text


def test_file_urls_stay_under_the_task_roots(
    api: tuple[TestClient, Platform], repo: BugAndFix, tmp_path_factory: pytest.TempPathFactory
) -> None:
    client, platform = api
    outside = tmp_path_factory.mktemp("elsewhere") / "calc.git"
    shutil.copytree(repo.served / "calc.git", outside)
    resp = client.post("/v1/trials", json=trial("out", repo=f"file://{outside}", ref="main"))
    assert resp.status_code == 422
    assert "must be a folder under the task roots" in resp.text
    assert not platform.root.task_mirrors.exists()
    inside = f"file://{repo.served / 'calc.git'}"
    resp = client.post("/v1/trials", json=trial("in", repo=inside, ref="v1"))
    assert resp.status_code == 201, resp.text


def test_fetches_read_no_global_git_configuration(
    tmp_path: Path, repo: BugAndFix, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The orchestrator's own ~/.gitconfig (HOME is passed on for ssh's keys) is not read: its
    `insteadOf` would send the fetch elsewhere, its hooks path would run a program."""
    home = tmp_path / "home"
    home.mkdir()
    ran = tmp_path / "hook-ran"
    hook = home / "hooks" / "reference-transaction"
    hook.parent.mkdir()
    hook.write_text(f"#!/bin/sh\ntouch {ran}\n")
    hook.chmod(0o755)
    with git_daemon(repo.served) as base:
        url = f"{base}/calc.git"
        (home / ".gitconfig").write_text(
            f'[url "file:///nonexistent/"]\n\tinsteadOf = {base}/\n'
            f"[core]\n\thooksPath = {hook.parent}\n"
        )
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)
        assert Mirrors(DataRoot.at(tmp_path / "data")).resolve(url, ref="main") == repo.fix
    assert not ran.exists()
    assert os.environ["HOME"] == str(home)


def test_mirror_names_are_safe_and_hide_credentials() -> None:
    name = mirror_name("https://user:s3cret@example.org:8443/org/../Proj.git")
    assert "s3cret" not in name and "/" not in name and not name.startswith(".")
    assert name.endswith(".git")
    assert mirror_name("https://example.org/a/b.git") != mirror_name("https://example.org/a_b.git")


def test_a_fetch_that_hangs_is_killed_with_its_transport_naming_the_url(tmp_path: Path) -> None:
    """A server that accepts and never answers: past the fetch's time git is killed with the
    whole process group, git-remote-http included (its connection is closed), and the error
    names the URL; nothing is left behind."""
    mirrors = Mirrors(DataRoot.at(tmp_path / "data"), fetch_timeout_s=2)
    with hanging_http() as (base, closed):
        url = f"{base}/calc.git"
        with pytest.raises(RepoError) as caught:
            mirrors.resolve(url, ref="main")
        assert str(caught.value) == (
            f"cannot fetch {url}: not done within 2 s (git and its transport were killed)"
        )
        assert closed.wait(10), "git-remote-http still holds its connection"
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if url.encode() in cmdline.read_bytes():
                left.append(cmdline.parent.name)
    assert left == []
    assert not any(p.suffix in (".git", ".partial") for p in mirrors.root.task_mirrors.iterdir())
