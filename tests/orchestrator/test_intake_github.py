"""The GitHub issue queue, against a stand-in of the GitHub REST API (tests/orchestrator/
github_standin.py: a real HTTP server that accepts only the documented requests) and real
everything else: githubkit, the control API (TestClient), the state DB, the file secret store,
the scheduler and runner (the `command` agent, unsandboxed) and git for the branch.

The repository is a local bare git repository named by a `file://` URL under the task roots;
the stand-in reads it for contents and checks a pull request's head branch in it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from git_servers import CALC_FIX, bug_and_fix, git
from github_standin import StandIn, github_standin
from trial_runs import operator_api

from contracts.dataroot import DataRoot
from contracts.intake import IssueSpecError, load_intake
from contracts.settings import PROJECT_ROOT, Settings, free_port
from orchestrator import stack
from orchestrator.client import Client
from orchestrator.intake.github import (
    GithubApi,
    GithubRateLimited,
    IssueQueue,
    signature,
    trial_name,
)
from orchestrator.platform import Platform
from orchestrator.scheduler import Scheduler
from orchestrator.state import IntakeIssue, Trial
from secretstore import store_from_env

REPO = "acme/calc"
TOKEN = "ghp_standin_token_0123456789"
HOOK_SECRET = "webhook-shared-secret"
FIX_AGENT = "import pathlib; p = pathlib.Path('calc.py'); p.write_text(p.read_text().replace('a - b', 'a + b'))"  # noqa: E501
BLOCK = """Please fix add().

