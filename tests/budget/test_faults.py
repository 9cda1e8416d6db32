"""Issue 5's fault test: under load, clients leave mid-stream, the upstream fails or resets, and
the proxy is killed and restarted on the same data root — and afterwards no reservation is
open, the counters' spend equals the spool's cost to the micro-unit (in CAD and in USD), the
budget was never overrun, and the ledger posted from the spool reconciles and passes bean-check.

One real mitmdump at a time (SQLite counters, then a real redis-server), one scripted upstream.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from beancount.core import data
from budget_harness import (
    CAD_PER_TOKEN,
    PROMPT_TOKENS,
    Proxy,
    Upstream,
    disconnect_mid_stream,
    redis_server,
    serve,
    start_proxy,
)
from mitmproxy.test import taddons

from budget import CounterStore, open_counters, project_scope
from contracts.dataroot import DataRoot
from contracts.records import FlowRecord
from ledger.book import INFERENCE_ROOT, Ledger
from ledger.check import bean_check
from ledger.posting import post_usage
from ledger.reconcile import reconcile
from proxy.addons.budget import (
    FLOW_NOTE,
    ORPHAN_ERROR,
    PROMPT_MARGIN_TOKENS,
    Budget,
    orphan_record,
)
from traffic.sqlite_store import SqliteTrafficStore

pytestmark = pytest.mark.slow  # fault injection under load: make test runs it

PROJECT = "faults"
ORPHAN_S = 1
MAX_TOKENS = 200
FX = {"CAD": Decimal(2), "USD": Decimal(1)}
"""The harness's prices.yaml: two CAD per USD."""

