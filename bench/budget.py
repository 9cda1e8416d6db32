"""Budgets under load: overspend and leaked reservations from 100 concurrent streaming calls
through the real proxy, reservations/s of the SQLite and Redis counter stores under
contention, and ledger postings/s and `bean-check` time on large ledgers.

`python -m bench.budget [--quick]`: --quick stops the ledger at 10k transactions (100k too
without it) and makes fewer reservations.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.report import publish
from budget import CounterStore, open_counters
from contracts.config import load_prices
from contracts.dataroot import DataRoot
from contracts.records import FlowRecord, Usage
from ledger.book import InferenceItem, Ledger, MetaAmount, inference_account, render_transaction
from ledger.check import bean_check
from ledger.posting import post_usage
from proxy.addons.budget import PROMPT_MARGIN_TOKENS
from traffic.spool import Spool
from traffic.sqlite_store import SqliteTrafficStore

ROOT = Path(__file__).resolve().parent.parent
# The stand-in model server and proxy launcher of the budget tests: one way to start them.
sys.path.insert(0, str(ROOT / "tests" / "budget"))
import budget_harness  # noqa: E402

CALLS, COVERED, MAX_TOKENS = 100, 10, 1000


def concurrency(store_name: str, redis_url: str, work: Path) -> dict[str, Any]:
    """100 concurrent streaming calls against a budget that covers 10 at once."""
    upstreams = budget_harness.serve()
    upstream = next(upstreams)
    options: dict[str, object] = {"autovibe_budget_store": store_name}
    if store_name == "redis":
        options["autovibe_budget_redis_url"] = redis_url
    proxy = budget_harness.start_proxy(work / "data", work / "configs", upstream, **options)
    store = open_counters(store_name, path=proxy.root.budget_counters, url=redis_url)
    project = f"bench-{store_name}"
    content = json.dumps(
        {"model": "tiny", "prompt": "hello", "max_tokens": MAX_TOKENS, "stream": True}
    ).encode()
    per_call = (len(content) + PROMPT_MARGIN_TOKENS + MAX_TOKENS) * budget_harness.CAD_PER_TOKEN
    budget = per_call * COVERED
    now = time.time()
    store.ensure_scope(f"project:{project}", budget, "CAD", "once", now)
    store.ensure_scope(f"machine:{project}:m1", Decimal(1000), "CAD", "daily", now)

    def call(_: int) -> int:
        with proxy.client(proxy.identity(project)) as client:
            return client.post(
                f"{upstream.url}/v1/completions",
                content=content,
                headers={"Content-Type": "application/json"},
            ).status_code

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=CALLS) as pool:
            statuses = list(pool.map(call, range(CALLS)))
        elapsed = time.perf_counter() - started
        spent = store.spent(f"project:{project}")
        leaked = len(store.open_reservations(time.time() + 1))
    finally:
        proxy.stop()
        store.close()
        next(upstreams, None)
    return {
        "measure": "concurrency",
        "store": store_name,
        "calls": CALLS,
        "served": statuses.count(200),
        "refused_402": statuses.count(402),
        "other_status": CALLS - statuses.count(200) - statuses.count(402),
        "budget_cad": str(budget),
        "spent_cad": str(spent),
        "overspend": str(max(spent - budget, Decimal(0))),
        "leaked_reservations": leaked,
        "seconds": round(elapsed, 2),
    }


def reservations_per_s(store: CounterStore, name: str, total: int, threads: int = 8) -> dict:
    """reserve + settle pairs from `threads` threads on the same two scopes."""
    now = time.time()
    scopes = [f"project:rate-{name}", f"machine:rate-{name}:m1"]
    for scope in scopes:
        store.ensure_scope(scope, Decimal(10**9), "CAD", "once", now)
    each = total // threads
    barrier = threading.Barrier(threads)

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(each):
            rid = f"{name}-{n}-{i}"
            store.reserve(rid, scopes, Decimal("0.001"))
            store.settle(rid, Decimal("0.0005"))

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(worker, range(threads)))
    elapsed = time.perf_counter() - started
    expected = Decimal("0.0005") * each * threads
    assert store.spent(scopes[0]) == expected, "lost or doubled a settlement"
    return {
        "measure": "reserve+settle",
        "store": name,
        "threads": threads,
        "pairs": each * threads,
        "reservations_per_s": round(each * threads / elapsed),
        "seconds": round(elapsed, 2),
    }


def ledger_at(size: int, work: Path, postings: int = 20) -> dict[str, Any]:
    """A ledger of `size` hourly usage transactions: bean-check time, and the rate of
    `post_usage` (one new hour × machine × model each, from a real spool and index) and of
    keyed `Ledger.post_inference` on it."""
    prices = load_prices(ROOT / "configs")
    fx = prices.fx["CAD"]
    root = DataRoot.at(work / f"ledger-{size}")
    ledger = Ledger.of(root, "bench")
    per_hour = 16  # 8 machines × 2 models
    now = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    first = now - dt.timedelta(hours=size // per_hour + 1)
    ledger.open("bench", Decimal(10**9), "CAD", prices.fx, first.date(), funding="bench")

    # Written directly, in the format `post_usage` writes, into the segment of each
    # transaction's month (posting 100k one by one would only measure this same path longer).
    segments: dict[str, list[str]] = defaultdict(list)
    opens = set()
    for n in range(size):
        hour = first + dt.timedelta(hours=n // per_hour)
        machine, model = f"m{n % 8}", ("tiny", "tiny:thinking")[n // 8 % 2]
        account = inference_account("local", model)
        opens.add(account)
        usd = Decimal("0.000150")
        amount = (usd * fx).quantize(Decimal("0.000001"))
        meta = {
            "hour": f"{hour:%Y-%m-%dT%H:00Z}",
            "machine": machine,
            "spool": f"history/{hour:%Y-%m-%d}/flows.jsonl",  # not the spool posted below
            "spool-from": n * 900,
            "spool-to": n * 900 + 1,
            "flows": 1,
            "first-flow": f"f{n}",
            "last-flow": f"f{n}",
        }
        leg = {
            "assignment": f"a{n // 64}",
            "trial": "t1",
            "agent": "builtin",
            "usd": MetaAmount(usd, "USD"),
            "tokens": 150,
            "flows": 1,
        }
        segments[f"{hour:%Y-%m}"].append(
            render_transaction(
                hour.date(),
                f"Usage {hour:%Y-%m-%d %H}h on {machine}: local {model}",
                meta,
                [(account, amount, leg), ("Assets:Budget:Bench", -amount, {})],
                "CAD",
            )
        )
    head = ledger.path.read_text().rstrip("\n") + "\n\n"
    head += "".join(f"{first.date()} open {a} CAD\n" for a in sorted(opens))
    ledger.path.write_text(head)
    for month, texts in segments.items():
        (ledger.journal_dir / f"{month}.beancount").write_text("\n".join(texts))
    current = ledger.journal_dir / f"{now:%Y-%m}.beancount"

    started = time.perf_counter()
    errors = bean_check(ledger.path, timeout_s=600)
    check_s = time.perf_counter() - started
    assert not errors, errors[:5]

    index = SqliteTrafficStore(root.traffic_index)
    usage_s = 0.0
    with Spool(root) as spool:
        for n in range(postings):
            ts = now.timestamp() + n
            spool.append(
                FlowRecord(
                    id=f"new-{n}",
                    ts_start=ts,
                    ts_end=ts + 1,
                    duration_ms=1000,
                    method="POST",
                    url="http://model/v1/completions",
                    host="model",
                    path="/v1/completions",
                    status=200,
                    project="bench",
                    trial="t1",
                    assignment="a-new",
                    machine="m1",
                    provider="local",
                    model="tiny",
                    usage=Usage(prompt_tokens=100, completion_tokens=50, total_tokens=150),
                    cost_usd=Decimal("0.000150"),
                )
            )
            spool.close()
            index.catch_up(root.traffic_logs)
            started = time.perf_counter()
            assert post_usage(ledger, index, "bench").transactions == 1
            usage_s += time.perf_counter() - started
    index.close()

    item = InferenceItem("local", "tiny", "m1", Decimal("0.0001"), 150, fx)
    started = time.perf_counter()
    for n in range(postings):
        on = now.date()
        ledger.post_inference(key=f"k{n}", on=on, narration="bench", items=[item], meta={})
    keyed_s = time.perf_counter() - started
    assert bean_check(ledger.path, timeout_s=600) == []
    return {
        "measure": "ledger",
        "transactions": size,
        "current_segment_transactions": len(segments.get(f"{now:%Y-%m}", [])),
        "current_segment_mb": round(current.stat().st_size / 1e6, 1),
        "bean_check_s": round(check_s, 2),
        "postings_per_s": round(postings / usage_s, 1),
        "keyed_postings_per_s": round(postings / keyed_s, 1),
    }


def timed(rows: list[dict[str, Any]], fn: Callable[[], dict[str, Any]]) -> None:
    row = fn()
    print(row, flush=True)
    rows.append(row)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.budget", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10k-transaction ledger only")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    redis_servers = budget_harness.redis_server()
    redis = next(redis_servers)
    with tempfile.TemporaryDirectory(prefix="bench-budget-") as tmp:
        work = Path(tmp)
        for name in ("sqlite", "redis"):
            timed(rows, lambda name=name: concurrency(name, redis.url, work / name))  # type: ignore[misc]
        pairs = 2000 if args.quick else 20000
        sqlite_store = open_counters("sqlite", path=work / "rate" / "counters.sqlite")
        redis_store = open_counters("redis", url=redis.url)
        timed(rows, lambda: reservations_per_s(sqlite_store, "sqlite", pairs))
        timed(rows, lambda: reservations_per_s(redis_store, "redis", pairs))
        sqlite_store.close()
        redis_store.close()
        for size in (10_000,) if args.quick else (10_000, 100_000):
            timed(rows, lambda size=size: ledger_at(size, work))  # type: ignore[misc]
    next(redis_servers, None)
    publish(
        "budget",
        "python -m bench.budget" + (" --quick" if args.quick else ""),
        rows,
        """
`overspend` (settled spend above the budget) and `leaked_reservations` (reservations still
open after every connection ended) must be 0. The concurrency rows send 100 streaming calls at
once through the real mitmdump against a budget that covers 10 at their maximum cost; the
stand-in upstream bills every token it was allowed, so served calls spend the most they can.
`reserve+settle` pairs come from 8 threads on the same two scopes (SQLite: one connection
per thread, `BEGIN IMMEDIATE`; Redis: one Lua script per call). Ledger rows: a ledger of that
many hourly usage transactions (16 an hour: 8 machines × 2 models), generated directly in the
format `ledger.posting.post_usage` writes, one journal segment per month, the last one the
current month; `bean_check_s` is the real `bean-check` on all of it. `postings_per_s`: real
`post_usage` calls on it, each posting one new flow from a real spool and index (index
catch-up not timed); `keyed_postings_per_s`: `Ledger.post_inference`, whose idempotency check
scans the journal's bytes. A write parses only the head file and validates the new text
against it, then replaces the current month's segment atomically, so its cost follows the
current segment's size, not the ledger's.
""",
    )


if __name__ == "__main__":
    main()
