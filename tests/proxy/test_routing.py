"""Local-first routing of `auto`, in the proxy's addon chain (proxy_harness.addon_chain).

The chain's local model plane is 127.0.0.1:8500; a request sent elsewhere (ELSEWHERE) visibly
changes its destination as well as its model. That
the real mitmdump loads the routing addon and routes through it end to end is
test_routing_down's part, with a cloud provider to fall back on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from proxy_harness import USAGE, Chain, addon_chain

from contracts.config import Routing
from contracts.routing import AssignmentPolicy, write_policy
from proxy.addons.routing import RoutingRefused, decide

LOCAL = "http://127.0.0.1:8500"
ELSEWHERE = "http://127.0.0.1:9"


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Chain]:
    with addon_chain(tmp_path) as chain:
        yield chain


def route(
    chain: Chain, assignment: str, url: str, body: dict[str, Any] | bytes, pair: str | None
) -> http.HTTPFlow:
    """`body` sent to `url` by `assignment`, whose trial routes to `pair` (None: no policy)."""
    who = chain.identity(assignment)
    if pair is not None:
        write_policy(chain.root, who, pair, Routing(), context=2048)
    return chain.send(chain.flow(who, url, body))


def sent(flow: http.HTTPFlow) -> tuple[str, int, str]:
    """Where the request leaves for, and the model it names: what the model plane gets."""
    assert flow.response is None, flow.response.text
    model = json.loads(flow.request.get_content() or b"")["model"]
    return flow.request.host, flow.request.port, model


def test_auto_goes_to_the_local_pair_and_is_metered_as_it(chain: Chain) -> None:
    # Sent elsewhere: routing points it at the model plane.
    body = {"model": "auto:thinking", "prompt": "route-local", "max_tokens": 5}
    flow = route(chain, "route-local", f"{ELSEWHERE}/v1/completions", body, "tiny:thinking")
    assert sent(flow) == ("127.0.0.1", 8500, "tiny:thinking")
    chain.respond(flow, body={"id": "c1", "choices": [], "usage": USAGE})
    record = chain.spooled_one(assignment="route-local")
    assert (record.provider, record.model) == ("local", "tiny:thinking")
    assert record.requested_model == "auto:thinking"
    assert record.usage is not None and record.usage.total_tokens == 18
    assert record.cost_usd > 0


def test_auto_without_a_policy_file_uses_the_default_pair(chain: Chain) -> None:
    body = {"model": "auto", "messages": [{"role": "user", "content": "route-default"}]}
    flow = route(chain, "route-default", f"{LOCAL}/v1/chat/completions", body, None)
    assert sent(flow) == ("127.0.0.1", 8500, "tiny")


def test_auto_in_anthropic_messages_stays_with_the_local_pair(chain: Chain) -> None:
    # Both model planes speak Messages (the CPU server, the GPU plane's messages_front).
    body = {
        "model": "auto:thinking",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "route-messages"}],
    }
    flow = route(chain, "route-messages", f"{LOCAL}/v1/messages", body, "tiny")
    assert sent(flow) == ("127.0.0.1", 8500, "tiny:thinking")
    chain.respond(flow, body={"id": "m1", "usage": {"input_tokens": 9, "output_tokens": 2}})
    record = chain.spooled_one(assignment="route-messages")
    assert (record.provider, record.model, record.route_reason) == (
        "local",
        "tiny:thinking",
        "local pair first",
    )


def test_auto_spelt_with_unicode_escapes_is_routed_too(chain: Chain) -> None:
    body = b'{"model": "\\u0061uto", "prompt": "route-escaped", "max_tokens": 5}'
    assert json.loads(body)["model"] == "auto"
    flow = chain.send(chain.flow(chain.identity("route-escaped"), f"{LOCAL}/v1/completions", body))
    assert sent(flow) == ("127.0.0.1", 8500, "tiny")


def test_a_request_only_the_cloud_could_serve_is_refused_without_allow_cloud(
    chain: Chain,
) -> None:
    who = chain.identity("route-refused")
    write_policy(chain.root, who, "tiny", Routing(), context=2048)
    big = "x" * 9000  # ≈2250 tokens: beyond the tiny model's 2048
    too_big = chain.send(
        chain.flow(who, f"{LOCAL}/v1/completions", {"model": "auto", "prompt": big})
    )
    responses = chain.send(
        chain.flow(
            who,
            f"{LOCAL}/v1/responses",
            {"model": "auto", "max_output_tokens": 5, "input": "route-refused"},
        )
    )
    details = []
    for flow in (too_big, responses):
        # Answered by the proxy: the request never leaves.
        assert flow.response is not None and flow.response.status_code == 403
        answer = json.loads(flow.response.get_content() or b"")
        assert answer["error"] == "cloud_not_allowed"
        assert answer["requested_model"] == "auto"
        assert "routing.allow_cloud is false" in answer["detail"]
        details.append(answer["detail"])
    assert "2048-token context of tiny" in details[0]
    assert "openai_responses API" in details[1]


def test_named_models_are_not_routed(chain: Chain) -> None:
    body = {"model": "tiny:thinking", "prompt": "route-named", "max_tokens": 5}
    flow = route(chain, "route-named", f"{LOCAL}/v1/completions", body, "tiny")
    assert sent(flow) == ("127.0.0.1", 8500, "tiny:thinking")


# -- the decision alone ------------------------------------------------------------------------


def cloud_policy(allow: bool) -> AssignmentPolicy:
    return AssignmentPolicy(
        pair="tiny",
        context=2048,
        routing=Routing(allow_cloud=allow, cloud_model="openai/gpt-4o-mini" if allow else None),
    )


def test_decide_local_first_then_cloud_when_allowed() -> None:
    local = decide("auto", "openai_chat", 400, 100, cloud_policy(True))
    assert (local.target, local.provider, local.model) == ("local", "local", "tiny")
    big = decide("auto:thinking", "openai_chat", 8000, 100, cloud_policy(True))
    assert (big.target, big.provider, big.model) == ("cloud", "openai", "gpt-4o-mini")
    assert "2048-token context of tiny:thinking" in big.reason
    with pytest.raises(RoutingRefused, match="allow_cloud is false"):
        decide("auto", "openai_chat", 8000, 100, cloud_policy(False))
    messages = decide("auto", "anthropic_messages", 10, 5, cloud_policy(True))
    assert (messages.target, messages.model) == ("local", "tiny")
    claude = AssignmentPolicy(
        pair="tiny", routing=Routing(allow_cloud=True, cloud_model="anthropic/claude-sonnet-4-5")
    )
    with pytest.raises(RoutingRefused, match="does not serve the openai_responses API"):
        decide("auto", "openai_responses", 10, 5, claude)


def test_allow_cloud_needs_a_cloud_model() -> None:
    with pytest.raises(ValueError, match="needs a cloud_model"):
        Routing(allow_cloud=True)