# The calls of each wave, by kind. `slow` streams for seconds: in flight when the proxy dies.
WAVE_1 = {"slow": 6, "ok": 6, "quit": 3, "fail500": 3, "reset": 2}
WAVE_2 = {"ok": 10, "quit": 4, "fail500": 3, "reset": 3}
SCRIPTS: dict[str, dict[str, object]] = {
    "slow": {"chunks": 8, "delay_s": 0.5},
    "ok": {"chunks": 4, "delay_s": 0.05},
    "quit": {"chunks": 6, "delay_s": 0.3},
    "fail500": {"fail": 500},
    "reset": {"chunks": 6, "delay_s": 0.05, "fail": "reset", "reset_after": 2},
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    yield from serve()


def request_body(kind: str, n: int, tag: str = "") -> dict[str, object]:
    return {
        "model": "tiny",
        "prompt": f"fault {kind} {n} {tag}",
        "max_tokens": MAX_TOKENS,
        "stream": True,
        **SCRIPTS[kind],
    }


def call(proxy: Proxy, upstream: Upstream, kind: str, n: int, tag: str) -> str:
    """One call of `kind` through `proxy`; what the client saw (a status or `error`)."""
    url = f"{upstream.url}/v1/completions"
    identity = proxy.identity(PROJECT)
    if kind == "quit":
        disconnect_mid_stream(proxy, identity, url, request_body(kind, n, tag))
        return "left"
    with proxy.client(identity) as client:
        try:
            return str(client.post(url, json=request_body(kind, n, tag)).status_code)
        except httpx.HTTPError:
            return "error"  # a reset, or the proxy died under it


def wave(
    pool: ThreadPoolExecutor,
    proxy: Proxy,
    upstream: Upstream,
    kinds: dict[str, int],
    first: int,
    tag: str,
) -> dict[str, list[Future[str]]]:
    """All the calls of `kinds` at once; their futures by kind."""
    futures: dict[str, list[Future[str]]] = {}
    n = first
    for kind, count in kinds.items():
        for _ in range(count):
            futures.setdefault(kind, []).append(pool.submit(call, proxy, upstream, kind, n, tag))
            n += 1
    return futures


def wait_upstream(upstream: Upstream, kind: str, tag: str, count: int, timeout: float = 15) -> None:
    """Until the upstream has been asked `count` calls of `kind` (reserved, then forwarded)."""
    deadline = time.monotonic() + timeout
    marker = re.compile(rf"fault {kind} \d+ {tag}$")
    while len([r for r in upstream.calls if marker.match(str(r.get("prompt")))]) < count:
        assert time.monotonic() < deadline, f"the upstream never saw {count} {kind} calls"
        time.sleep(0.02)


def wait_open(store: CounterStore, count: int, timeout: float = 15) -> None:
    """Until exactly `count` reservations are open."""
    deadline = time.monotonic() + timeout
    while len(left := store.open_reservations(time.time() + 1)) != count:
        assert time.monotonic() < deadline, f"{len(left)} open, waiting for {count}: {left}"
        time.sleep(0.05)


def spooled(root: DataRoot) -> list[FlowRecord]:
    records = []
    for path in sorted((root.traffic_logs / PROJECT).glob("*/flows.jsonl")):
        records += [FlowRecord.model_validate_json(x) for x in path.read_bytes().splitlines()]
    return records


def prompt_of(record: FlowRecord) -> str:
    """The call's prompt (`fault <kind> <n> <tag>`); empty for an orphan (no body)."""
    text = record.request_body.text if record.request_body else "{}"
    return str(json.loads(text).get("prompt", ""))


def kind_of(record: FlowRecord) -> str:
    return prompt_of(record).split(" ")[1] if prompt_of(record) else "orphan"


def micro(amount: Decimal) -> Decimal:
    return amount.quantize(Decimal("0.000001"))


@pytest.mark.parametrize("store_name", ["sqlite", "redis"])
def test_faults_under_load_leave_spend_equal_to_the_ledger(
    tmp_path: Path, upstream: Upstream, store_name: str
) -> None:
    data_dir, configs = tmp_path / "data", tmp_path / "configs"
    root = DataRoot.at(data_dir)
    longest = max(len(json.dumps(request_body(kind, 199, store_name))) for kind in SCRIPTS)
    hold = (longest + PROMPT_MARGIN_TOKENS + MAX_TOKENS) * CAD_PER_TOKEN  # at least a call's
    # The first wave fits whole; what its calls and orphans spent leaves the second wave short.
    budget = micro(hold * (sum(WAVE_1.values()) + 3))
    with contextlib.ExitStack() as stack:
        options: dict[str, object] = {"autovibe_budget_orphan_s": ORPHAN_S}
        if store_name == "redis":
            servers = redis_server()
            redis = next(servers)
            stack.callback(next, servers, None)
            options |= {"autovibe_budget_store": "redis", "autovibe_budget_redis_url": redis.url}
            store = open_counters("redis", url=redis.url)
        else:
            store = open_counters("sqlite", path=root.budget_counters)
        stack.callback(store.close)
        now = time.time()
        store.ensure_scope(project_scope(PROJECT), budget, "CAD", "once", now)
        store.ensure_scope(f"machine:{PROJECT}:m1", Decimal(1000), "CAD", "daily", now)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=40))

        first = start_proxy(data_dir, configs, upstream, **options)
        stack.callback(first.stop, kill=True)
        one = wave(pool, first, upstream, WAVE_1, 0, store_name)
        outcomes = Counter(f.result() for k, fs in one.items() if k != "slow" for f in fs)
        # The slow streams are mid-stream; every other call has ended and is settled.
        wait_upstream(upstream, "slow", store_name, WAVE_1["slow"])
        wait_open(store, WAVE_1["slow"])
        time.sleep(0.2)  # capture spools right after budget settles, in the same hook
        first.stop(kill=True)  # SIGKILL: no hook runs, nothing is settled or spooled
        outcomes += Counter(f.result() for f in one["slow"])
        orphans = store.open_reservations(time.time() + 1)
        assert len(orphans) == WAVE_1["slow"]
        assert all(o.meta.get("flow", {}).get("assignment") == f"{PROJECT}-a1" for o in orphans)

        time.sleep(max(0.0, max(o.created for o in orphans) + ORPHAN_S + 0.05 - time.time()))
        second = start_proxy(data_dir, configs, upstream, **options)
        stack.callback(second.stop)
        two = wave(pool, second, upstream, WAVE_2, 100, store_name)
        outcomes += Counter(f.result() for fs in two.values() for f in fs)
        wait_open(store, 0)
        second.stop()
        log = second.log.read_text()
        assert "Traceback" not in log, log
        assert second.process.returncode == 0, log

        # -- the counters against the spool ----------------------------------------------------
        records = spooled(root)
        kinds = Counter(kind_of(r) for r in records)
        expected = Counter(WAVE_1) + Counter(WAVE_2)
        # A client that hangs up before the proxy read its request costs nothing and leaves no
        # record; every other call is spooled, the slow ones by the sweeper, as orphans.
        assert kinds - Counter(quit=kinds["quit"]) == expected - Counter(
            quit=expected["quit"], slow=WAVE_1["slow"]
        ) + Counter(orphan=WAVE_1["slow"]), (kinds, outcomes)
        assert kinds["quit"] >= 1, (kinds, outcomes)
        # Whatever reached the upstream (was reserved, then forwarded) is in the spool.
        asked = {str(r.get("prompt")) for r in upstream.calls}
        slow = {f"fault slow {n} {store_name}" for n in range(WAVE_1["slow"])}
        ours = {p for p in asked if p.endswith(f" {store_name}")}
        assert slow <= ours
        assert ours <= {prompt_of(r) for r in records} | slow
        assert len({r.id for r in records}) == len(records), "a flow was spooled twice"
        assert {r.id for r in records} >= {o.reservation_id for o in orphans}
        made_up = [r for r in records if r.error == ORPHAN_ERROR]
        assert {r.id for r in made_up} == {o.reservation_id for o in orphans}
        amounts = {o.reservation_id: o.amount for o in orphans}
        for r in made_up:
            assert (r.project, r.assignment, r.machine, r.model) == (
                PROJECT, f"{PROJECT}-a1", "m1", "tiny",
            )  # fmt: skip
            assert r.usage is not None and r.usage.estimated
            assert r.cost_usd * FX["CAD"] == amounts[r.id]
        spent_usd = sum((r.cost_usd for r in records), Decimal(0))
        spent = store.spent(project_scope(PROJECT))
        assert spent == micro(spent_usd * FX["CAD"]), (spent, spent_usd)
        assert spent / FX["CAD"] == spent_usd
        assert store.spent(f"machine:{PROJECT}:m1") == spent
        assert spent <= budget
        state = store.describe(project_scope(PROJECT))
        assert state is not None and state.reserved == 0
        # Every fault happened: answers, upstream errors, resets, clients gone, a dead proxy.
        statuses = Counter(r.status for r in records)
        errors = [r.error or "" for r in records]
        assert statuses[200] and statuses[500], statuses
        assert any("reset" in e or "closed" in e for e in errors if e != ORPHAN_ERROR), [
            (kind_of(r), r.status, r.error, r.cost_usd) for r in records
        ]
        assert any("client disconnected" in e.lower() for e in errors), errors
        served = [r for r in records if r.status == 200 and r.error is None]
        assert all(r.cost_usd == (PROMPT_TOKENS + MAX_TOKENS) * CAD_PER_TOKEN / 2 for r in served)

        # -- the ledger, posted from the spool ------------------------------------------------
        index = SqliteTrafficStore(tmp_path / "index.sqlite")
        stack.callback(index.close)
        assert index.catch_up(root.traffic_logs) >= len(records)
        ledger = Ledger.of(root, PROJECT)
        ledger.open(PROJECT, budget, "CAD", FX, dt.date.today(), funding="t1")
        posted = post_usage(ledger, index, PROJECT)
        assert posted.usd == spent_usd
        assert posted.flows == len([r for r in records if r.provider and r.model])
        outcome = reconcile(ledger, index, PROJECT)
        assert outcome.ok, [line.describe("CAD") for line in outcome.mismatches]
        assert bean_check(ledger.path) == []
        entries, _ = ledger.load()
        expensed = sum(
            (
                Decimal(p.units.number or 0)
                for t in entries
                if isinstance(t, data.Transaction)
                for p in t.postings
                if p.account.startswith(INFERENCE_ROOT + ":") and p.units is not None
            ),
            Decimal(0),
        )
        assert abs(expensed - spent) < Decimal("0.005"), (expensed, spent)
        assert expensed == spent  # 6 decimals in the ledger, micro-units in the counters


