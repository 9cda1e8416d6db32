"""`auto` leaves a local plane that is down for the trial's cloud model, and comes back to it.

Through the real mitmdump: the local plane is proxy_harness's upstream, stopped and started
again on its port; the cloud model's provider (`openai`) is a stand-in on another port. With
`autovibe_local_health_s=0` the proxy probes the plane (`GET /v1/models`) for every `auto`
call that has a cloud model to fall back on, so each step below sees the plane as it is. The
hooks' own evidence (a call that could not connect, a 503) and how long it holds are checked
in mitmproxy's addon test context.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mitmproxy import flow as mitmflow
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils
from proxy_harness import Proxy, Upstream, call_auto, listen, proxy_with_cloud

from contracts.config import Routing
from contracts.routing import AssignmentPolicy, write_policy
from contracts.settings import Settings
from proxy.addons.metering import Metering
from proxy.addons.refusal import refuse
from proxy.addons.routing import AutoRouting, LocalHealth, decide, probe
from proxy.launch import mitmdump_argv

CLOUD = Routing(allow_cloud=True, cloud_model="openai/gpt-4o-mini")


class Plane:
    """proxy_harness's upstream on a port of its own, which can be stopped and started again."""

    def __init__(self) -> None:
        self.upstream = listen()
        self.port = self.upstream.port

    def start(self) -> None:
        again = listen(port=self.port)
        again.seen = self.upstream.seen
        self.upstream = again

    def stop(self) -> None:
        self.upstream.server.shutdown()
        self.upstream.server.server_close()


@pytest.fixture(scope="module")
def plane() -> Iterator[Plane]:
    plane = Plane()
    yield plane
    plane.stop()


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, plane: Plane, cloud: Upstream
) -> Iterator[Proxy]:
    yield from proxy_with_cloud(
        tmp_path_factory, plane.port, cloud, "--set", "autovibe_local_health_s=0"
    )


def test_auto_goes_to_the_cloud_while_the_local_plane_is_down_and_back_when_it_is_up(
    proxy: Proxy, plane: Plane, cloud: Upstream
) -> None:
    for assignment in ("up", "down", "back"):
        write_policy(proxy.root, proxy.identity(assignment), "tiny", CLOUD, context=2048)
    write_policy(proxy.root, proxy.identity("local-only"), "tiny", Routing(), context=2048)
    local = plane.upstream

    up = call_auto(proxy, "up", "while-up")
    plane.stop()
    try:
        down = call_auto(proxy, "down", "while-down")
        stranded = call_auto(proxy, "local-only", "no-cloud")
    finally:
        plane.start()
    back = call_auto(proxy, "back", "back-up")

    assert (up.status_code, down.status_code, back.status_code) == (200, 200, 200), down.text
    assert local.saw("while-up") and local.saw("back-up") and not local.saw("while-down")
    assert cloud.saw("while-down") and not cloud.saw("while-up") and not cloud.saw("back-up")
    sent = json.loads(next(r["body"] for r in cloud.seen if "while-down" in r["body"]))
    assert sent["model"] == "gpt-4o-mini"
    # Without a cloud model the call goes to the local plane as it always did: its error.
    assert stranded.status_code == 502 and not cloud.saw("no-cloud")

    to_cloud = proxy.spooled_one(assignment="down")
    assert (to_cloud.provider, to_cloud.model, to_cloud.requested_model) == (
        "openai",
        "gpt-4o-mini",
        "auto",
    )
    assert to_cloud.route_reason is not None
    assert to_cloud.route_reason == (
        f"the local model plane is down: GET http://127.0.0.1:{plane.port}/v1/models: "
        "Connection refused"
    )
    for assignment in ("up", "back"):
        kept = proxy.spooled_one(assignment=assignment)
        assert (kept.provider, kept.model, kept.route_reason) == (
            "local",
            "tiny",
            "local pair first",
        )


# -- the hooks' evidence and the probe, in mitmproxy's addon test context ----------------------


def local_flow(port: int) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request = tutils.treq(method=b"POST", host="127.0.0.1", port=port, path=b"/v1/completions")
    return flow


