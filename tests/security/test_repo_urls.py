"""A trial's git URL is fetched by the orchestrator, so it is hostile like a webhook's URL:
left alone, `repo: http://127.0.0.1:8400/...` or the cloud metadata address makes the server
call its own services or the private network, and the fetch error tells the trial's author
what answers there. Through the real API: such a URL is refused at submission, naming
AUTOVIBE_REPO_ALLOW, and nothing is fetched; a host the server lists there is fetched.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "orchestrator"))
from git_servers import BugAndFix, bug_and_fix, git_daemon
from trial_runs import operator_api, trial_settings


def trial(repo: str) -> dict[str, Any]:
    return {
        "name": "fetch",
        "project": "urls",
        "budget": {"amount": "1", "currency": "CAD", "period": "monthly"},
        "agents": ["command"],
        "model_pairs": ["tiny"],
        "sandbox": {"kind": "none"},
        "tasks": [{"id": "calc", "repo": repo, "ref": "main", "prompt": "fix it",
                   "test_command": "true", "fail_to_pass": ["t"],
                   "agent_command": ["true"]}],
    }  # fmt: skip


@pytest.fixture
def repo(tmp_path: Path) -> BugAndFix:
    return bug_and_fix(tmp_path / "git")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8400/calc.git",  # the control API
        "https://169.254.169.254/latest/meta-data.git",  # cloud metadata
        "git://10.0.0.5/calc.git",
        "ssh://git@[::1]/calc.git",
        "git@127.0.0.1:calc.git",  # scp-like ssh
        "http://localhost:6379/calc.git",  # a name that resolves to loopback (Redis's port)
    ],
)
def test_a_git_url_on_an_internal_address_is_refused_and_not_fetched(
    tmp_path: Path, url: str
) -> None:
    with operator_api(trial_settings(tmp_path)) as (client, platform):
        resp = client.post("/v1/trials", json=trial(url))
        assert resp.status_code == 422, resp.text
        message = resp.json()["detail"][0]["msg"]
        assert "only public addresses are called" in message, message
        assert "AUTOVIBE_REPO_ALLOW" in message, message
        assert not platform.root.task_mirrors.exists()


def test_a_git_server_the_operator_allows_is_fetched(tmp_path: Path, repo: BugAndFix) -> None:
    with git_daemon(repo.served) as base:
        url = f"{base}/calc.git"
        with operator_api(trial_settings(tmp_path)) as (client, _):
            resp = client.post("/v1/trials", json=trial(url))
            assert resp.status_code == 422 and "AUTOVIBE_REPO_ALLOW" in resp.text, resp.text
        settings = trial_settings(tmp_path / "allowed", repo_allow=["127.0.0.1"])
        with operator_api(settings) as (client, platform):
            resp = client.post("/v1/trials", json=trial(url))
            assert resp.status_code == 201, resp.text
            assert platform.root.task_mirrors.is_dir()