def test_the_sweeper_takes_the_spools_word_for_an_orphan(tmp_path: Path) -> None:
    """An orphan already in the spool is settled at its spooled cost, and gets no second line."""
    budget = Budget()
    with taddons.context(budget) as tctx:
        tctx.configure(budget, autovibe_data=str(tmp_path), autovibe_budget_orphan_s=0)
        store, spool = budget.store, budget.spool
        assert store is not None and spool is not None
        now = time.time()
        store.ensure_scope(project_scope("p"), Decimal(1), "CAD", "once", now)
        note = {
            "ts_start": now - 10, "method": "POST", "url": "http://up/v1/completions",
            "host": "up", "path": "/v1/completions", "request_bytes": 40, "project": "p",
            "trial": "t1", "assignment": "p-a1", "machine": "m1", "provider": "local",
            "model": "tiny", "prompt_tokens": 104, "completion_tokens": 100,
            "currency": "CAD", "fx": "2",
        }  # fmt: skip
        held = Decimal("0.01")
        for rid in ("died", "settle-failed", "sweeper-died"):
            store.reserve(rid, [project_scope("p")], held, now - 10, {FLOW_NOTE: note})
        store.reserve("payment:1", [project_scope("p")], held, now - 10)
        opened = {o.reservation_id: o for o in store.open_reservations(now)}
        # Its settle failed (the store was down): capture spooled the flow at its actual cost.
        spool.append(orphan_record(opened["settle-failed"], note, held).model_copy(
            update={"cost_usd": Decimal("0.002"), "error": None, "usage": None}
        ))  # fmt: skip
        # A sweeper wrote the orphan's record, then died before settling it.
        spool.append(orphan_record(opened["sweeper-died"], note, held))

        assert budget.sweep() == 4
        assert budget.sweep() == 0
        spool.close()
        records = [
            FlowRecord.model_validate_json(line)
            for path in (tmp_path / "traffic-logs" / "p").glob("*/flows.jsonl")
            for line in path.read_bytes().splitlines()
        ]
        by_id = Counter(r.id for r in records)
        assert by_id == Counter({"died": 1, "settle-failed": 1, "sweeper-died": 1}), by_id
        (died,) = [r for r in records if r.id == "died"]
        assert (died.error, died.cost_usd, died.assignment) == (ORPHAN_ERROR, held / 2, "p-a1")
        assert died.usage is not None and died.usage.completion_tokens == 100
        # The payment (no flow noted) at its reservation, the rest as the spool says.
        assert store.spent(project_scope("p")) == held + Decimal("0.004") + held + held
        assert store.open_reservations(time.time() + 1) == []
        budget.done()


