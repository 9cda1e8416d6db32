"""LiteLLM's 2026 budget bugs as a test plan (issue 18), each through the real mitmdump with a
machine credential, on both counter stores: SQLite and a real redis-server.

Two mitmdumps share one data root and one counter store, as two LiteLLM instances share their
database and Redis, and calls are fired at both at once:

- litellm#34732: parallel calls of one scope admitted together overshot the budget;
- litellm#35567: concurrent settles lost increments;
- litellm#14457: a stream the client abandoned was billed nothing;
- litellm#37923: a usage of 0 reported by the upstream was billed as 0;
- litellm#36592: a reservation on a passthrough (routed) or failed call was never released.

The upstream is the budget harness's stub model server (OpenAI wire format). A `"held": true`
call waits there until the test releases it, so every call of a crowd is admitted or refused
before any of them ends and frees budget: the admissions are exact, not a race.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "budget"))
from budget_harness import (
    CAD_PER_TOKEN,
    PRICES_YAML,
    PROMPT_TOKENS,
    Proxy,
    Upstream,
    redis_server,
    serve,
    start_proxy,
)

from budget import CounterStore, ScopeState, open_counters, project_scope
from contracts.credentials import mint
from contracts.dataroot import DataRoot
from contracts.records import FlowRecord
from contracts.settings import free_port
from proxy.addons.budget import PROMPT_MARGIN_TOKENS

pytestmark = pytest.mark.slow  # fault injection under load: make test runs it

NO_LIMIT = Decimal(1000)
PROVIDER = "acme"
"""A provider of the tests' own (`autovibe_provider_hosts`) with a price and no stored key."""
CONFIG_PRICES = (
    PRICES_YAML
    + f"""\
providers:
  {PROVIDER}:
    tiny: {{input_per_mtok: "1", output_per_mtok: "1"}}
"""
)


@dataclass
class Stack:
    """Two proxies on one data root and one counter store, and where nothing listens."""

    name: str
    proxies: tuple[Proxy, Proxy]
    store: CounterStore
    upstream: Upstream
    dead_model_port: int
    """A model-plane address where nothing listens: a call there is refused a connection."""
    dead_provider_port: int
    """Where provider `acme` is declared; it has no key, so injection refuses every call."""


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    yield from serve()


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, upstream: Upstream
) -> Iterator[Stack]:
    name = str(request.param)
    data, configs = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("configs")
    (configs / "prices.yaml").write_text(CONFIG_PRICES)
    dead_model, dead_provider = free_port(), free_port()
    assert len({dead_model, dead_provider, upstream.port}) == 3
    options: dict[str, object] = {
        "autovibe_model_hosts": f"127.0.0.1:{upstream.port},127.0.0.1:{dead_model}",
        "autovibe_provider_hosts": f"127.0.0.1:{dead_provider}={PROVIDER}",
    }
    with contextlib.ExitStack() as stack:
        if name == "redis":
            servers = redis_server()
            redis = next(servers)
            stack.callback(next, servers, None)
            options |= {"autovibe_budget_store": "redis", "autovibe_budget_redis_url": redis.url}
            store = open_counters("redis", url=redis.url)
        else:
            store = open_counters("sqlite", path=DataRoot.at(data).budget_counters)
        stack.callback(store.close)
        proxies = []
        for _ in range(2):
            proxy = start_proxy(data, configs, upstream, **options)
            stack.callback(stopped_cleanly, proxy)
            proxies.append(proxy)
        yield Stack(name, (proxies[0], proxies[1]), store, upstream, dead_model, dead_provider)


def stopped_cleanly(proxy: Proxy) -> None:
    proxy.stop()
    output = proxy.log.read_text()
    assert "Traceback" not in output, output
    assert proxy.process.returncode == 0, output


def open_budget(store: CounterStore, project: str, limit: Decimal) -> None:
    now = time.time()
    store.ensure_scope(project_scope(project), limit, "CAD", "once", now)
    store.ensure_scope(f"machine:{project}:m1", NO_LIMIT, "CAD", "daily", now)


def state(store: CounterStore, scope: str) -> ScopeState:
    found = store.describe(scope)
    assert found is not None, scope
    return found


