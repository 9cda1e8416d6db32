"""Egress per project, narrowed per trial (issue 18): configs/projects.yaml gives project p1 a
package registry, a mirror and a git server (over HTTP and raw TCP); trial `narrow` keeps the
registry and the git server over HTTP only, trial `wide` keeps the project's lists. A trial
asking for more than its project is refused at submit (422 naming what is not allowed and what
is). The scheduler puts each trial's lists in its workers' machine credentials, and the real
mitmdump applies them per caller: a worker of `narrow` is refused the mirror and the git
server's raw stream that a worker of `wide`, same project, reaches; each refusal is captured,
and the servers see nothing of it.
"""

from __future__ import annotations

import base64
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from fastapi.testclient import TestClient

from contracts.config import TrialConfig
from contracts.egress import payments_url
from orchestrator.platform import Platform
from orchestrator.scheduler import Scheduler
from orchestrator.state import Trial
from workers.sandbox import allowed_env

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "orchestrator"))
from proxy_harness import (
    BANNER,
    HELLO,
    BannerServer,
    Proxy,
    Upstream,
    connect_tunnel,
    metering_proxy,
    serve,
    talk_through,
)
from trial_runs import operator_api

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Stack:
    proxy: Proxy
    client: TestClient
    platform: Platform
    scheduler: Scheduler
    registry: Upstream
    mirror: Upstream
    git: BannerServer


def trial(name: str, egress: dict[str, Any] | None) -> dict[str, Any]:
    """The demo trial as project p1, one task, one assignment; `egress` as given."""
    data: dict[str, Any] = yaml.safe_load((ROOT / "configs/trials/demo.yaml").read_text())
    task = data["tasks"][0]
    task["repo"] = str((ROOT / "configs/trials" / task["repo"]).resolve())
    data.update(name=name, project="p1", tasks=[task])
    data["budget"]["currency"] = "USD"  # as the proxy harness opened p1's counters
    data["assignment"]["trials_per_task"] = 1
    if egress is not None:
        data["egress"] = egress
    return data


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    model, registry, mirror = serve(), serve(), serve()
    upstreams = [next(model), next(registry), next(mirror)]
    git = BannerServer()
    # The proxy's own lists (for credentials that carry none) allow all of 127.0.0.1: the
    # refusals below come from the credentials' lists, not from the proxy's.
    proxy_gen = metering_proxy(tmp_path_factory, upstreams[0].port, egress_allow=["127.0.0.1"])
    proxy = next(proxy_gen)
    configs = tmp_path_factory.mktemp("configs-projects")
    shutil.copytree(ROOT / "configs", configs, dirs_exist_ok=True)
    project = {
        "allow": [
            f"127.0.0.1:{upstreams[1].port}",
            f"127.0.0.1:{upstreams[2].port}",
            f"127.0.0.1:{git.port}",
        ],
        "tcp_allow": [f"127.0.0.1:{git.port}"],
    }
    (configs / "projects.yaml").write_text(
        yaml.safe_dump({"projects": {"p1": {"egress": project}}})
    )
    # The control plane on the proxy's data root: the credentials it mints are the proxy's.
    settings = proxy.settings.model_copy(update={"configs": configs})
    with operator_api(settings) as (client, platform):
        yield Stack(
            proxy,
            client,
            platform,
            client.app.state.scheduler,  # type: ignore[attr-defined]
            upstreams[1],
            upstreams[2],
            git,
        )
    next(proxy_gen, None)
    for gen in (model, registry, mirror):
        next(gen, None)


def submitted(stack: Stack, name: str, egress: dict[str, Any] | None) -> tuple[str, str]:
    """Submit a trial; (its one assignment's id, the machine credential the scheduler gives
    that assignment's worker: the token in the spec's proxy URL)."""
    resp = stack.client.post("/v1/trials", json=trial(name, egress))
    assert resp.status_code == 201, resp.text
    trial_id = resp.json()["id"]
    with stack.platform.store.session() as s:
        row = s.get_one(Trial, trial_id)
        config = TrialConfig.model_validate(row.config)
        (assignment,) = row.assignments
        spec = stack.scheduler._spec(config, trial_id, assignment)
    token = urlsplit(spec.env["HTTP_PROXY"]).password
    assert token is not None
    # The same credential is the worker's bearer token for the payment broker, by name; the
    # sandbox passes both to the agent.
    agent_env = allowed_env(spec.env)
    assert agent_env["AUTOVIBE_MACHINE_TOKEN"] == token
    assert agent_env["AUTOVIBE_PAYMENTS_URL"] == payments_url(config.project)
    return assignment.id, token


def basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"m1:{token}".encode()).decode()


@pytest.fixture(scope="module")
def workers(stack: Stack) -> dict[str, tuple[str, str]]:
    narrow = {
        "allow": [f"127.0.0.1:{stack.registry.port}", f"127.0.0.1:{stack.git.port}"],
        "tcp_allow": [],
    }
    return {
        "narrow": submitted(stack, "narrow", narrow),
        "wide": submitted(stack, "wide", None),
    }


