"""A 402 from the machine's daily allowance defers the assignment to the allowance's reset;
a 402 from the project budget ends it as `budget_exhausted`.

Real: mitmdump with our addons, the SQLite counter store, the scheduler with detached runners
and the built-in agent. The model server is the deterministic one, answering `return 1` with
usage (the agent only needs an answer; the budget decision is the proxy's).
"""

from __future__ import annotations

import datetime as dt
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from trial_runs import operator_api

from budget import machine_scope
from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from orchestrator import report
from orchestrator.platform import Platform
from orchestrator.scheduler import Scheduler
from orchestrator.state import Assignment, Store, Trial
from proxy.launch import mitmdump_argv, wait_ready
from tests.serving.model_harness import deterministic_server

ROOT = Path(__file__).resolve().parents[2]
DAY = 86_400
DEADLINE_S = 300
"""A run takes seconds; grading on a loaded 2-core machine has taken a minute."""
PRICES_YAML = """\
currency: USD
fx: {USD: "1", CAD: "2"}
local:
  tiny: {hourly_usd: "3600", tokens_per_hour: 3600000000}
"""
"""One USD per million tokens: a call of the built-in agent may cost about 0.01 CAD."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Platform]]:
    """Deterministic model server, real mitmdump, control API without its scheduler thread."""
    base = tmp_path_factory.mktemp("deferral")
    configs = base / "configs"
    configs.mkdir()
    shutil.copy(ROOT / "configs/models.yaml", configs / "models.yaml")
    (configs / "prices.yaml").write_text(PRICES_YAML)
    # The trials run unsandboxed (the server allows it here) from repos under pytest's folder.
    settings = Settings(
        data=base / "data", configs=configs, host="127.0.0.1", proxy_port=free_port(),
        model_port=free_port(), allow_unsandboxed=True,
        task_roots=[tmp_path_factory.getbasetemp()],
    )  # fmt: skip
    root = DataRoot.at(settings.data)
    DataRoot.ensure(root.root)
    with deterministic_server(settings, ["    return 1\n"]):
        with (root.root / "mitmdump.log").open("wb") as out:
            proxy = subprocess.Popen(mitmdump_argv(settings), stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(settings.host, settings.proxy_port, timeout=60, process=proxy)
            with operator_api(settings) as api:
                yield api
        finally:
            proxy.terminate()
            proxy.wait(timeout=15)


def task_repo(base: Path) -> Path:
    """One stub function and its test."""
    repo = base / "onekit"
    (repo / "onekit").mkdir(parents=True, exist_ok=True)
    (repo / "tests").mkdir(exist_ok=True)
    (repo / "onekit/__init__.py").write_text("")
    (repo / "onekit/one.py").write_text(
        'def one() -> int:\n    """Return 1."""\n    raise NotImplementedError\n'
    )
    (repo / "tests/test_one.py").write_text(
        "from onekit.one import one\n\n\ndef test_one():\n    assert one() == 1\n"
    )
    return repo


def trial(name: str, repo: Path, amount: str, allowance: str) -> dict[str, Any]:
    return {
        "name": name,
        "project": name,
        "budget": {"amount": amount, "currency": "CAD", "period": "monthly"},
        "machines": {"count": 1, "daily_allowance": allowance},
        "agents": ["builtin"],
        "model_pairs": ["tiny"],
        "sandbox": {"kind": "none"},
        "tasks": [
            {
                "id": "one",
                "repo": str(repo),
                "prompt": "Implement `one`.",
                "test_command": "python -m pytest -q",
                "fail_to_pass": ["tests/test_one.py::test_one"],
                "timeout_s": 120,
            }
        ],
    }


def assignment(platform: Platform, trial_id: str) -> Assignment:
    with platform.store.session() as s:
        return s.get_one(Trial, trial_id).assignments[0]


def tick_until(
    scheduler: Scheduler, platform: Platform, trial_id: str, done: Callable[[Assignment], bool]
) -> Assignment:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        scheduler.tick()
        a = assignment(platform, trial_id)
        if done(a):
            return a
        time.sleep(0.2)
    raise AssertionError(f"assignment still {a.state} after {DEADLINE_S} s: {a.result}")


def events(platform: Platform, trial_id: str, kind: str) -> list[dict[str, Any]]:
    return [e.data for e in platform.store.events_after(trial_id, 0) if e.kind == kind]


@pytest.mark.slow
def test_machine_allowance_402_defers_to_its_reset_then_runs_again(
    stack: tuple[TestClient, Platform], tmp_path: Path
) -> None:
    client, platform = stack
    resp = client.post("/v1/trials", json=trial("daily", task_repo(tmp_path), "5", "0.001"))
    assert resp.status_code == 201, resp.text
    trial_id = resp.json()["id"]
    clock = [time.time()]
    scheduler = Scheduler(platform, clock=lambda: clock[0])

    a = tick_until(scheduler, platform, trial_id, lambda a: a.state not in ("queued", "running"))
    reset = (int(time.time()) // DAY + 1) * DAY  # the machine allowance is daily, UTC
    reset_iso = dt.datetime.fromtimestamp(reset, dt.UTC).isoformat().replace("+00:00", "Z")
    assert (a.state, a.machine, a.attempts) == ("deferred", None, 1), a.result
    assert a.not_before == dt.datetime.fromtimestamp(reset, dt.UTC).replace(tzinfo=None)
    assert a.result is not None and a.result["agent"]["exit_cause"] == "budget_exhausted"
    deferred = events(platform, trial_id, "assignment_deferred")
    assert deferred == [
        {
            "assignment": a.id,
            "scope": machine_scope("daily", "m1"),
            "not_before": reset_iso,
            "attempt": 1,
        }
    ]
    view = client.get(f"/v1/trials/{trial_id}").json()
    assert (view["status"], view["assignments"][0]["state"]) == ("running", "deferred")
    rep = report.build(platform, trial_id)
    assert rep.to_json()["deferred"] == [{"assignment": a.id, "not_before": reset_iso}]
    assert (rep.rows[0].pending, rep.rows[0].deferred) == (1, 1)
    artifacts = platform.root.assignment_dir("daily", trial_id, a.id)
    assert not (artifacts / "result.json").exists()
    assert (artifacts / "result-attempt1.json").exists()

    # Before the reset nothing starts.
    clock[0] = reset - 1
    scheduler.tick()
    assert assignment(platform, trial_id).state == "deferred"

    # The new day: the allowance is there again (the proxy's clock cannot be moved, so the
    # day's spend is made room for by raising the limit), and the scheduler's clock passes
    # the reset.
    counters = platform.counters()
    try:
        counters.ensure_scope(machine_scope("daily", "m1"), Decimal(1), "CAD", "daily", time.time())
    finally:
        counters.close()
    clock[0] = reset + 1
    a = tick_until(scheduler, platform, trial_id, lambda a: a.state == "finished")
    assert (a.attempts, a.exit_cause, a.not_before) == (2, "finished", None), a.result
    started = events(platform, trial_id, "assignment_started")
    assert [e["attempt"] for e in started] == [1, 2]
    assert (artifacts / "result.json").exists()
    assert scheduler.judges.wait(60)  # the confidence judge scores off the tick
    scheduler.tick()
    with platform.store.session() as s:
        assert s.get_one(Trial, trial_id).status == "finished"


@pytest.mark.slow
def test_project_budget_402_ends_as_budget_exhausted(
    stack: tuple[TestClient, Platform], tmp_path: Path
) -> None:
    client, platform = stack
    resp = client.post("/v1/trials", json=trial("broke", task_repo(tmp_path), "0.001", "1"))
    assert resp.status_code == 201, resp.text
    trial_id = resp.json()["id"]
    scheduler = Scheduler(platform)

    a = tick_until(scheduler, platform, trial_id, lambda a: a.state not in ("queued", "running"))
    assert (a.state, a.exit_cause, a.not_before, a.attempts) == (
        "finished",
        "budget_exhausted",
        None,
        1,
    )
    assert events(platform, trial_id, "assignment_deferred") == []
    flows = platform.index.flows(assignment=a.id)
    assert [f.budget for f in flows if f.status == 402] == [
        "refused budget_exhausted by project:broke"
    ]


def test_state_db_of_an_earlier_version_gains_the_column(tmp_path: Path) -> None:
    """`not_before` is added in place: a state DB created before it keeps working."""
    path = tmp_path / "state.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE trials (id VARCHAR(32) PRIMARY KEY, name VARCHAR(64) UNIQUE,
            project VARCHAR(64), status VARCHAR(16), config JSON, created_at DATETIME,
            finished_at DATETIME);
        CREATE TABLE assignments (id VARCHAR(48) PRIMARY KEY, trial_id VARCHAR(32)
            REFERENCES trials (id), "index" INTEGER, task_id VARCHAR(64), agent VARCHAR(64),
            model VARCHAR(64), state VARCHAR(16), machine VARCHAR(32), attempts INTEGER,
            status VARCHAR(16), exit_cause VARCHAR(32), result JSON, started_at DATETIME,
            finished_at DATETIME);
        INSERT INTO trials VALUES ('t1', 'old', 'p', 'running', '{}', '2025-01-01 00:00:00',
            NULL);
        INSERT INTO assignments VALUES ('t1-000', 't1', 0, 'x', 'builtin', 'tiny', 'queued',
            NULL, 0, NULL, NULL, NULL, NULL, NULL);
        """
    )
    db.close()
    store = Store(f"sqlite:///{path}")
    with store.session() as s:
        a = s.get_one(Assignment, "t1-000")
        assert (a.state, a.not_before) == ("queued", None)
        a.state, a.not_before = "deferred", dt.datetime(2025, 1, 2)
    Store(f"sqlite:///{path}")  # opening it again changes nothing
    with store.session() as s:
        assert s.get_one(Assignment, "t1-000").not_before == dt.datetime(2025, 1, 2)
