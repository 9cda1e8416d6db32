"""A trial file is data, not a host command (issue 17, finding 6).

Through the real control API (TestClient) and the real `autovibe config check`: a task repo
outside the server's task roots (the data root's secrets, a symlink out of a root) is refused
with one message whether or not it exists; a git URL is refused as not yet supported;
`sandbox.kind: none` needs the server's AUTOVIBE_ALLOW_UNSANDBOXED; a trial's `nomad:` section
cannot name the cluster, the token variable, the job ids or the interpreter, only a node pool
or datacenters the server allows. Nothing is created for a refused trial.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "orchestrator"))
from trial_runs import operator_api

from contracts.settings import PROJECT_ROOT, Settings
from orchestrator.cli import app as cli

Api = Callable[..., TestClient]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    """api(**settings) -> a client of a control API with those settings, on a fresh data root."""
    with contextlib.ExitStack() as started:
        count = itertools.count()

        def start(**overrides: Any) -> TestClient:
            data = tmp_path / f"data{next(count)}"
            settings = Settings(data=data, configs=PROJECT_ROOT / "configs", **overrides)
            client, _ = started.enter_context(operator_api(settings))
            return client

        yield start


def with_repo(trial: dict[str, Any], repo: str) -> dict[str, Any]:
    body = copy.deepcopy(trial)
    body["tasks"] = body["tasks"][:1]
    body["tasks"][0]["repo"] = repo
    return body


def refusal(client: TestClient, body: dict[str, Any], loc: list[Any]) -> str:
    """The message of the 422 at `loc`; asserts that no trial was created."""
    before = client.get("/v1/trials").json()
    resp = client.post("/v1/trials", json=body)
    assert resp.status_code == 422, resp.text
    messages = [e["msg"] for e in resp.json()["detail"] if e["loc"] == ["body", *loc]]
    assert messages, resp.json()["detail"]
    assert client.get("/v1/trials").json() == before
    return messages[0]


def test_a_repo_outside_the_task_roots_is_refused_the_same_whether_it_exists(
    api: Api, demo_trial: dict[str, Any], tmp_path: Path
) -> None:
    client = api()
    secrets = tmp_path / "data0" / "vault-secrets"
    assert (secrets / "operator-token").exists()  # what a hostile trial would copy out
    loc = ["tasks", 0, "repo"]
    existing = refusal(client, with_repo(demo_trial, str(secrets)), loc)
    missing = refusal(client, with_repo(demo_trial, str(tmp_path / "no-such-folder")), loc)
    dotted = refusal(client, with_repo(demo_trial, f"{PROJECT_ROOT}/examples/../tests"), loc)
    assert existing == missing == dotted
    assert "under the task roots" in existing and "AUTOVIBE_TASK_ROOTS" in existing
    assert str(PROJECT_ROOT / "examples") in existing  # names what is allowed
    assert str(tmp_path / "data0" / "tasks") in existing
    assert str(secrets) not in existing


def test_the_platforms_mirrors_and_imported_sets_are_not_task_folders(
    api: Api, demo_trial: dict[str, Any], tmp_path: Path
) -> None:
    # Under the default task root $AUTOVIBE_DATA/tasks: the git mirrors hold a task's whole
    # history (its fix included) and an imported set's set.json its gold patches.
    client = api()
    tasks = tmp_path / "data0" / "tasks"
    mirror = tasks / "mirrors" / "calc-1a2b3c.git"
    tree = tasks / "trees" / "calc-1a2b3c" / ("0" * 40)
    task_set = tasks / "lite"
    for folder in (mirror, tree, task_set / "sub"):
        folder.mkdir(parents=True)
    (task_set / "set.json").write_text('{"tasks": []}')
    plain = tasks / "plain-repo"
    plain.mkdir()
    (plain / "README.md").write_text("a task\n")
    loc = ["tasks", 0, "repo"]
    outside = refusal(client, with_repo(demo_trial, str(tmp_path / "elsewhere")), loc)
    for folder in (mirror, tree, task_set, task_set / "sub"):
        assert refusal(client, with_repo(demo_trial, str(folder)), loc) == outside, folder
    body = with_repo(demo_trial, f"file://{mirror}")
    body["tasks"][0]["ref"] = "main"
    assert refusal(client, body, loc) == outside
    # A plain folder beside them is still a task.
    assert client.post("/v1/trials", json=with_repo(demo_trial, str(plain))).status_code == 201


def test_a_symlink_in_a_task_root_that_points_out_is_refused(
    api: Api, demo_trial: dict[str, Any], tmp_path: Path
) -> None:
    roots = tmp_path / "roots"
    (roots / "kit").mkdir(parents=True)
    (roots / "escape").symlink_to(tmp_path / "data0" / "vault-secrets")
    client = api(task_roots=[roots])
    message = refusal(client, with_repo(demo_trial, str(roots / "escape")), ["tasks", 0, "repo"])
    assert "under the task roots" in message and str(roots) in message
    # A real folder in the root is a task like any other (the root listed alone: examples/ no
    # longer is one).
    resp = client.post("/v1/trials", json=with_repo(demo_trial, str(roots / "kit")))
    assert resp.status_code == 201, resp.text
    example = with_repo(demo_trial, str(PROJECT_ROOT / "examples" / "mathkit"))
    example["name"] = "other"
    refusal(client, example, ["tasks", 0, "repo"])


@pytest.mark.parametrize(
    "url",
    [
        "https://github.com/acme/mathkit.git",
        "ssh://git@github.com/acme/mathkit.git",
        "git@github.com:acme/mathkit.git",
    ],
)
def test_a_git_url_must_be_pinned_to_a_commit_or_a_ref(
    api: Api, demo_trial: dict[str, Any], url: str
) -> None:
    message = refusal(api(), with_repo(demo_trial, url), ["tasks", 0])
    assert "a git URL repo needs `commit` (or `ref`)" in message


def test_a_file_url_outside_the_task_roots_is_refused(api: Api, demo_trial: dict[str, Any]) -> None:
    body = with_repo(demo_trial, "file:///etc/../root/.ssh")
    body["tasks"][0]["ref"] = "main"
    message = refusal(api(), body, ["tasks", 0, "repo"])
    assert "must be a folder under the task roots" in message


def test_an_unsandboxed_trial_needs_the_servers_setting(
    api: Api, demo_trial: dict[str, Any]
) -> None:
    body = {**copy.deepcopy(demo_trial), "sandbox": {"kind": "none"}}
    message = refusal(api(), body, ["sandbox", "kind"])
    assert "AUTOVIBE_ALLOW_UNSANDBOXED" in message and "allowed: bwrap" in message
    resp = api(allow_unsandboxed=True).post("/v1/trials", json=body)
    assert resp.status_code == 201, resp.text


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"address": "http://attacker.example:4646"}, "address"),
        ({"token_env": "VAULT_SECRET_ID"}, "token_env"),
        ({"jobs": {"builtin": "someone-elses-job"}}, "jobs"),
        ({"python": "/bin/sh"}, "python"),
        ({"namespace": "prod"}, "namespace"),
    ],
)
def test_a_trial_cannot_choose_the_nomad_cluster(
    api: Api, demo_trial: dict[str, Any], section: dict[str, Any], field: str
) -> None:
    body = {**copy.deepcopy(demo_trial), "driver": "nomad", "nomad": section}
    assert refusal(api(), body, ["nomad", field]) == "Extra inputs are not permitted"


def test_a_trial_places_its_workers_only_where_the_server_allows(
    api: Api, demo_trial: dict[str, Any]
) -> None:
    client = api(nomad_node_pools=["default", "gpu"], nomad_datacenters=["dc1", "dc2"])
    body = {**copy.deepcopy(demo_trial), "driver": "nomad", "nomad": {"node_pool": "admin"}}
    message = refusal(client, body, ["nomad", "node_pool"])
    assert "AUTOVIBE_NOMAD_NODE_POOLS" in message and "allowed: default, gpu" in message
    body["nomad"] = {"datacenters": ["dc1", "dc9"]}
    message = refusal(client, body, ["nomad", "datacenters"])
    assert "dc9" in message and "allowed: dc1, dc2" in message
    body["nomad"] = {"node_pool": "gpu", "datacenters": ["dc2"]}
    resp = client.post("/v1/trials", json=body)
    assert resp.status_code == 201, resp.text


def test_config_check_refuses_what_the_api_refuses(
    demo_trial: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOVIBE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("AUTOVIBE_CONFIGS", str(PROJECT_ROOT / "configs"))
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(demo_trial))
    ran = CliRunner().invoke(cli, ["config", "check", str(good)])
    assert ran.exit_code == 0, ran.output
    bad = tmp_path / "bad.yaml"
    hostile = with_repo(demo_trial, "/etc")
    hostile["sandbox"] = {"kind": "none"}
    bad.write_text(yaml.safe_dump(hostile))
    ran = CliRunner().invoke(cli, ["config", "check", str(bad)])
    assert ran.exit_code == 2
    assert "tasks.0.repo: must be a folder under the task roots" in ran.output
    assert "sandbox.kind: `none`" in ran.output and "AUTOVIBE_ALLOW_UNSANDBOXED" in ran.output