def test_what_the_proxy_saw_of_its_calls_holds_for_the_trust_window() -> None:
    routing = AutoRouting()
    with taddons.context(Metering(), routing) as ctx:
        ctx.configure(routing, autovibe_model_hosts="127.0.0.1:8500", autovibe_local_health_s="60")
        refused = local_flow(8500)
        refused.response, refused.server_conn.timestamp_tcp_setup = None, None
        refused.error = mitmflow.Error("Connection refused")
        routing.error(refused)
        assert routing.health.seen() == (True, "a call could not connect (Connection refused)")
        elsewhere = local_flow(9999)
        elsewhere.response = tutils.tresp(status_code=503)
        routing.response(elsewhere)  # not the local plane: no evidence of it
        assert routing.health.seen()[1] is not None
        answered = local_flow(8500)
        answered.response = tutils.tresp(status_code=200)
        routing.response(answered)
        assert routing.health.seen() == (True, None)
        unavailable = local_flow(8500)
        unavailable.response = tutils.tresp(status_code=503)
        routing.response(unavailable)
        assert routing.health.seen() == (True, "it answered 503")
        budget_refused = local_flow(8500)
        refuse(budget_refused, 402, {"error": "budget_exceeded"})
        routing.response(budget_refused)  # answered by the proxy: says nothing of the plane
        assert routing.health.seen() == (True, "it answered 503")
        with pytest.raises(Exception, match="autovibe_local_health_s must be seconds"):
            ctx.configure(routing, autovibe_local_health_s="soon")


def test_seen_down_is_trusted_then_probed_again() -> None:
    class Answers503(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    unavailable = ThreadingHTTPServer(("127.0.0.1", 0), Answers503)
    threading.Thread(target=unavailable.serve_forever, daemon=True).start()
    closed = ThreadingHTTPServer(("127.0.0.1", 0), Answers503)
    closed_port = closed.server_address[1]
    closed.server_close()
    try:
        port = unavailable.server_address[1]
        answered = asyncio.run(probe("127.0.0.1", port))
        assert answered == f"GET http://127.0.0.1:{port}/v1/models answered 503"
        refused = asyncio.run(probe("127.0.0.1", closed_port))
        assert refused == f"GET http://127.0.0.1:{closed_port}/v1/models: Connection refused"

        health = LocalHealth(trust_s=60)
        health.saw(None)  # a call was answered just now: no probe, even of a closed port
        assert asyncio.run(health.down("127.0.0.1", closed_port)) is None
        health.trust_s = 0
        time.sleep(0.01)
        assert asyncio.run(health.down("127.0.0.1", closed_port)) == refused
    finally:
        unavailable.shutdown()
        unavailable.server_close()


def test_decide_a_down_plane_needs_a_cloud_model_for_the_api() -> None:
    cloud = AssignmentPolicy(pair="tiny", routing=CLOUD)
    gone = decide("auto", "openai_chat", 10, 5, cloud, down="GET /v1/models: refused")
    assert (gone.target, gone.model) == ("cloud", "gpt-4o-mini")
    assert gone.reason == "the local model plane is down: GET /v1/models: refused"
    # The cloud model speaks OpenAI's API only: an Anthropic call stays with the local pair.
    stays = decide("auto", "anthropic_messages", 10, 5, cloud, down="refused")
    assert (
        stays.target == "local" and "allows no cloud model for anthropic_messages" in stays.reason
    )


def test_the_settings_reach_the_proxy(tmp_path: Path) -> None:
    """`AUTOVIBE_LOCAL_QUEUE_WAIT_S` / `AUTOVIBE_LOCAL_HEALTH_S` become the proxy's options,
    as `autovibe up` starts it; unset, the queue wait is not passed (auto never leaves)."""

    def options(**fields: float) -> list[str]:
        argv = mitmdump_argv(Settings(data=tmp_path, **fields))
        return [value for flag, value in itertools.pairwise(argv) if flag == "--set"]

    assert not [o for o in options() if o.startswith("autovibe_local_")]  # the proxy's defaults
    chosen = options(local_queue_wait_s=1.5, local_health_s=0)
    assert {"autovibe_local_queue_wait_s=1.5", "autovibe_local_health_s=0"} <= set(chosen)
    with pytest.raises(ValueError, match="local_queue_wait_s"):
        Settings(data=tmp_path, local_queue_wait_s=-1)