def test_a_proxy_killed_after_capture_leaves_a_flow_the_sweeper_settles(tmp_path: Path) -> None:
    """The proxy's own addon chain, in its order: when a flow ends, capture spools it before
    budget settles it. Killed between the two, the proxy leaves a spooled flow and an open
    reservation; the next proxy's sweep settles it at the spooled cost, so the counters never
    hold spend the spool (and the ledger posted from it) does not know of."""
    from mitmproxy import http
    from mitmproxy.test import tflow

    from budget import from_micro, machine_scope, open_ample, to_micro
    from contracts.config import load_prices
    from contracts.credentials import MachineIdentity, load_or_create_key, mint
    from proxy import addon

    root = DataRoot.at(tmp_path)
    identity = MachineIdentity(PROJECT, "t1", f"{PROJECT}-a1", "m1", time.time() + 3600)
    open_ample(root.budget_counters, PROJECT, [identity.machine], currency="CAD")
    token = mint(load_or_create_key(root), identity)
    chain = [type(a)() for a in addon.addons]  # fresh instances, in the proxy's order
    names = [type(a).__name__ for a in chain]
    assert names.index("Capture") < names.index("Budget")
    configs = Path(__file__).resolve().parents[2] / "configs"
    body = json.dumps({"model": "tiny", "messages": [], "max_tokens": 8}).encode()
    answer = json.dumps(
        {"id": "c1", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5}}
    ).encode()
    with taddons.context(*chain) as tctx:
        tctx.options.update(
            autovibe_data=str(root.root), autovibe_configs=str(configs),
            autovibe_model_hosts="127.0.0.1:9", autovibe_indexer=False,
        )  # fmt: skip
        flow = tflow.tflow()
        flow.request = http.Request.make(
            "POST", "http://127.0.0.1:9/v1/chat/completions", body,
            {"Content-Type": "application/json",
             "Proxy-Authorization": "Basic " + base64.b64encode(
                 f"{identity.machine}:{token}".encode()).decode()},
        )  # fmt: skip
        for hook in ("requestheaders", "request"):
            for a in chain:
                getattr(a, hook, lambda f: None)(flow)
        assert flow.response is None, flow.response and flow.response.content
        flow.response = http.Response.make(200, answer, {"Content-Type": "application/json"})
        for a in chain:
            getattr(a, "responseheaders", lambda f: None)(flow)
        # `response` up to capture; the proxy dies before budget's turn.
        for a in chain[: names.index("Capture") + 1]:
            getattr(a, "response", lambda f: None)(flow)
        (record,) = [
            FlowRecord.model_validate_json(line)
            for path in root.traffic_logs.glob("*/*/flows.jsonl")
            for line in path.read_bytes().splitlines()
        ]
        assert record.id == flow.id and record.cost_usd > 0
        cad = record.cost_usd * load_prices(configs).fx["CAD"]
        assert record.budget is not None and record.budget.endswith(
            f"settled {cad.quantize(Decimal('0.000001'))} on response"
        ), record.budget
    # The next proxy on the same data root: its first sweep finds the orphan in the spool.
    budget = Budget()
    with taddons.context(budget) as tctx:
        tctx.configure(budget, autovibe_data=str(root.root), autovibe_budget_orphan_s=0)
        store = budget.store
        assert store is not None
        assert [o.reservation_id for o in store.open_reservations(time.time() + 1)] == [flow.id]
        assert budget.sweep() == 1
        assert store.open_reservations(time.time() + 1) == []
        # As any settle books it: in micro-units of the scope's currency.
        assert store.spent(machine_scope(PROJECT, identity.machine)) == from_micro(to_micro(cad))
        lines = sum(p.read_bytes().count(b"\n") for p in root.traffic_logs.glob("*/*/flows.jsonl"))
        assert lines == 1  # no second record for it
        budget.done()