def post(
    proxy: Proxy, project: str, url: str, doc: dict[str, Any]
) -> httpx.Response | httpx.HTTPError:
    with proxy.client(proxy.identity(project)) as client:
        try:
            # The bytes json.dumps makes, which the tests count to know what is reserved.
            content = json.dumps(doc).encode()
            return client.post(url, content=content, headers={"Content-Type": "application/json"})
        except httpx.HTTPError as exc:
            return exc


def completions(base: str) -> str:
    return f"{base}/v1/completions"


def wait_until(what: str, condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def open_of(store: CounterStore, project: str) -> list[str]:
    """Ids of the project's open reservations."""
    return [
        r.reservation_id
        for r in store.open_reservations(time.time() + 1)
        if r.meta.get("flow", {}).get("project") == project
    ]


def wait_settled(store: CounterStore, project: str) -> None:
    """Until none of the project's reservations is open: a settlement is written just after
    the answer went out (or with the next reservation), so a read right after may come first."""
    wait_until(f"{project}'s reservations are settled", lambda: not open_of(store, project))


def spooled(stack: Stack, project: str) -> list[FlowRecord]:
    """The project's complete spool records, written by either proxy."""
    root = stack.proxies[0].root
    records = []
    for path in sorted((root.traffic_logs / project).glob("*/flows.jsonl")):
        complete = path.read_bytes().rpartition(b"\n")[0]
        records += [FlowRecord.model_validate_json(x) for x in complete.splitlines()]
    return records


def spooled_one(stack: Stack, project: str) -> FlowRecord:
    wait_until(f"{project} is spooled", lambda: len(spooled(stack, project)) >= 1, timeout=5)
    (record,) = spooled(stack, project)
    return record


def reserved_in(record: FlowRecord) -> Decimal:
    """What the record's budget decision says was reserved."""
    found = re.match(r"reserved ([0-9.]+) CAD", record.budget or "")
    assert found is not None, record.budget
    return Decimal(found.group(1))


def seen_prompts(upstream: Upstream, prefix: str) -> list[str]:
    return [str(r["prompt"]) for r in upstream.calls if str(r.get("prompt")).startswith(prefix)]


# -- litellm#34732 -------------------------------------------------------------------------------
ADMITTED, CROWD = 6, 30


def test_parallel_calls_admitted_together_never_overshoot(stack: Stack) -> None:
    """A budget that fits six reservations, thirty calls at once through two proxies: exactly
    six are admitted and served, the rest refused with the budget error before the upstream."""
    project, store, upstream = "crowd", stack.store, stack.upstream
    prefix = f"crowd {stack.name} "
    docs = [
        {"model": "tiny", "prompt": f"{prefix}{i:03d}", "max_tokens": 100, "held": True}
        for i in range(CROWD)
    ]
    # Every body the same length: each call reserves the same, exactly (bytes as tokens).
    hold = (len(json.dumps(docs[0])) + PROMPT_MARGIN_TOKENS + 100) * CAD_PER_TOKEN
    limit = hold * ADMITTED + hold / 2
    open_budget(store, project, limit)
    upstream.release.clear()
    try:
        with ThreadPoolExecutor(max_workers=CROWD) as pool:
            futures = [
                pool.submit(post, stack.proxies[i % 2], project, completions(upstream.url), doc)
                for i, doc in enumerate(docs)
            ]
            # Every call decided while none has ended: the refused have their answer, the
            # admitted wait at the upstream.
            wait_until(
                "every call is admitted or refused",
                lambda: (
                    len(seen_prompts(upstream, prefix)) + sum(f.done() for f in futures) == CROWD
                ),
            )
            during = state(store, project_scope(project))
            assert during.reserved + during.spent <= limit
            assert during.reserved == hold * len(seen_prompts(upstream, prefix))
            upstream.release.set()
            answers = [f.result() for f in futures]
    finally:
        upstream.release.set()

    served: list[str] = []
    for doc, answer in zip(docs, answers, strict=True):
        assert isinstance(answer, httpx.Response), answer
        if answer.status_code == 200:
            served.append(str(doc["prompt"]))
            continue
        assert answer.status_code == 402, answer.text
        refusal = answer.json()
        assert (refusal["error"], refusal["scope"]) == ("budget_exhausted", project_scope(project))
    assert len(served) == ADMITTED
    assert sorted(seen_prompts(upstream, prefix)) == sorted(served), "a refused call was served"
    wait_settled(store, project)
    after = state(store, project_scope(project))
    assert after.reserved == 0
    assert after.spent == ADMITTED * (PROMPT_TOKENS + 100) * CAD_PER_TOKEN <= limit


# -- litellm#35567 -------------------------------------------------------------------------------
SETTLERS = 40


def test_concurrent_settles_lose_no_increment(stack: Stack) -> None:
    """Forty calls of different costs, all held at the upstream then released at once, end
    within milliseconds on two proxies: the spend is the exact sum of their costs."""
    project, store, upstream = "settles", stack.store, stack.upstream
    prefix = f"settle {stack.name} "
    open_budget(store, project, Decimal(100))
    docs = [
        {
            "model": "tiny",
            "prompt": f"{prefix}{i}",
            "max_tokens": 10 + i,
            "stream": i % 2 == 0,
            "chunks": 2,
            "delay_s": 0,
            "held": True,
        }
        for i in range(SETTLERS)
    ]
    upstream.release.clear()
    try:
        with ThreadPoolExecutor(max_workers=SETTLERS) as pool:
            futures: list[Future[httpx.Response | httpx.HTTPError]] = [
                pool.submit(post, stack.proxies[i % 2], project, completions(upstream.url), doc)
                for i, doc in enumerate(docs)
            ]
            wait_until(
                "every call is held at the upstream",
                lambda: len(seen_prompts(upstream, prefix)) == SETTLERS,
            )
            upstream.release.set()
            answers = [f.result() for f in futures]
    finally:
        upstream.release.set()
    for answer in answers:
        assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer

    wait_settled(store, project)
    expected = sum((PROMPT_TOKENS + 10 + i) * CAD_PER_TOKEN for i in range(SETTLERS))
    for scope in (project_scope(project), f"machine:{project}:m1"):
        assert (state(store, scope).spent, state(store, scope).reserved) == (expected, 0), scope
    records = spooled(stack, project)
    assert len(records) == SETTLERS
    assert sum(r.cost_usd * 2 for r in records) == expected


# -- litellm#14457 -------------------------------------------------------------------------------
READ_EVENTS = 3


def read_then_leave(proxy: Proxy, project: str, url: str, doc: dict[str, Any], events: int) -> None:
    """Post a streaming call over a raw socket, read `events` events of it, and hang up."""
    identity = proxy.identity(project)
    payload = json.dumps(doc).encode()
    auth = base64.b64encode(f"{identity.machine}:{mint(proxy.key, identity)}".encode()).decode()
    request = (
        f"POST {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\n"
        f"Proxy-Authorization: Basic {auth}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    with socket.create_connection((proxy.settings.host, proxy.settings.proxy_port)) as sock:
        sock.settimeout(10)
        sock.sendall(request)
        received = b""
        while received.count(b"data: ") < events:
            chunk = sock.recv(65536)
            assert chunk, f"the stream ended after {received.count(b'data: ')} events"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received[:200]


def test_abandoned_stream_is_billed_for_what_was_generated(stack: Stack) -> None:
    """The client reads three events of a slow stream and leaves: the call is settled at the
    prompt plus the three tokens generated (estimated, marked), not at 0 and not at the
    reservation, and the upstream is hung up on instead of generating to the end."""
    project, store, upstream = "abandon", stack.store, stack.upstream
    open_budget(store, project, Decimal(1))
    prompt = f"abandon {stack.name}"
    doc = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": 200,
        "stream": True,
        "chunks": 40,
        "delay_s": 0.4,  # far apart: the fourth event is not on its way when the client leaves
    }
    read_then_leave(stack.proxies[0], project, completions(upstream.url), doc, READ_EVENTS)
    wait_settled(store, project)
    record = spooled_one(stack, project)
    assert record.usage is not None and record.usage.estimated
    assert record.usage.completion_tokens == READ_EVENTS
    assert record.usage.prompt_tokens > 0
    scope = state(store, project_scope(project))
    assert scope.reserved == 0
    assert scope.spent == record.cost_usd * 2
    assert 0 < scope.spent < reserved_in(record)
    wait_until("the upstream stops", lambda: upstream.streamed.get(prompt) is not None)
    time.sleep(1)  # two more chunk intervals: a stream still being generated would grow
    assert upstream.streamed[prompt] <= READ_EVENTS + 2, "the upstream generated on, unbilled"


# -- litellm#37923 -------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_zero_usage_from_the_upstream_is_replaced_by_an_estimate(
    stack: Stack, stream: bool
) -> None:
    """An answer with content whose usage says 0 tokens each way is charged an estimate,
    marked `estimated` in the capture record, and settled at that, never at 0."""
    project, store, upstream = f"zero-{'stream' if stream else 'json'}", stack.store, stack.upstream
    open_budget(store, project, Decimal(1))
    doc = {"model": "tiny", "prompt": "zero", "max_tokens": 50, "stream": stream, "usage": "zero"}
    answer = post(stack.proxies[0], project, completions(upstream.url), doc)
    assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer
    assert '"prompt_tokens": 0' in answer.text, "the stub did not report zero usage"
    wait_settled(store, project)
    record = spooled_one(stack, project)
    assert record.usage is not None and record.usage.estimated
    assert record.usage.prompt_tokens > 0 and record.usage.completion_tokens > 0
    assert record.error is not None and "reported 0 input tokens" in record.error
    scope = state(store, project_scope(project))
    assert scope.reserved == 0
    assert scope.spent == record.cost_usd * 2 > 0


