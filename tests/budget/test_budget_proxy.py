"""Reserve-then-settle through the real mitmdump: refusals, max_tokens capping, concurrency,
disconnects, a killed proxy, and the Redis store."""

from __future__ import annotations

import contextlib
import json
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
    disconnect_mid_stream,
    redis_server,
    serve,
    start_proxy,
)

from budget import CounterStore, open_counters
from budget.sqlite import SqliteCounters
from contracts.records import FlowRecord
from proxy.addons.budget import PROMPT_MARGIN_TOKENS

NO_LIMIT = Decimal(1000)


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


def open_budget(
    store: CounterStore, project: str, amount: Decimal, machine: Decimal = NO_LIMIT
) -> None:
    now = time.time()
    store.ensure_scope(f"project:{project}", amount, "CAD", "biweekly", now)
    store.ensure_scope(f"machine:{project}:m1", machine, "CAD", "daily", now)


def body(**fields: object) -> bytes:
    return json.dumps({"model": "tiny", "prompt": "hello", **fields}).encode()


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


def test_refusal_is_402_naming_scope_left_and_reset(
    proxy: Proxy, upstream: Upstream, counters: SqliteCounters
) -> None:
    open_budget(counters, "poor", Decimal("0.001"))
    seen = len(upstream.seen)
    with proxy.client(proxy.identity("poor")) as client:
        response = post(client, upstream, body(max_tokens=1000, marker="poor"))
    assert response.status_code == 402
    refusal = response.json()
    assert refusal["error"] == "budget_exhausted"
    assert refusal["scope"] == "project:poor"
    assert (refusal["left"], refusal["currency"]) == ("0.001000", "CAD")
    assert refusal["resets_at"].endswith("T00:00:00Z")
    assert len(upstream.seen) == seen, "a refused call reached the upstream"
    (record,) = spooled(proxy, "poor")
    assert record.status == 402 and record.error == "budget_exhausted"


def test_machine_allowance_and_task_cap_are_scopes_too(
    proxy: Proxy, upstream: Upstream, counters: SqliteCounters
) -> None:
    open_budget(counters, "scoped", NO_LIMIT, machine=Decimal("0.0005"))
    with proxy.client(proxy.identity("scoped")) as client:
        refusal = post(client, upstream, body(max_tokens=1000)).json()
    assert refusal["scope"] == "machine:scoped:m1"
    counters.ensure_scope("machine:scoped:m1", NO_LIMIT, "CAD", "daily", time.time())
    counters.ensure_scope("task:t1:fix-it", Decimal("0.0005"), "CAD", "once", time.time())
    with proxy.client(proxy.identity("scoped", task="fix-it")) as client:
        refusal = post(client, upstream, body(max_tokens=1000)).json()
    assert (refusal["scope"], refusal["resets_at"]) == ("task:t1:fix-it", None)
    # A task with no budget of its own has no scope: only project and machine are charged.
    with proxy.client(proxy.identity("scoped", task="uncapped")) as client:
        assert post(client, upstream, body(max_tokens=10)).status_code == 200


def test_unregistered_project_is_refused(proxy: Proxy, upstream: Upstream) -> None:
    with proxy.client(proxy.identity("nobody")) as client:
        response = post(client, upstream, body(max_tokens=1))
    assert response.status_code == 402
    assert response.json()["error"] == "no_budget"
    assert response.json()["scope"] == "project:nobody"


def test_missing_max_tokens_is_capped_at_what_the_tightest_scope_can_pay(
    proxy: Proxy, upstream: Upstream, counters: SqliteCounters
) -> None:
    open_budget(counters, "capped", NO_LIMIT, machine=Decimal("0.006"))
    content = body(marker="capped")
    with proxy.client(proxy.identity("capped")) as client:
        response = post(client, upstream, content)
    assert response.status_code == 200, response.text
    (sent,) = [r for r in upstream.calls if r.get("marker") == "capped"]
    affordable = int(Decimal("0.006") / CAD_PER_TOKEN) - len(content) - PROMPT_MARGIN_TOKENS
    assert sent["max_tokens"] == affordable
    # The upstream used every token it was allowed: the allowance is spent, never overrun.
    wait_settled(counters)
    assert counters.spent("machine:capped:m1") <= Decimal("0.006")
    (record,) = spooled(proxy, "capped")
    assert record.usage is not None and record.usage.completion_tokens == affordable

    big = Decimal(1)  # far more than the ceiling of 4096 tokens could cost
    counters.ensure_scope("machine:capped:m1", big, "CAD", "daily", time.time())
    with proxy.client(proxy.identity("capped")) as client:
        assert post(client, upstream, body(marker="ceiling")).status_code == 200
    (sent,) = [r for r in upstream.calls if r.get("marker") == "ceiling"]
    assert sent["max_tokens"] == 4096


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
