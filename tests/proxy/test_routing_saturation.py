"""`auto` leaves a saturated local plane for the trial's cloud model, in the proxy's addon chain.

The local plane is proxy_harness's upstream (routing probes it, `GET /v1/models`, before it
sends `auto` there); the cloud model's provider (`openai`) is CLOUD (`autovibe_provider_hosts`),
which no request reaches: the chain's hooks decide where a request goes, and nothing leaves.
With `autovibe_local_queue_wait_s=0.2`, a call sent while a local one has been in flight
(sent, not answered) longer than that goes to the cloud; once it is answered, the next call
stays local.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mitmproxy import http
from proxy_harness import USAGE, Chain, Upstream, addon_chain

from contracts.config import Routing
from contracts.routing import AssignmentPolicy, write_policy
from proxy.addons.routing import decide

CLOUD = "127.0.0.1:8600"


def send_auto(chain: Chain, assignment: str, marker: str) -> http.HTTPFlow:
    """`auto` sent by `assignment` to the local plane, `marker` as its prompt."""
    body = {"model": "auto", "prompt": marker, "max_tokens": 5}
    url = f"http://127.0.0.1:{chain.settings.model_port}/v1/completions"
    return chain.send(chain.flow(chain.identity(assignment), url, body))


def test_a_saturated_local_plane_sends_auto_to_the_cloud_and_a_free_one_keeps_it(
    tmp_path: Path, upstream: Upstream
) -> None:
    local = ("127.0.0.1", upstream.port)
    with addon_chain(
        tmp_path,
        upstream.port,
        f"autovibe_provider_hosts={CLOUD}=openai",
        "autovibe_local_queue_wait_s=0.2",
        secrets={"providers/openai": "sk-cloud-key"},
    ) as chain:
        routing = Routing(allow_cloud=True, cloud_model="openai/gpt-4o-mini")
        for assignment in ("held", "busy", "free"):
            write_policy(chain.root, chain.identity(assignment), "tiny", routing, context=2048)
        held = send_auto(chain, "held", "hold-me")
        assert held.response is None and (held.request.host, held.request.port) == local
        time.sleep(0.3)  # past the 0.2 s threshold: the held call is still in flight
        busy = send_auto(chain, "busy", "while-busy")
        assert busy.response is None, busy.response.text
        assert f"{busy.request.host}:{busy.request.port}" == CLOUD
        assert json.loads(busy.request.get_content() or b"")["model"] == "gpt-4o-mini"
        assert busy.request.headers["authorization"] == "Bearer sk-cloud-key"
        chain.respond(busy, body={"id": "c1", "choices": [], "usage": USAGE})
        chain.respond(held, body={"id": "c2", "choices": [], "usage": USAGE})
        free = send_auto(chain, "free", "when-free")
        assert free.response is None and (free.request.host, free.request.port) == local
        chain.respond(free, body={"id": "c3", "choices": [], "usage": USAGE})

        cloud = chain.spooled_one(assignment="busy")
        assert (cloud.provider, cloud.model, cloud.requested_model) == (
            "openai",
            "gpt-4o-mini",
            "auto",
        )
        reason = cloud.route_reason or ""
        assert reason.startswith("the local model plane is saturated")
        assert "autovibe_local_queue_wait_s 0.2 s" in reason
        kept = chain.spooled_one(assignment="free")
        assert (kept.provider, kept.model, kept.route_reason) == (
            "local",
            "tiny",
            "local pair first",
        )


def test_decide_saturation_needs_a_cloud_model_and_the_threshold_passed() -> None:
    cloud = AssignmentPolicy(pair="tiny", routing=Routing(allow_cloud=True, cloud_model="openai/x"))
    local_only = AssignmentPolicy(pair="tiny")
    assert decide("auto", "openai_chat", 10, 5, cloud, 0.1, 0.2).target == "local"
    assert decide("auto", "openai_chat", 10, 5, cloud, 0.3, None).target == "local"
    assert decide("auto", "openai_chat", 10, 5, cloud, 0.3, 0.2).target == "cloud"
    stays = decide("auto", "openai_chat", 10, 5, local_only, 0.3, 0.2)
    assert stays.target == "local" and "allows no cloud model" in stays.reason
