"""The spool and the SQLite traffic index, on real files and real SQLite, across processes."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
import uuid
from decimal import Decimal
from multiprocessing.synchronize import Event
from pathlib import Path

from contracts.dataroot import DataRoot
from contracts.records import FlowRecord, Usage
from traffic.spool import Spool
from traffic.sqlite_store import SqliteTrafficStore


def record(assignment: str | None = "a1", cost: str = "0.1", **fields: object) -> FlowRecord:
    now = time.time()
    values: dict[str, object] = {
        "id": uuid.uuid4().hex,
        "ts_start": now,
        "ts_end": now + 0.5,
        "duration_ms": 500.0,
        "method": "POST",
        "url": "http://127.0.0.1:8500/v1/completions",
        "host": "127.0.0.1",
        "path": "/v1/completions",
        "status": 200,
        "project": "p1" if assignment else None,
        "trial": "t1" if assignment else None,
        "assignment": assignment,
        "machine": "m1" if assignment else None,
        "provider": "local",
        "model": "tiny",
        "usage": Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15),
        "cost_usd": Decimal(cost),
    }
    values.update(fields)
    return FlowRecord.model_validate(values)


def test_spool_lays_out_by_project_and_day(tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    with Spool(root) as spool:
        mine = spool.append(record(ts_start=1_700_000_000.0))
        anonymous = spool.append(record(assignment=None, ts_start=1_700_000_000.0))
    assert mine == root.traffic_logs / "p1" / "2023-11-14" / "flows.jsonl"
    assert anonymous == root.traffic_logs / "_unattributed" / "2023-11-14" / "flows.jsonl"
    assert json.loads(mine.read_text())["assignment"] == "a1"


def test_spool_lines_stay_whole_under_concurrent_writers(tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    # Long lines, so an interleaved write would show up as a broken line.
    big = "x" * 20_000
    with Spool(root) as spool:
        threads = [
            threading.Thread(target=lambda: [spool.append(record(error=big)) for _ in range(50)])
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    (path,) = root.traffic_logs.glob("*/*/flows.jsonl")
    lines = path.read_bytes().splitlines()
    assert len(lines) == 400
    assert all(FlowRecord.model_validate_json(line).error == big for line in lines)


def test_catch_up_takes_whole_lines_once(tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    with Spool(root) as spool:
        path = spool.append(record())
        spool.append(record())
    torn = record()
    line = torn.model_dump_json().encode() + b"\n"
    with path.open("ab") as fh:
        fh.write(line[:40])  # a writer caught mid-line

    with SqliteTrafficStore(root.traffic_index) as index:
        assert index.catch_up(root.traffic_logs) == 2
        assert index.catch_up(root.traffic_logs) == 0
        with path.open("ab") as fh:
            fh.write(line[40:])
        assert index.catch_up(root.traffic_logs) == 1
        assert torn.id in {f.id for f in index.flows(assignment="a1")}

    # A new index process picks up from the stored offsets, not from the start.
    with SqliteTrafficStore(root.traffic_index) as index:
        assert index.catch_up(root.traffic_logs) == 0
        assert len(index.flows()) == 3


def test_unreadable_line_is_kept_aside(tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    with Spool(root) as spool:
        path = spool.append(record())
    with path.open("ab") as fh:
        fh.write(b'{"not": "a flow record"}\n')
    with Spool(root) as spool:
        spool.append(record())
    with SqliteTrafficStore(root.traffic_index) as index:
        assert index.catch_up(root.traffic_logs) == 2
        ((where, offset, error),) = index.rejects()
        assert where.endswith("flows.jsonl") and offset > 0 and "id" in error


def test_usage_sums_money_exactly(tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    with Spool(root) as spool:
        for _ in range(10):
            spool.append(record(cost="0.1"))
        spool.append(record(cost="0.000000123456789", model="tiny:thinking"))
        spool.append(record(assignment="a2", cost="7"))
        spool.append(record(usage=None, cost="0", status=402))  # refused: not a metered call
        spool.append(
            record(
                cost="0.2",
                usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2, estimated=True),
            )
        )
    with SqliteTrafficStore(root.traffic_index) as index:
        index.catch_up(root.traffic_logs)
        tiny, thinking = index.usage(assignment="a1")
        assert (tiny.model, tiny.calls, tiny.estimated_calls) == ("tiny", 11, 1)
        assert tiny.cost_usd == Decimal(
            "1.2"
        )  # 10 × 0.1 + 0.2, where floats give 1.2000000000000002
        assert (tiny.prompt_tokens, tiny.completion_tokens, tiny.total_tokens) == (101, 51, 152)
        assert thinking.cost_usd == Decimal("0.000000123456789")
        assert [u.cost_usd for u in index.usage(trial="t1", assignment="a2")] == [Decimal(7)]
        assert len(index.flows(assignment="a1")) == 13


def test_full_text_search(tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    with Spool(root) as spool:
        spool.append(record(url="https://pypi.org/simple/requests/", provider=None, model=None))
        spool.append(record(error="upstream connection reset"))
    with SqliteTrafficStore(root.traffic_index) as index:
        index.catch_up(root.traffic_logs)
        (found,) = index.search("pypi")
        assert found.url == "https://pypi.org/simple/requests/"
        (failed,) = index.search("error: reset")
        assert failed.error == "upstream connection reset"


def _write(root: Path, count: int) -> None:
    with Spool(DataRoot.at(root)) as spool:
        for i in range(count):
            spool.append(record(assignment=f"a{i % 3}"))
            time.sleep(0.001)  # spread the writes so the indexers take turns


def _index(root: Path, writers_done: Event, totals: multiprocessing.Queue) -> None:
    data = DataRoot.at(root)
    added = 0
    with SqliteTrafficStore(data.traffic_index) as index:
        while not writers_done.is_set():
            added += index.catch_up(data.traffic_logs)
        added += index.catch_up(data.traffic_logs)
    totals.put(added)


def test_concurrent_indexers_neither_lose_nor_repeat(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    totals: multiprocessing.Queue = context.Queue()
    writers_done = context.Event()
    writers = [context.Process(target=_write, args=(tmp_path, 300)) for _ in range(2)]
    indexers = [
        context.Process(target=_index, args=(tmp_path, writers_done, totals)) for _ in range(3)
    ]
    for process in indexers + writers:
        process.start()
    for process in writers:
        process.join(timeout=60)
        assert process.exitcode == 0
    writers_done.set()
    for process in indexers:
        process.join(timeout=60)
        assert process.exitcode == 0
    # Each of the 600 flows was inserted by exactly one indexer, and none is missing.
    counts = [totals.get(timeout=5) for _ in indexers]
    assert sum(counts) == 600
    root = DataRoot.at(tmp_path)
    with SqliteTrafficStore(root.traffic_index) as index:
        assert index.catch_up(root.traffic_logs) == 0
        assert len(index.flows()) == 600
