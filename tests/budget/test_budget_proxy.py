"""Reserve-then-settle through the real mitmdump: a call settled at its actual cost,
concurrency, disconnects, a killed proxy, and the Redis store. Which scope refuses a call and
how, and the max_tokens written into one that sets none, are test_budget_addon's, in the
proxy's addon chain."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from budget_harness import (
    CAD_PER_TOKEN,
    PROMPT_TOKENS,
    Proxy,
    RedisServer,
    Upstream,
    body,
    disconnect_mid_stream,
    open_budget,
    redis_server,
    serve,
    start_proxy,
)

from budget import CounterStore, open_counters
from budget.sqlite import SqliteCounters
from contracts.records import FlowRecord
from proxy.addons.budget import PROMPT_MARGIN_TOKENS


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    yield from serve()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    proxy = start_proxy(
        tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("configs"), upstream
    )
    yield proxy
    proxy.stop()
    output = proxy.log.read_text()
    assert "Traceback" not in output, output
    assert proxy.process.returncode == 0, output


@pytest.fixture(scope="module")
def counters(proxy: Proxy) -> Iterator[SqliteCounters]:
    store = SqliteCounters(proxy.root.budget_counters)
    yield store
    store.close()


def post(client: httpx.Client, upstream: Upstream, content: bytes) -> httpx.Response:
    return client.post(
        f"{upstream.url}/v1/completions",
        content=content,
        headers={"Content-Type": "application/json"},
    )


def hold_for(content: bytes, max_tokens: int) -> Decimal:
    """About what the proxy reserves for a request: every byte a token, plus the margin.

    At least this much: metering may add fields (stream_options) before the budget sees it."""
    return (len(content) + PROMPT_MARGIN_TOKENS + max_tokens) * CAD_PER_TOKEN


def spooled(proxy: Proxy, project: str) -> list[FlowRecord]:
    records = []
    for path in sorted((proxy.root.traffic_logs / project).glob("*/flows.jsonl")):
        records += [FlowRecord.model_validate_json(x) for x in path.read_bytes().splitlines()]
    return records


def wait_settled(store: CounterStore, timeout: float = 10) -> None:
    """Until no reservation is open: the proxy writes a settlement just after the answer went
    out (or with the next reservation), so a read right after a call may come first."""
    deadline = time.monotonic() + timeout
    while store.open_reservations(time.time() + 1):
        assert time.monotonic() < deadline, store.open_reservations(time.time() + 1)
        time.sleep(0.05)


def test_call_is_reserved_then_settled_at_its_actual_cost(
    proxy: Proxy, upstream: Upstream, counters: SqliteCounters
) -> None:
    open_budget(counters, "served", Decimal(1))
    with proxy.client(proxy.identity("served")) as client:
        response = post(client, upstream, body(max_tokens=50))
    assert response.status_code == 200, response.text
    wait_settled(counters)
    assert counters.spent("project:served") == (PROMPT_TOKENS + 50) * CAD_PER_TOKEN
    assert counters.spent("machine:served:m1") == (PROMPT_TOKENS + 50) * CAD_PER_TOKEN
    assert counters.open_reservations(time.time() + 1) == []


@pytest.mark.slow
def test_hundred_concurrent_streams_never_overrun_the_budget(
    proxy: Proxy, upstream: Upstream, counters: SqliteCounters
) -> None:
    content = body(max_tokens=1000, stream=True)
    budget = hold_for(content, 1000) * 10  # covers ten calls at once
    open_budget(counters, "crowd", budget)

    def call(_: int) -> int:
        with proxy.client(proxy.identity("crowd")) as client:
            return post(client, upstream, content).status_code

    with ThreadPoolExecutor(max_workers=100) as pool:
        statuses = list(pool.map(call, range(100)))

    assert set(statuses) <= {200, 402}, statuses
    served = statuses.count(200)
    assert served >= 10, statuses
    wait_settled(counters)
    spent = counters.spent("project:crowd")
    assert spent <= budget
    assert spent == served * (PROMPT_TOKENS + 1000) * CAD_PER_TOKEN
    assert counters.open_reservations(time.time() + 1) == []
    # The counters agree with the spool to the micro-unit.
    records = spooled(proxy, "crowd")
    assert len(records) == 100
    assert sum(r.cost_usd * 2 for r in records) == spent


def test_client_that_disconnects_mid_stream_is_settled(
    proxy: Proxy, upstream: Upstream, counters: SqliteCounters
) -> None:
    open_budget(counters, "quitter", Decimal(1))
    identity = proxy.identity("quitter")
    content = {"model": "tiny", "prompt": "bye", "max_tokens": 100, "stream": True, "delay_s": 0.5}
    disconnect_mid_stream(proxy, identity, f"{upstream.url}/v1/completions", content)
    wait_settled(counters)
    state = counters.describe("project:quitter")
    assert state is not None and state.reserved == 0
    assert state.spent <= Decimal(1)


@pytest.mark.slow
def test_killed_proxy_leaves_orphans_that_the_next_one_settles(
    tmp_path: Path, upstream: Upstream
) -> None:
    data, configs = tmp_path / "data", tmp_path / "configs"
    first = start_proxy(data, configs, upstream)
    store = SqliteCounters(first.root.budget_counters)
    open_budget(store, "crash", Decimal(1))
    content = body(max_tokens=100, stream=True, delay_s=1.0)

    def slow_call() -> None:
        with first.client(first.identity("crash")) as client, contextlib.suppress(httpx.HTTPError):
            post(client, upstream, content)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(slow_call)
        deadline = time.monotonic() + 10
        while not store.open_reservations(time.time() + 1):
            assert time.monotonic() < deadline, "the call was never reserved"
            time.sleep(0.02)
        first.stop(kill=True)
        pending.result()
    (orphan,) = store.open_reservations(time.time() + 1)
    assert orphan.amount >= hold_for(content, 100)

    second = start_proxy(data, configs, upstream, autovibe_budget_orphan_s=0)
    try:
        wait_settled(store)
        assert store.spent("project:crash") == orphan.amount
    finally:
        second.stop()
        store.close()


@pytest.mark.slow
def test_redis_store_through_the_proxy_fails_closed_when_redis_goes(
    tmp_path: Path, upstream: Upstream
) -> None:
    servers = redis_server()
    redis: RedisServer = next(servers)
    store = open_counters("redis", url=redis.url)
    open_budget(store, "redis", hold_for(body(max_tokens=1000), 1000) * 2)
    proxy = start_proxy(
        tmp_path / "data",
        tmp_path / "configs",
        upstream,
        autovibe_budget_store="redis",
        autovibe_budget_redis_url=redis.url,
    )
    try:
        with proxy.client(proxy.identity("redis")) as client:
            statuses = [post(client, upstream, body(max_tokens=1000)).status_code for _ in range(3)]
        assert statuses == [200, 200, 402]
        wait_settled(store)
        assert store.spent("project:redis") == 2 * (PROMPT_TOKENS + 1000) * CAD_PER_TOKEN
        assert store.open_reservations(time.time() + 1) == []

        next(servers, None)  # redis-server stops
        seen = len(upstream.seen)
        with proxy.client(proxy.identity("redis")) as client:
            response = post(client, upstream, body(max_tokens=1))
        assert response.status_code == 503
        assert response.json()["error"] == "counter_store_unavailable"
        assert len(upstream.seen) == seen
    finally:
        proxy.stop()
        store.close()
