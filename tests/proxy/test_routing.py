"""Local-first routing of `auto`, through the real mitmdump (tests/proxy/conftest.py).

The upstream of the conftest is the proxy's local model plane; the agent's requests are sent
to another server (a stand-in "somewhere else"), so a routed request visibly changes its
destination as well as its model.
"""

from __future__ import annotations

import json

import pytest
from proxy_harness import Proxy, Upstream

from contracts.config import Routing
from contracts.routing import AssignmentPolicy, write_policy
from proxy.addons.routing import RoutingRefused, decide


def test_auto_goes_to_the_local_pair_and_is_metered_as_it(
    proxy: Proxy, upstream: Upstream, website: Upstream
) -> None:
    who = proxy.identity("route-local")
    write_policy(proxy.root, who, "tiny:thinking", Routing(), context=2048)
    with proxy.client(who) as client:
        # Sent elsewhere: routing points it at the model plane.
        resp = client.post(
            f"{website.url}/v1/completions",
            json={"model": "auto:thinking", "prompt": "route-local", "max_tokens": 5},
        )
    assert resp.status_code == 200, resp.text
    got = [json.loads(r["body"]) for r in upstream.seen if "route-local" in r["body"]]
    assert [g["model"] for g in got] == ["tiny:thinking"]
    assert not website.saw("route-local")
    record = proxy.spooled_one(assignment="route-local")
    assert (record.provider, record.model) == ("local", "tiny:thinking")
    assert record.usage is not None and record.usage.total_tokens == 18
    assert record.cost_usd > 0


def test_auto_without_a_policy_file_uses_the_default_pair(proxy: Proxy, upstream: Upstream) -> None:
    who = proxy.identity("route-default")
    with proxy.client(who) as client:
        resp = client.post(
            f"{upstream.url}/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": "route-default"}]},
        )
    assert resp.status_code == 200, resp.text
    got = [json.loads(r["body"]) for r in upstream.seen if "route-default" in r["body"]]
    assert [g["model"] for g in got] == ["tiny"]


def test_auto_in_anthropic_messages_stays_with_the_local_pair(
    proxy: Proxy, upstream: Upstream
) -> None:
    # Both model planes speak Messages (the CPU server, the GPU plane's messages_front).
    who = proxy.identity("route-messages")
    write_policy(proxy.root, who, "tiny", Routing(), context=2048)
    with proxy.client(who) as client:
        resp = client.post(
            f"{upstream.url}/v1/messages",
            json={
                "model": "auto:thinking",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "route-messages"}],
            },
        )
    assert resp.status_code == 200, resp.text
    got = [json.loads(r["body"]) for r in upstream.seen if "route-messages" in r["body"]]
    assert [g["model"] for g in got] == ["tiny:thinking"]
    record = proxy.spooled_one(assignment="route-messages")
    assert (record.provider, record.model, record.route_reason) == (
        "local",
        "tiny:thinking",
        "local pair first",
    )


def test_auto_spelt_with_unicode_escapes_is_routed_too(proxy: Proxy, upstream: Upstream) -> None:
    who = proxy.identity("route-escaped")
    body = '{"model": "\\u0061uto", "prompt": "route-escaped", "max_tokens": 5}'
    assert json.loads(body)["model"] == "auto"
    with proxy.client(who) as client:
        resp = client.post(
            f"{upstream.url}/v1/completions",
            content=body,
            headers={"Content-Type": "application/json"},
        )
    assert resp.status_code == 200, resp.text
    got = [json.loads(r["body"]) for r in upstream.seen if "route-escaped" in r["body"]]
    assert [g["model"] for g in got] == ["tiny"]


def test_a_request_only_the_cloud_could_serve_is_refused_without_allow_cloud(
    proxy: Proxy, upstream: Upstream
) -> None:
    who = proxy.identity("route-refused")
    write_policy(proxy.root, who, "tiny", Routing(), context=2048)
    big = "x" * 9000  # ≈2250 tokens: beyond the tiny model's 2048
    with proxy.client(who) as client:
        too_big = client.post(
            f"{upstream.url}/v1/completions", json={"model": "auto", "prompt": big}
        )
        responses = client.post(
            f"{upstream.url}/v1/responses",
            json={"model": "auto", "max_output_tokens": 5, "input": "route-refused"},
        )
    for resp in (too_big, responses):
        assert resp.status_code == 403, resp.text
        body = resp.json()
        assert body["error"] == "cloud_not_allowed"
        assert body["requested_model"] == "auto"
        assert "routing.allow_cloud is false" in body["detail"]
    assert "2048-token context of tiny" in too_big.json()["detail"]
    assert "openai_responses API" in responses.json()["detail"]
    assert not upstream.saw(big) and not upstream.saw("route-refused")


def test_named_models_are_not_routed(proxy: Proxy, upstream: Upstream) -> None:
    who = proxy.identity("route-named")
    write_policy(proxy.root, who, "tiny", Routing(), context=2048)
    with proxy.client(who) as client:
        resp = client.post(
            f"{upstream.url}/v1/completions",
            json={"model": "tiny:thinking", "prompt": "route-named", "max_tokens": 5},
        )
    assert resp.status_code == 200
    got = [json.loads(r["body"]) for r in upstream.seen if "route-named" in r["body"]]
    assert [g["model"] for g in got] == ["tiny:thinking"]


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
