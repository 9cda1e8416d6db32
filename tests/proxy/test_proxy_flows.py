"""Flows through the real mitmdump: identity, metering, refusals, spool and index. The
identity and metering decisions that need no socket (a bad credential, an unpriced model,
usage read from events or estimated) run in the proxy's addon chain (proxy_harness.addon_chain)."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from proxy_harness import (
    USAGE,
    Chain,
    Proxy,
    Upstream,
    addon_chain,
    connect_tunnel,
    read_response,
)

from contracts.config import PriceCatalog, load_prices
from contracts.credentials import mint
from contracts.settings import free_port
from traffic.sqlite_store import SqliteTrafficStore

METERED = {
    **USAGE,
    "estimated": False,
    "cache_creation_tokens": 0,
    "cache_read_tokens": 0,
    "unit": None,
    "units": 0,
}
"""The record's usage of the upstream's answer: read, not estimated."""


@pytest.fixture(scope="module")
def prices(proxy: Proxy) -> PriceCatalog:
    return load_prices(proxy.settings.configs)


def complete(proxy: Proxy, upstream: Upstream, assignment: str, **body: object) -> dict:
    with proxy.client(proxy.identity(assignment)) as client:
        response = client.post(
            f"{upstream.url}/v1/completions", json={"model": "tiny", "prompt": "hi", **body}
        )
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("text/event-stream"):
        return {"events": response.text}
    return response.json()


def test_metered_call_is_spooled_with_identity_and_cost(
    proxy: Proxy, upstream: Upstream, prices: PriceCatalog
) -> None:
    answer = complete(proxy, upstream, "a-metered")

    record = proxy.spooled_one(response_id=answer["id"])
    assert (record.project, record.trial, record.assignment, record.machine) == (
        "p1",
        "t1",
        "a-metered",
        "m1",
    )
    assert (record.provider, record.model, record.status) == ("local", "tiny", 200)
    assert record.usage is not None
    assert record.usage.model_dump() == METERED
    assert record.cost_usd == prices.cost_usd("local", "tiny", 11, 7)
    assert record.cost_usd > 0
    assert record.method == "POST" and record.path == "/v1/completions"
    assert record.request_bytes > 0 and record.response_bytes > 0
    assert record.ttfb_ms is not None and 0 <= record.ttfb_ms <= record.duration_ms
    assert not record.streamed and record.error is None


def test_proxy_credential_is_not_forwarded(proxy: Proxy, upstream: Upstream) -> None:
    complete(proxy, upstream, "a-strip", prompt="strip-check")
    (seen,) = [r for r in upstream.seen if "strip-check" in r["body"]]
    assert not any(h.lower() == "proxy-authorization" for h in seen["headers"])


def test_proxy_indexes_its_own_flows(proxy: Proxy, upstream: Upstream) -> None:
    complete(proxy, upstream, "a-background")
    deadline = time.monotonic() + 10
    with SqliteTrafficStore(proxy.root.traffic_index) as index:
        # No catch_up here: the proxy's indexer thread does it about once a second.
        while not index.flows(assignment="a-background"):
            assert time.monotonic() < deadline, "the proxy's indexer did not index the flow"
            time.sleep(0.1)


def test_index_catches_up_once_and_sums_usage(proxy: Proxy, upstream: Upstream) -> None:
    complete(proxy, upstream, "a-sum")
    complete(proxy, upstream, "a-sum", stream=True)
    complete(proxy, upstream, "a-other")
    spooled = [r for r in proxy.spooled() if r.assignment == "a-sum"]
    assert len(spooled) == 2

    # The proxy's own indexer runs beside this one on the same database.
    with SqliteTrafficStore(proxy.root.traffic_index) as index:
        index.catch_up(proxy.root.traffic_logs)
        assert {f.id for f in index.flows(assignment="a-sum")} == {r.id for r in spooled}
        assert index.catch_up(proxy.root.traffic_logs) == 0
        assert len(index.flows(assignment="a-sum")) == 2

        (usage,) = index.usage(assignment="a-sum")
        assert (usage.provider, usage.model, usage.calls) == ("local", "tiny", 2)
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (22, 14, 36)
        assert usage.cost_usd == sum((r.cost_usd for r in spooled), Decimal(0))
        assert usage.estimated_calls == 0
        assert index.usage(trial="t1", assignment="no-such-assignment") == []
        assert sum(u.calls for u in index.usage(trial="t1")) >= 3


def test_missing_credential_is_refused_407(proxy: Proxy, upstream: Upstream) -> None:
    with proxy.client() as client:
        response = client.post(
            f"{upstream.url}/v1/completions", json={"model": "tiny", "prompt": "anon-407"}
        )
    assert response.status_code == 407
    assert response.headers["proxy-authenticate"] == 'Basic realm="autovibe"'
    assert response.json()["error"] == "proxy_auth"
    assert not upstream.saw("anon-407")
    record = proxy.spooled_one(
        status=407, project=None, error="proxy_auth", url=f"{upstream.url}/v1/completions"
    )
    assert record.usage is None and record.cost_usd == 0


def test_non_llm_request_is_captured_without_provider(proxy: Proxy, website: Upstream) -> None:
    with proxy.client(proxy.identity("a-web")) as client:
        # The Host header is the client's word; the record keeps where the flow really went.
        response = client.get(f"{website.url}/index.html?q=1", headers={"Host": "api.openai.com"})
    assert response.status_code == 200

    record = proxy.spooled_one(assignment="a-web")
    assert (record.method, record.path, record.status) == ("GET", "/index.html?q=1", 200)
    assert (record.host, record.url) == ("127.0.0.1", f"{website.url}/index.html?q=1")
    assert record.provider is None and record.model is None and record.usage is None
    assert record.cost_usd == 0 and record.response_bytes == len(b"just a web page\n")


def test_unreachable_upstream_is_captured_as_an_error(proxy: Proxy) -> None:
    with proxy.client(proxy.identity("a-down")) as client:
        response = client.get(f"http://127.0.0.1:{free_port()}/nothing-listens")
    assert response.status_code == 502

    record = proxy.spooled_one(assignment="a-down")
    assert record.error is not None and record.path == "/nothing-listens"
    assert record.usage is None and record.cost_usd == 0


def test_connect_tunnel_inherits_the_identity(proxy: Proxy, upstream: Upstream) -> None:
    me = proxy.identity("a-tunnel")
    credential = base64.b64encode(f"{me.machine}:{proxy.token(me)}".encode()).decode()
    target = f"127.0.0.1:{upstream.port}"
    sock, reply = connect_tunnel(proxy, target, f"Basic {credential}")
    with sock:
        assert reply.startswith(b"HTTP/1.1 200"), reply
        body = json.dumps({"model": "tiny", "prompt": "through-the-tunnel"}).encode()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: " + target.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        reply = read_response(sock)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert upstream.saw("through-the-tunnel")

    record = proxy.spooled_one(assignment="a-tunnel")
    assert (record.machine, record.provider, record.model) == ("m1", "local", "tiny")
    assert record.usage is not None and record.usage.total_tokens == 18


def test_connect_without_credential_is_refused_407(proxy: Proxy, upstream: Upstream) -> None:
    sock, reply = connect_tunnel(proxy, f"127.0.0.1:{upstream.port}", None)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 407"), reply
    assert b'Proxy-Authenticate: Basic realm="autovibe"' in reply
    record = proxy.spooled_one(method="CONNECT", status=407)
    assert record.project is None and record.error == "proxy_auth"


# -- identity and metering decisions, in the proxy's addon chain (no mitmdump) -----------------

LOCAL = "http://127.0.0.1:8500"


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Chain]:
    with addon_chain(tmp_path) as chain:
        yield chain


def answer_of(flow: http.HTTPFlow) -> dict[str, Any]:
    assert flow.response is not None
    found: dict[str, Any] = json.loads(flow.response.get_content() or b"")
    return found


def test_forged_expired_and_mismatched_credentials_are_refused_407(chain: Chain) -> None:
    me = chain.identity("a-forged")
    forged = mint(b"not the proxy's key", me)
    expired = chain.token(dataclasses.replace(me, expires=time.time() - 1))
    other_machine = chain.identity("a-forged", machine="m2")
    cases = {
        "signature": (me, forged),
        "expired": (me, expired),
        "does not match": (other_machine, chain.token(me)),
    }
    for reason, (who, token) in cases.items():
        basic = base64.b64encode(f"{who.machine}:{token}".encode()).decode()
        flow = chain.flow(None, f"{LOCAL}/v1/completions", {"model": "tiny", "prompt": "x"})
        flow.request.headers["Proxy-Authorization"] = f"Basic {basic}"
        answer = answer_of(chain.send(flow))
        assert flow.response is not None and flow.response.status_code == 407, reason
        assert answer["error"] == "proxy_auth"
        assert reason in answer["detail"]


def test_unknown_price_is_refused_402_before_forwarding(chain: Chain) -> None:
    body = {"model": "gpt-5-unpriced", "messages": [{"role": "user", "content": "402-me"}]}
    flow = chain.send(chain.flow(chain.identity("a-402"), f"{LOCAL}/v1/chat/completions", body))
    assert flow.response is not None and flow.response.status_code == 402
    answer = answer_of(flow)
    assert (answer["error"], answer["provider"], answer["model"]) == (
        "unknown_price",
        "local",
        "gpt-5-unpriced",
    )
    record = chain.spooled_one(assignment="a-402")
    assert (record.status, record.model, record.usage) == (402, "gpt-5-unpriced", None)
    assert record.error == "unknown_price" and record.cost_usd == 0


def test_streamed_usage_is_read_from_the_events(chain: Chain) -> None:
    prices = load_prices(chain.settings.configs)
    body = {"model": "tiny", "prompt": "hi", "stream": True}
    flow = chain.send(chain.flow(chain.identity("a-sse"), f"{LOCAL}/v1/completions", body))
    events = [
        {"id": "cmpl-1", "choices": [{"text": "Hello"}], "usage": None},
        {"id": "cmpl-1", "choices": [], "usage": USAGE},
    ]
    chunks = [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]
    headers = {"Content-Type": "text/event-stream"}
    assert b"data: [DONE]" in chain.respond(flow, headers=headers, chunks=chunks)

    record = chain.spooled_one(assignment="a-sse")
    assert record.streamed and record.response_id == "cmpl-1"
    assert record.usage is not None
    assert record.usage.model_dump() == METERED
    assert record.cost_usd == prices.cost_usd("local", "tiny", 11, 7)


def test_response_without_usage_is_estimated_and_marked(chain: Chain) -> None:
    body = {"model": "tiny", "prompt": "no-usage"}
    flow = chain.send(chain.flow(chain.identity("a-estimate"), f"{LOCAL}/v1/completions", body))
    chain.respond(flow, body={"id": "cmpl-2", "choices": [{"text": "Hello world"}]})

    record = chain.spooled_one(assignment="a-estimate")
    assert record.usage is not None and record.usage.estimated
    assert record.usage.prompt_tokens == math.ceil(record.request_bytes / 4)
    assert record.usage.completion_tokens == math.ceil(record.response_bytes / 4)
    assert record.cost_usd > 0
    with SqliteTrafficStore(chain.root.traffic_index) as index:
        index.catch_up(chain.root.traffic_logs)
        (usage,) = index.usage(assignment="a-estimate")
    assert usage.estimated_calls == 1
