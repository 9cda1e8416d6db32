"""Traffic for ledger tests: flows written to the real spool and indexed by the real index."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path

from contracts.dataroot import DataRoot
from contracts.records import FlowRecord, Usage
from traffic.spool import Spool
from traffic.sqlite_store import SqliteTrafficStore

FX = {"CAD": Decimal("1.38"), "USD": Decimal("1")}


def at(day: dt.date, hour: int, minute: int = 0) -> float:
    """A UNIX time on `day` at `hour:minute` UTC."""
    return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=dt.UTC).timestamp()


def flow(
    n: int,
    ts: float,
    assignment: str | None,
    machine: str,
    provider: str,
    model: str,
    usd: str,
    *,
    project: str = "demo",
    trial: str = "t1",
) -> FlowRecord:
    return FlowRecord(
        id=f"f{n}",
        ts_start=ts,
        ts_end=ts + 1,
        duration_ms=1000,
        method="POST",
        url=f"https://{provider}.example/v1/chat/completions",
        host=f"{provider}.example",
        path="/v1/chat/completions",
        status=200,
        project=project,
        trial=trial,
        assignment=assignment,
        machine=machine,
        provider=provider,
        model=model,
        usage=Usage(prompt_tokens=100 + n, completion_tokens=20, total_tokens=120 + n),
        cost_usd=Decimal(usd),
    )


def spool_and_index(root: DataRoot, index: SqliteTrafficStore, flows: list[FlowRecord]) -> None:
    with Spool(root) as spool:
        for record in flows:
            spool.append(record)
    assert index.catch_up(root.traffic_logs) == len(flows)


def write_spec(root: DataRoot, project: str, trial: str, assignment: str, agent: str) -> Path:
    """The `spec.json` a driver leaves in the assignment's folder (only `agent` is read)."""
    folder = root.assignment_dir(project, trial, assignment)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps({"assignment": assignment, "agent": agent}))
    return folder / "spec.json"