```autovibe
test_command: python -m pytest -q
fail_to_pass: [tests/test_calc.py::test_add]
timeout_s: 60
```
"""


@dataclass
class World:
    standin: StandIn
    api: TestClient
    platform: Platform
    queue: IssueQueue
    served: Path
    work: Path

    def audit(self) -> list[dict[str, Any]]:
        folder = self.platform.root.root / "audit"
        return [
            json.loads(line)
            for path in sorted(folder.glob("intake-*.jsonl"))
            for line in path.read_text().splitlines()
        ]

    def row(self, number: int) -> IntakeIssue:
        with self.platform.store.session() as s:
            found = s.query(IntakeIssue).filter_by(repo=REPO, number=number).one()
            return found


def buggy_repo(base: Path) -> tuple[Path, Path]:
    """A bare repository whose `main` has add() wrong (the fix taken off it); and a clone at
    that commit to push more commits from."""
    repo = bug_and_fix(base)
    served = repo.served / "calc.git"
    git(served, "update-ref", "refs/heads/main", repo.bug)
    git(repo.work, "reset", "-q", "--hard", repo.bug)
    return served, repo.work


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    served, work = buggy_repo(tmp_path / "git")
    intake_file = tmp_path / "intake.yaml"
    settings = Settings(
        data=tmp_path / "data", configs=PROJECT_ROOT / "configs", host="127.0.0.1",
        proxy_port=free_port(), model_port=free_port(), allow_unsandboxed=True,
        task_roots=[tmp_path], intake_config=intake_file,
    )  # fmt: skip
    DataRoot.ensure(DataRoot.at(settings.data).root)
    root = DataRoot.at(settings.data)
    secrets = store_from_env({}, settings)
    secrets.put("intake/github/token", TOKEN)
    secrets.put("intake/github/webhook-secret", HOOK_SECRET)
    with github_standin(TOKEN, {REPO: served}) as standin:
        intake_file.write_text(
            yaml.safe_dump(
                {
                    "github": {
                        "api_url": standin.url,
                        "repos": [{"name": REPO, "clone_url": f"file://{served}"}],
                        "agent_command": ["python3", "-c", FIX_AGENT],
                        "rate_floor": 10,
                        "max_running": 2,
                        "trial": {
                            "project": "intake",
                            "budget": {"amount": "2", "currency": "CAD", "period": "monthly"},
                            "agents": ["command"],
                            "model_pairs": ["tiny"],
                            "sandbox": {"kind": "none"},
                        },
                    }
                }
            )
        )
        config = load_intake(intake_file).github
        assert config is not None
        with operator_api(settings) as (client, platform):
            gh_token = secrets.get(config.token_secret)
            queue = IssueQueue(
                config,
                GithubApi(gh_token, config.api_url, config.rate_floor),
                Client.over(client),
                platform.store,
                root,
                gh_token,
            )
            yield World(standin, client, platform, queue, served, work)


def run_trial(platform: Platform, trial_id: str) -> None:
    scheduler = Scheduler(platform)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        scheduler.tick()
        with platform.store.session() as s:
            if s.get_one(Trial, trial_id).status not in ("queued", "running"):
                return
        time.sleep(0.2)
    raise AssertionError(f"trial {trial_id} did not end")


@pytest.mark.slow  # a real trial: runner, grading, branch and push (~6 s on 2 cores)
def test_an_issue_runs_once_and_ends_as_a_comment_a_label_and_a_pull_request(
    world: World,
) -> None:
    gh = world.standin
    gh.add_issue(REPO, 1, "add() subtracts", BLOCK, ["autovibe", "bug"])
    gh.add_issue(REPO, 2, "no tests named", "Make it better.", ["autovibe"])
    gh.add_issue(REPO, 3, "a pull request", BLOCK, ["autovibe"], pr=True)
    gh.add_issue(REPO, 4, "not for us", BLOCK, ["bug"])
    world.queue.step()

    # 1 runs: trial submitted through the API on the default branch's head, labelled, told.
    row = world.row(1)
    assert row.state == "running" and row.trial_id is not None
    assert gh.labels_of(REPO, 1) == ["autovibe", "bug", "autovibe:running"]
    (started,) = gh.comments_on(REPO, 1)
    assert f"trial `{row.trial_id}`" in started and "2 CAD" in started
    with world.platform.store.session() as s:
        trial = s.get_one(Trial, row.trial_id)
        assert trial.name == trial_name(REPO, 1) == "gh-acme-calc-1"
        (task,) = trial.config["tasks"]
    head = git(world.served, "rev-parse", "main").strip()
    assert (task["repo"], task["commit"]) == (f"file://{world.served}", head)
    assert task["prompt"].startswith("add() subtracts\n\nPlease fix add().")
    assert task["fail_to_pass"] == ["tests/test_calc.py::test_add"]

    # 2 has no task block and the repository no .autovibe.yaml: refused, saying what is missing.
    assert world.row(2).state == "failed"
    assert gh.labels_of(REPO, 2) == ["autovibe", "autovibe:failed"]
    (refusal,) = gh.comments_on(REPO, 2)
    assert "no task block" in refusal and ".autovibe.yaml" in refusal
    # A pull request carrying the label, and an issue without it, are not taken.
    assert gh.comments_on(REPO, 3) == gh.comments_on(REPO, 4) == []
    assert gh.labels_of(REPO, 4) == ["bug"]

    # An edit after queuing changes nothing: the trial keeps the body it was given.
    gh.issues[REPO][1]["body"] = "Actually, rewrite it in Rust.\n" + BLOCK
    world.queue.step()
    with world.platform.store.session() as s:
        assert len(s.query(Trial).all()) == 1
        assert "Rust" not in s.get_one(Trial, row.trial_id).config["tasks"][0]["prompt"]

    run_trial(world.platform, row.trial_id)
    world.queue.step()

    row = world.row(1)
    assert row.state == "done"
    assert gh.labels_of(REPO, 1) == ["autovibe", "bug", "autovibe:done"]
    result = gh.comments_on(REPO, 1)[-1]
    assert f"trial `{row.trial_id}` finished" in result
    assert "| command × tiny | resolved |" in result
    (pull,) = gh.pulls
    assert pull["base"]["ref"] == "main" and pull["head"]["ref"].startswith("autovibe/issue-1/")
    assert pull["html_url"] in result and row.detail == pull["html_url"]
    assert "Fixes #1." in pull["body"]
    # The branch holds the base commit plus the agent's fix, in the repository itself.
    branch = pull["head"]["ref"]
    assert git(world.served, "show", f"{branch}:calc.py") == CALC_FIX
    assert git(world.served, "rev-parse", f"{branch}^").strip() == head

    # Never twice: the label is still there, a new poll does not queue it again.
    world.queue.step()
    with world.platform.store.session() as s:
        assert len(s.query(Trial).all()) == 1
    assert len(gh.pulls) == 1
    actions = [(e["action"], e.get("issue")) for e in world.audit()]
    for expected in [("queued", 1), ("started", 1), ("refused", 2), ("done", 1),
                     ("pull_request", 1), ("queued", 2)]:  # fmt: skip
        assert expected in actions


def test_polls_are_conditional_and_stop_at_the_rate_limit_floor(world: World) -> None:
    gh = world.standin
    gh.add_issue(REPO, 7, "idle", "nothing to run", ["other"])
    world.queue.poll()
    before = gh.remaining
    world.queue.poll()
    first, second = gh.counted("GET", "/issues")
    assert first.status == 200 and "If-None-Match" not in first.headers
    assert second.status == 304 and second.headers["If-None-Match"]
    assert first.query == {
        "labels": ["autovibe"], "state": ["open"], "sort": ["updated"], "direction": ["desc"],
        "per_page": ["100"],
    }  # fmt: skip
    assert gh.remaining == before  # a 304 costs nothing
    # A change answers 200 with a new ETag, and the new issue is queued.
    gh.add_issue(REPO, 8, "new", BLOCK, ["autovibe"])
    assert world.queue.poll() == 1
    assert gh.counted("GET", "/issues")[-1].status == 200
    # Below the floor nothing is sent until the reset the headers named.
    gh.remaining = 5
    world.queue.poll()  # answered with remaining 4
    sent = len(gh.calls)
    with pytest.raises(GithubRateLimited) as exc:
        world.queue.poll()
    assert len(gh.calls) == sent
    assert 3000 < exc.value.retry_after_s <= 3600


def test_the_task_comes_from_the_repository_file_when_the_issue_has_no_block(
    world: World,
) -> None:
    spec = "test_command: python -m pytest -q\nfail_to_pass: [tests/test_calc.py::test_add]\n"
    (world.work / ".autovibe.yaml").write_text(spec)
    git(world.work, "add", ".autovibe.yaml")
    git(world.work, "commit", "-qm", "autovibe spec")
    git(world.work, "push", "-q", "origin", "main")
    world.standin.add_issue(REPO, 5, "add() subtracts", "See title.", ["autovibe"])
    world.standin.add_issue(
        REPO, 6, "bad block", "```autovibe\ntest_command: pytest\nfail_to_pass: []\n```", []
    )
    world.queue.poll()
    config = world.queue.trial_for(world.queue.repos[REPO], world.row(5))
    (task,) = config.tasks
    assert task.test_command == "python -m pytest -q" and task.ref == "main"
    assert task.fail_to_pass == ["tests/test_calc.py::test_add"]
    contents = world.standin.counted("GET", "/contents/.autovibe.yaml")
    assert contents[-1].query == {"ref": ["main"]} and contents[-1].status == 200
    # A wrong block is named by field, not a crash.
    bad = IntakeIssue(
        repo=REPO, number=6, title="bad block", body=world.standin.issues[REPO][6]["body"]
    )
    with pytest.raises(IssueSpecError, match="fail_to_pass"):
        world.queue.trial_for(world.queue.repos[REPO], bad)


def test_the_webhook_checks_the_signature_and_queues_labelled_issues_once(world: World) -> None:
    def deliver(event: str, doc: dict[str, Any], secret: str = HOOK_SECRET) -> Any:
        body = json.dumps(doc).encode()
        return world.api.post(
            "/v1/intake/github",
            content=body,
            headers={
                "X-GitHub-Event": event,
                "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
                "X-Hub-Signature-256": signature(secret, body),
                "Content-Type": "application/json",
                "Authorization": "",  # GitHub sends no API token
            },
        )

    issue = world.standin.add_issue(REPO, 9, "via hook", BLOCK, ["autovibe"])
    labeled = {"action": "labeled", "issue": issue, "label": {"name": "autovibe"},
               "repository": {"full_name": REPO}, "sender": {"login": "octocat"}}  # fmt: skip
    assert deliver("issues", labeled, secret="wrong").status_code == 401
    body = json.dumps(labeled).encode()
    unsigned = world.api.post(
        "/v1/intake/github", content=body, headers={"X-GitHub-Event": "issues"}
    )
    assert unsigned.status_code == 401
    assert deliver("ping", {"zen": "Keep it logically awesome."}).json()["accepted"] is False
    other = {**labeled, "repository": {"full_name": "acme/other"}}
    assert deliver("issues", other).json()["accepted"] is False
    first = deliver("issues", labeled)
    assert first.status_code == 200 and first.json() == {"accepted": True, "why": "queued"}
    assert deliver("issues", labeled).json() == {"accepted": False, "why": "taken before"}
    assert world.row(9).state == "queued" and world.row(9).title == "via hook"
    actions = [e["action"] for e in world.audit()]
    assert actions.count("webhook_refused") == 2 and actions.count("queued") == 1
    # The queue (polling off) starts what the hook queued.
    world.queue.config.poll = False
    world.queue.step()
    assert world.row(9).state == "running"
    assert not world.standin.counted("GET", "/issues")


@pytest.mark.live
@pytest.mark.skipif(
    not (os.environ.get("GITHUB_TOKEN") and os.environ.get("AUTOVIBE_LIVE_GITHUB_REPO")),
    reason="needs GITHUB_TOKEN and AUTOVIBE_LIVE_GITHUB_REPO (owner/name of a test repository)",
)
def test_live_github_lists_labelled_issues_conditionally() -> None:
    repo = os.environ["AUTOVIBE_LIVE_GITHUB_REPO"]
    api = GithubApi(os.environ["GITHUB_TOKEN"], "https://api.github.com", rate_floor=10)
    assert api.default_branch(repo)
    first = next(api.labelled_pages(repo, "autovibe", None))
    assert first.etag
    again = list(api.labelled_pages(repo, "autovibe", first.etag))
    assert again == []  # 304: unchanged
    assert api.remaining is not None and api.reset_at > time.time()


@pytest.mark.slow  # the API and the intake service as `autovibe up` starts them (~15 s)
def test_autovibe_up_starts_the_intake_service_which_runs_an_issue_to_its_pull_request(
    tmp_path: Path,
) -> None:
    served, _ = buggy_repo(tmp_path / "git")
    intake_file = tmp_path / "intake.yaml"
    settings = Settings(
        data=tmp_path / "data", configs=PROJECT_ROOT / "configs", host="127.0.0.1",
        api_port=free_port(), proxy_port=free_port(), model_port=free_port(),
        allow_unsandboxed=True, task_roots=[tmp_path], intake_config=intake_file,
    )  # fmt: skip
    DataRoot.ensure(DataRoot.at(settings.data).root)
    store_from_env({}, settings).put("intake/github/token", TOKEN)
    with github_standin(TOKEN, {REPO: served}) as gh:
        intake_file.write_text(
            yaml.safe_dump(
                {
                    "github": {
                        "api_url": gh.url,
                        "repos": [{"name": REPO, "clone_url": f"file://{served}"}],
                        "agent_command": ["python3", "-c", FIX_AGENT],
                        "poll_interval_s": 0.5,
                        "trial": {
                            "project": "intake",
                            "budget": {"amount": "2", "currency": "CAD", "period": "monthly"},
                            "agents": ["command"],
                            "model_pairs": ["tiny"],
                            "sandbox": {"kind": "none"},
                        },
                    }
                }
            )
        )
        gh.add_issue(REPO, 1, "add() subtracts", BLOCK, ["autovibe"])
        try:
            stack.up(settings, ["api", "intake"], timeout_s=60)
            deadline = time.monotonic() + 90
            while not gh.pulls and time.monotonic() < deadline:
                time.sleep(0.3)
        finally:
            stack.down(settings, ["api", "intake"])
        assert gh.pulls, (DataRoot.at(settings.data).run / "intake.log").read_text()[-2000:]
        assert gh.labels_of(REPO, 1) == ["autovibe", "autovibe:done"]
        started, ended = gh.comments_on(REPO, 1)
        assert "autovibe started trial" in started and gh.pulls[0]["html_url"] in ended


def test_a_running_issue_whose_trial_is_gone_fails_once_and_the_rest_go_on(world: World) -> None:
    world.standin.add_issue(REPO, 11, "lost", BLOCK, ["autovibe"])
    with world.platform.store.session() as s:
        s.add(IntakeIssue(repo=REPO, number=11, title="lost", state="running", trial_id="tgone"))
    world.queue.follow_running()
    assert world.row(11).state == "failed"
    assert world.standin.comments_on(REPO, 11) == [
        "autovibe cannot run this issue: trial tgone no longer exists"
    ]
    assert world.standin.labels_of(REPO, 11) == ["autovibe", "autovibe:failed"]
    world.queue.follow_running()  # nothing more is said
    assert len(world.standin.comments_on(REPO, 11)) == 1


def test_a_comment_github_did_not_take_is_owed_until_it_is_posted(world: World) -> None:
    gh = world.standin
    gh.add_issue(REPO, 12, "add() subtracts", BLOCK, ["autovibe"])
    gh.fail_once("POST", "/issues/12/comments")  # right after the state update
    world.queue.step()
    row = world.row(12)
    assert row.state == "running" and row.trial_id is not None
    assert gh.comments_on(REPO, 12) == []
    assert gh.labels_of(REPO, 12) == ["autovibe", "autovibe:running"]  # the round went on
    world.queue.step()  # posted now, and the trial not started again
    (started,) = gh.comments_on(REPO, 12)
    assert f"autovibe started trial `{row.trial_id}`" in started
    world.queue.step()
    assert len(gh.comments_on(REPO, 12)) == 1
    with world.platform.store.session() as s:
        assert len(s.query(Trial).all()) == 1

    # An ending whose comment and label both fail: both follow in the next round, in order.
    gh.add_issue(REPO, 13, "lost", BLOCK, ["autovibe"])
    with world.platform.store.session() as s:
        s.add(IntakeIssue(repo=REPO, number=13, title="lost", state="running", trial_id="tgone"))
    gh.fail_once("POST", "/issues/13/comments", 500)
    gh.fail_once("POST", "/issues/13/labels", 500)
    world.queue.follow_running()
    assert world.row(13).state == "failed"
    assert (gh.comments_on(REPO, 13), gh.labels_of(REPO, 13)) == ([], ["autovibe"])
    world.queue.step()
    assert gh.comments_on(REPO, 13) == [
        "autovibe cannot run this issue: trial tgone no longer exists"
    ]
    assert gh.labels_of(REPO, 13) == ["autovibe", "autovibe:failed"]

    # An issue GitHub no longer has (404): its comment is dropped, said once, never retried.
    with world.platform.store.session() as s:
        s.add(IntakeIssue(repo=REPO, number=14, title="deleted", state="running", trial_id="tx"))
    world.queue.follow_running()
    world.queue.step()
    assert len(gh.counted("POST", "/issues/14/comments")) == 1
    dropped = [e for e in world.audit() if e["action"] == "comment_dropped"]
    assert [(e["issue"], e["why"]) for e in dropped] == [(14, "GitHub answered 404")]


def test_a_poll_reads_on_through_the_pages_while_they_bring_new_issues(world: World) -> None:
    gh, queue = world.standin, world.queue
    for n in range(100, 301):  # 201 labelled issues: three pages of 100
        gh.add_issue(REPO, n, f"issue {n}", "", ["autovibe"])
    gh.remaining = 11  # the floor (10) is reached after two pages
    with pytest.raises(GithubRateLimited):
        queue.poll()
    assert len(gh.counted("GET", "/issues")) == 2
    gh.remaining, queue.api.remaining = 5000, None  # the reset
    # Cut short, the read was not whole: the next poll reads every page again, not
    # conditionally, and the last page's issue is queued.
    assert queue.poll() == 1
    pages = gh.counted("GET", "/issues")[2:]
    assert [c.query.get("page") for c in pages] == [None, ["2"], ["3"]]
    assert "If-None-Match" not in pages[0].headers
    # Read whole now: a new issue is on the first page, and the second, holding nothing new,
    # is the last read; unchanged, one 304.
    gh.add_issue(REPO, 400, "new", "", ["autovibe"])
    assert queue.poll() == 1
    assert [c.query.get("page") for c in gh.counted("GET", "/issues")[5:]] == [None, ["2"]]
    assert queue.poll() == 0
    assert gh.counted("GET", "/issues")[-1].status == 304
    with world.platform.store.session() as s:
        assert s.query(IntakeIssue).count() == 202