def test_a_trial_asking_for_more_than_its_project_is_refused_at_submit(stack: Stack) -> None:
    wider = {
        "allow": [f"127.0.0.1:{stack.registry.port}", "127.0.0.0/8", "evil.example:443"],
        "tcp_allow": ["github.com:22"],
    }
    resp = stack.client.post("/v1/trials", json=trial("wider", wider))
    assert resp.status_code == 422, resp.text
    (error,) = [e for e in resp.json()["detail"] if e["loc"] == ["body", "egress"]]
    message = error["msg"]
    assert "allow: 127.0.0.0/8, evil.example:443 not allowed by project 'p1'" in message
    assert f"127.0.0.1:{stack.registry.port}, 127.0.0.1:{stack.mirror.port}, " in message
    assert "tcp_allow: github.com:22 not allowed" in message
    assert f"which allows 127.0.0.1:{stack.git.port}" in message
    assert all(t["name"] != "wider" for t in stack.client.get("/v1/trials").json())
    # A malformed rule is named too, in its place.
    bad = stack.client.post("/v1/trials", json=trial("bad", {"allow": ["a b"]}))
    assert bad.status_code == 422
    assert any(e["loc"] == ["body", "egress", "allow", 0] for e in bad.json()["detail"])


def test_a_narrowed_trial_is_refused_what_its_sibling_reaches(
    stack: Stack, workers: dict[str, tuple[str, str]]
) -> None:
    proxy, mirror, registry = stack.proxy, stack.mirror, stack.registry
    narrow, narrow_token = workers["narrow"]
    wide, wide_token = workers["wide"]
    with proxy.client(Proxy.identity(narrow), token=narrow_token) as client:
        refused = client.get(f"{mirror.url}/simple/requests/")
        allowed = client.get(f"{registry.url}/simple/requests/")
    assert refused.status_code == 403, refused.text
    body = refused.json()
    assert (body["error"], body["host"], body["port"]) == (
        "egress_refused",
        "127.0.0.1",
        mirror.port,
    )
    assert body["rule"] == "not the model plane, a provider, or in the trial's egress.allow " + (
        "(default deny)"
    )
    assert allowed.status_code == 200, allowed.text
    assert mirror.seen == []
    record = proxy.spooled_one(assignment=narrow, status=403)
    assert (record.project, record.url) == ("p1", f"{mirror.url}/simple/requests/")
    assert record.error == "egress_refused"

    # A tunnel is refused before it opens, too.
    sock, reply = connect_tunnel(proxy, f"127.0.0.1:{mirror.port}", basic(narrow_token))
    sock.close()
    assert reply.startswith(b"HTTP/1.1 403"), reply
    assert mirror.seen == []

    with proxy.client(Proxy.identity(wide), token=wide_token) as client:
        assert client.get(f"{mirror.url}/simple/requests/").status_code == 200
    assert len(mirror.seen) == 1


def test_a_raw_tcp_exception_is_the_trials(
    stack: Stack, workers: dict[str, tuple[str, str]]
) -> None:
    """The git server is the project's raw-TCP exception; `narrow` dropped it (its tunnel
    opens: HTTP(S) to the server is allowed, its raw stream is not)."""
    proxy, git = stack.proxy, stack.git
    narrow, narrow_token = workers["narrow"]
    wide, wide_token = workers["wide"]
    sock, reply = connect_tunnel(proxy, f"127.0.0.1:{git.port}", basic(narrow_token))
    assert reply.startswith(b"HTTP/1.1 200"), reply
    received = talk_through(sock, wait_s=3)
    assert BANNER not in received and HELLO not in received, received
    assert git.received == b""
    refused = proxy.spooled_one(assignment=narrow, method="TCP")
    assert refused.error is not None
    assert refused.error.startswith(f"egress_refused: raw TCP to 127.0.0.1:{git.port}")
    assert "the trial's egress.tcp_allow" in refused.error

    sock, reply = connect_tunnel(proxy, f"127.0.0.1:{git.port}", basic(wide_token))
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert HELLO in talk_through(sock, wait_s=10)
    assert git.received == HELLO
    relayed = proxy.spooled_one(assignment=wide, method="TCP")
    assert relayed.error is None
    assert (relayed.request_bytes, relayed.response_bytes) == (len(HELLO), len(BANNER + HELLO))


def test_a_credential_without_lists_gets_the_proxys_own(stack: Stack) -> None:
    """Tokens minted before per-trial lists (and the benchmark's) keep the proxy's lists."""
    identity = Proxy.identity("a-no-lists")
    assert identity.egress_allow is None
    with stack.proxy.client(identity) as client:
        assert client.get(f"{stack.mirror.url}/simple/").status_code == 200
