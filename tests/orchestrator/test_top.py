"""`autovibe top` against the real control API (uvicorn on a free port) on a small trial state:
one running and one finished assignment, metered traffic in the spool, spend in the budget
counters. `--once` must show the expected rows and figures."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.console import Console
from traffic_harness import llm_call
from trial_runs import served_api
from typer.testing import CliRunner

from budget import machine_scope, project_scope
from contracts.dataroot import DataRoot
from contracts.settings import PROJECT_ROOT, Settings, free_port
from orchestrator.client import Client
from orchestrator.platform import Platform
from orchestrator.state import Assignment
from orchestrator.top import Frame, Scope, Top, render, run, top
from traffic.spool import Spool


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Settings, Platform]]:
    """The control API served for real (no scheduler: the test sets the trial's state)."""
    settings = Settings(
        data=tmp_path / "data", configs=PROJECT_ROOT / "configs", api_port=free_port()
    )
    with served_api(settings) as platform:
        yield settings, platform


def settle(platform: Platform, scopes: list[str], amount: str) -> None:
    store = platform.counters()
    try:
        rid = uuid.uuid4().hex
        store.reserve(rid, scopes, Decimal(amount))
        store.settle(rid, Decimal(amount), "response")
    finally:
        store.close()


@pytest.fixture
def trial(served: tuple[Settings, Platform], demo_trial: dict[str, Any]) -> str:
    """The demo trial: assignment 000 running on m1, 001 finished, the rest queued."""
    settings, platform = served
    trial_id: str = Client(settings).submit(demo_trial)["id"]
    running, finished = f"{trial_id}-000", f"{trial_id}-001"
    with platform.store.session() as s:
        a = s.get_one(Assignment, running)
        a.state, a.machine = "running", "m1"
        platform.store.add_event(
            s, trial_id, "assignment_started", assignment=running, machine="m1", task=a.task_id,
            agent=a.agent, model=a.model, attempt=1,
        )  # fmt: skip
        b = s.get_one(Assignment, finished)
        b.state, b.machine, b.status, b.exit_cause = "finished", None, "resolved", "finished"
        b.result = {"wall_s": 65.0, "cost": "0.012300", "currency": "CAD"}
        platform.store.add_event(
            s, trial_id, "assignment_finished", assignment=finished, status="resolved",
            exit_cause="finished", cost="0.012300", currency="CAD",
        )  # fmt: skip
    spool = Spool(DataRoot.at(settings.data))
    spool.append(llm_call(trial_id, running, "tiny", "0.5"))
    spool.close()
    settle(platform, [project_scope("demo"), machine_scope("demo", "m1")], "0.69")
    return trial_id


def test_once_shows_workers_budgets_and_events(
    served: tuple[Settings, Platform], trial: str
) -> None:
    settings, _ = served
    console = Console(record=True, width=220)
    run(Top(Client(settings), trial), console, once=True)
    text = console.export_text()
    # Workers: the focused trial's assignments, with machine, state, elapsed and spend.
    running = next(line for line in text.splitlines() if f"{trial}-000" in line)
    assert re.search(r"builtin\s+│\s+tiny\s+│\s+m1\s+│\s+running\s+│\s+0m0\ds", running), running
    finished = next(line for line in text.splitlines() if f"{trial}-001" in line)
    assert "finished" in finished and "1m05s" in finished and "0.0123 CAD" in finished
    assert f"{trial}-002" in text and "queued" in text
    # The trial's spend: 0.5 USD metered at 1.38 CAD per USD, of a 5.00 CAD budget.
    assert "spent 0.6900 of 5.00 CAD" in text
    assert "4 queued, 1 running, 1 finished" in text
    # Budgets from /metrics: the project and its machines' days.
    project = next(line for line in text.splitlines() if "project:demo" in line)
    assert "0.6900 / 5.00 CAD" in project and "14%" in project
    assert project.rstrip("│ ").endswith("—")  # seconds of spend: no burn rate yet
    assert text.index("project:demo") < text.index("machine:demo:m1") < text.index("task:")
    assert "0.6900 / 1.00 CAD" in next(
        line for line in text.splitlines() if "machine:demo:m1" in line
    )
    assert "0.0000 / 1.00 CAD" in next(
        line for line in text.splitlines() if "machine:demo:m2" in line
    )
    # Events, newest first.
    assert text.index("assignment_finished") < text.index("assignment_started")
    assert text.index("assignment_started") < text.index("trial_submitted")


def test_burn_rate_between_refreshes(served: tuple[Settings, Platform], trial: str) -> None:
    settings, platform = served
    watcher = Top(Client(settings), trial)
    start = time.time()
    watcher.frame(now=start)
    settle(platform, [project_scope("demo"), machine_scope("demo", "m1")], "0.25")
    later = watcher.frame(now=start + 1800)  # 0.25 CAD in half an hour
    assert later.burn[project_scope("demo")] == pytest.approx(0.5)
    assert later.burn[machine_scope("demo", "m1")] == pytest.approx(0.5)
    # Remaining 1.00 - 0.94 = 0.06 CAD on m1 at 0.5 CAD/h: 7m12s.
    console = Console(record=True, width=220)
    console.print(render(later))
    m1 = next(line for line in console.export_text().splitlines() if "machine:demo:m1" in line)
    assert "0.5000 CAD" in m1 and "7m12s" in m1


def test_render_on_a_fixed_frame() -> None:
    frame = Frame(
        now=1_700_000_000,
        trials=[],
        scopes=[
            Scope("project:p", "USD", limit=10, spent=4, reserved=0, remaining=6),
            Scope("machine:p:m1", "USD", limit=1, spent=1, reserved=0, remaining=0),
            Scope("machine:p:m2", "USD", limit=1, spent=0, reserved=0, remaining=1),
        ],
        events=[],
        burn={"project:p": 2.0, "machine:p:m1": 0.5, "machine:p:m2": 0.0},
    )
    console = Console(record=True, width=200)
    console.print(render(frame))
    lines = console.export_text().splitlines()
    project = next(line for line in lines if "project:p" in line)
    assert "4.0000 / 10.00 USD" in project and "40%" in project and "3h00m" in project
    assert "spent" in next(line for line in lines if "machine:p:m1" in line)
    assert "never at this rate" in next(line for line in lines if "machine:p:m2" in line)


def test_the_command_prints_one_frame(
    served: tuple[Settings, Platform], trial: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, _ = served
    monkeypatch.setenv("AUTOVIBE_DATA", str(settings.data))
    monkeypatch.setenv("AUTOVIBE_API_PORT", str(settings.api_port))
    app = typer.Typer()
    app.command()(top)
    result = CliRunner().invoke(app, ["--once", "--trial", trial], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"{trial}-000" in result.output and "project:demo" in result.output
    missing = CliRunner().invoke(app, ["--once", "--trial", "nope"])
    assert missing.exit_code == 1
    assert "no trial 'nope'" in missing.output
