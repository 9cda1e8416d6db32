"""`auto` leaves a saturated local plane for the trial's cloud model, through the real mitmdump.

The local plane is a server that holds calls marked `hold` until the test lets them go; the
cloud model's provider (`openai`) is a stand-in on another port (`autovibe_provider_hosts`).
With `autovibe_local_queue_wait_s=0.2`, a call sent while a held one has been in flight longer
than that goes to the cloud; once it is answered, the next call stays local.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from proxy_harness import Proxy, Upstream, _Handler, call_auto, proxy_with_cloud, serve

from contracts.config import Routing
from contracts.routing import AssignmentPolicy, write_policy
from proxy.addons.routing import decide

RELEASE = threading.Event()
HELD = threading.Event()


@pytest.fixture(scope="module")
def local_plane() -> Iterator[Upstream]:
    """proxy_harness's upstream, except that a call marked `hold` waits for RELEASE."""

    class Handler(_Handler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if b"hold" in body:
                HELD.set()
                RELEASE.wait(timeout=30)
            self.rfile = io.BufferedReader(io.BytesIO(body))  # type: ignore[assignment]
            _Handler.do_POST(self)

    try:
        yield from serve(Handler)
    finally:
        RELEASE.set()


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, local_plane: Upstream, cloud: Upstream
) -> Iterator[Proxy]:
    yield from proxy_with_cloud(
        tmp_path_factory, local_plane.port, cloud, "--set", "autovibe_local_queue_wait_s=0.2"
    )


def test_a_saturated_local_plane_sends_auto_to_the_cloud_and_a_free_one_keeps_it(
    proxy: Proxy, local_plane: Upstream, cloud: Upstream
) -> None:
    routing = Routing(allow_cloud=True, cloud_model="openai/gpt-4o-mini")
    for assignment in ("held", "busy", "free"):
        write_policy(proxy.root, proxy.identity(assignment), "tiny", routing, context=2048)
    held: list[httpx.Response] = []
    first = threading.Thread(target=lambda: held.append(call_auto(proxy, "held", "hold-me")))
    first.start()
    assert HELD.wait(timeout=30), "the held call never reached the local plane"
    time.sleep(0.3)  # past the 0.2 s threshold: the held call is still in flight
    busy = call_auto(proxy, "busy", "while-busy")
    RELEASE.set()
    first.join(timeout=30)
    free = call_auto(proxy, "free", "when-free")

    assert busy.status_code == 200 and held[0].status_code == 200 and free.status_code == 200
    assert cloud.saw("while-busy") and not local_plane.saw("while-busy")
    assert local_plane.saw("when-free") and not cloud.saw("when-free")
    sent = json.loads(next(r["body"] for r in cloud.seen if "while-busy" in r["body"]))
    assert sent["model"] == "gpt-4o-mini"
    to_cloud = proxy.spooled_one(assignment="busy")
    assert (to_cloud.provider, to_cloud.model, to_cloud.requested_model) == (
        "openai",
        "gpt-4o-mini",
        "auto",
    )
    assert to_cloud.route_reason is not None
    assert to_cloud.route_reason.startswith("the local model plane is saturated")
    assert "autovibe_local_queue_wait_s 0.2 s" in to_cloud.route_reason
    kept = proxy.spooled_one(assignment="free")
    assert (kept.provider, kept.model, kept.route_reason) == ("local", "tiny", "local pair first")


def test_decide_saturation_needs_a_cloud_model_and_the_threshold_passed() -> None:
    cloud = AssignmentPolicy(pair="tiny", routing=Routing(allow_cloud=True, cloud_model="openai/x"))
    local_only = AssignmentPolicy(pair="tiny")
    assert decide("auto", "openai_chat", 10, 5, cloud, 0.1, 0.2).target == "local"
    assert decide("auto", "openai_chat", 10, 5, cloud, 0.3, None).target == "local"
    assert decide("auto", "openai_chat", 10, 5, cloud, 0.3, 0.2).target == "cloud"
    stays = decide("auto", "openai_chat", 10, 5, local_only, 0.3, 0.2)
    assert stays.target == "local" and "allows no cloud model" in stays.reason