# -- litellm#36592 -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Failure:
    """A call that is reserved (or not) and then fails somewhere on its way."""

    status: int
    error: str | None
    """The `error` of the proxy's own JSON answer; None when the answer is the upstream's."""
    settled_on: str | None
    """How the record's budget decision ends (`settled 0 on …`); None: nothing was reserved."""
    target: Callable[[Stack], str]
    fields: tuple[tuple[str, object], ...] = ()


FAILURES = {
    "upstream-500": Failure(500, None, "response", lambda s: s.upstream.url, (("fail", 500),)),
    "connection-refused": Failure(
        502, None, "error:", lambda s: f"http://127.0.0.1:{s.dead_model_port}"
    ),
    "refused-by-egress": Failure(403, "egress_refused", None, lambda s: "http://192.0.2.1"),
    "refused-by-injection": Failure(
        502, "no_provider_key", "response", lambda s: f"http://127.0.0.1:{s.dead_provider_port}"
    ),
    # `auto` is routed to the local pair, past what the agent named: the analogue of
    # LiteLLM's router-model passthrough, whose reservation was never carried along.
    "routed-then-500": Failure(
        500, None, "response", lambda s: "http://192.0.2.1", (("model", "auto"), ("fail", 500))
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_failed_or_routed_call_never_leaks_its_reservation(stack: Stack, case: str) -> None:
    """Refused before or after the reservation, or failed upstream: what was reserved is
    released, nothing is spent, and the record says what was settled."""
    failure, store = FAILURES[case], stack.store
    project = f"leak-{case}"
    open_budget(store, project, Decimal(1))
    doc = {"model": "tiny", "prompt": f"leak {case}", "max_tokens": 100, **dict(failure.fields)}
    answer = post(stack.proxies[0], project, completions(failure.target(stack)), doc)
    assert isinstance(answer, httpx.Response), answer
    assert answer.status_code == failure.status, answer.text
    if failure.error is not None:
        assert answer.json()["error"] == failure.error, answer.text
    wait_settled(store, project)
    for scope in (project_scope(project), f"machine:{project}:m1"):
        assert (state(store, scope).spent, state(store, scope).reserved) == (0, 0), scope
    record = spooled_one(stack, project)
    assert record.cost_usd == 0
    if failure.settled_on is None:
        assert record.budget is None, record.budget
    else:
        assert record.budget is not None and record.budget.startswith("reserved "), record.budget
        assert f"settled 0.000000 on {failure.settled_on}" in record.budget, record.budget
