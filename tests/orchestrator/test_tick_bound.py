"""A tick is bounded (issue 22): at most `STARTS_PER_TICK` starts and `ENDINGS_PER_TICK` endings
per trial, the rest in the next tick, which `tick()` asks for by returning True. Real: Platform,
SQLite state DB, Scheduler.tick, the ledger; the runners are `bench.fleet.SimulatedDriver`'s."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from bench.fleet import SimulatedDriver
from contracts.config import TrialConfig
from contracts.dataroot import atomic_write
from contracts.results import AgentResult, GradeResult, RunnerResult
from contracts.settings import PROJECT_ROOT, Settings
from orchestrator.platform import Platform
from orchestrator.scheduler import ENDINGS_PER_TICK, STARTS_PER_TICK, Scheduler
from orchestrator.state import Assignment, Trial

COUNT = 2 * STARTS_PER_TICK + 3


def _states(platform: Platform) -> dict[str, int]:
    with platform.store.session() as s:
        out: dict[str, int] = {}
        for a in s.get_one(Trial, "tb").assignments:
            out[a.state] = out.get(a.state, 0) + 1
        return out


def _trial(tmp_path: Path, count: int, machines: int | None = None) -> Platform:
    """A platform with trial `tb` of `count` queued assignments on as many machines (or
    `machines`)."""
    platform = Platform.from_settings(
        Settings(data=tmp_path / "data", configs=PROJECT_ROOT / "configs")
    )
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "README.md").write_text("nothing to do\n")
    config = TrialConfig.model_validate(
        {
            "name": "bound",
            "project": "demo",
            "budget": {"amount": "1"},
            "machines": {"count": machines or count},
            "agents": ["command"],
            "model_pairs": ["tiny"],
            "confidence": {"enabled": False},
            "tasks": [
                {
                    "id": "t",
                    "repo": str(tmp_path / "task"),
                    "prompt": "nothing",
                    "test_command": "true",
                    "fail_to_pass": ["t"],
                    "agent_command": ["true"],
                }
            ],
        }
    )
    with platform.store.session() as s:
        s.add(
            Trial(
                id="tb",
                name="bound",
                project="demo",
                status="queued",
                config=config.model_dump(mode="json"),
            )
        )
        for i in range(count):
            s.add(
                Assignment(
                    id=f"tb-{i:03d}",
                    trial_id="tb",
                    index=i,
                    task_id="t",
                    agent="command",
                    model="tiny",
                )
            )
    platform.open_ledger(config, "tb")
    return platform


def _write_result(platform: Platform, aid: str) -> None:
    """What a runner writes last: its result.json, resolved."""
    result = RunnerResult(
        assignment=aid,
        started=1.0,
        finished=2.0,
        wall_s=1.0,
        agent=AgentResult(exit_cause="finished", exit_code=0),
        grade=GradeResult(status="resolved"),
    )
    atomic_write(
        platform.root.assignment_dir("demo", "tb", aid) / "result.json", result.model_dump_json()
    )


def test_a_wave_starts_and_ends_over_bounded_ticks(tmp_path: Path) -> None:
    platform = _trial(tmp_path, COUNT)
    driver = SimulatedDriver(run_s=3600)  # nobody ends until this test writes the results
    platform.drivers["local"] = driver
    scheduler = Scheduler(platform)

    assert scheduler.tick() is True
    assert _states(platform) == {"running": STARTS_PER_TICK, "queued": COUNT - STARTS_PER_TICK}
    assert scheduler.tick() is True
    assert scheduler.tick() is False  # the last 3 started; no machine is waiting
    assert _states(platform) == {"running": COUNT}
    started = [e for e in platform.store.events_after("tb", 0) if e.kind == "assignment_started"]
    assert sorted(e.data["assignment"] for e in started) == [f"tb-{i:03d}" for i in range(COUNT)]

    for i in range(COUNT):
        _write_result(platform, f"tb-{i:03d}")
    assert scheduler.tick() is True
    assert _states(platform) == {"finished": ENDINGS_PER_TICK, "running": COUNT - ENDINGS_PER_TICK}
    while scheduler.tick():
        pass
    assert _states(platform) == {"finished": COUNT}
    with platform.store.session() as s:
        assert s.get_one(Trial, "tb").status == "finished"
    ended = [e for e in platform.store.events_after("tb", 0) if e.kind == "assignment_finished"]
    assert len(ended) == COUNT
    scheduler.stop()


def test_a_runner_that_ends_wakes_the_scheduler(tmp_path: Path) -> None:
    """The driver tells the scheduler when a runner ends (`WithEndNotice`): with a poll interval
    of an hour, the trial still finishes once its runners have."""
    platform = _trial(tmp_path, 2)
    platform.drivers["local"] = SimulatedDriver(run_s=0.2)
    scheduler = Scheduler(platform, interval_s=3600)
    scheduler.start()
    try:
        deadline = time.monotonic() + 60  # a bound on a hang, not a timing: it takes ~0.3 s
        while _states(platform) != {"finished": 2} and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scheduler.stop()
    assert _states(platform) == {"finished": 2}


def test_a_tick_that_fails_before_its_commit_loses_no_ending(tmp_path: Path) -> None:
    """A tick records its endings and its starts in one transaction: when the state DB refuses
    it (here a trigger refuses the start), neither is recorded, the DB is intact, and the next
    tick records the ending, once, beside the start."""
    platform = _trial(tmp_path, 3, machines=2)
    platform.drivers["local"] = SimulatedDriver(run_s=3600)
    scheduler = Scheduler(platform)
    scheduler.tick()
    assert _states(platform) == {"running": 2, "queued": 1}
    _write_result(platform, "tb-000")
    refuse = (
        "CREATE TRIGGER refuse_start BEFORE UPDATE OF state ON assignments "
        "WHEN NEW.state = 'running' BEGIN SELECT RAISE(ABORT, 'start refused'); END"
    )
    with platform.store.engine.begin() as conn:
        conn.exec_driver_sql(refuse)
    with pytest.raises(IntegrityError, match="start refused"):
        scheduler.tick()
    # Neither the ending nor the start: the transaction that held both was rolled back.
    assert _states(platform) == {"running": 2, "queued": 1}
    kinds = [e.kind for e in platform.store.events_after("tb", 0)]
    assert "assignment_finished" not in kinds
    with platform.store.engine.begin() as conn:
        assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        conn.exec_driver_sql("DROP TRIGGER refuse_start")

    scheduler.tick()
    assert _states(platform) == {"finished": 1, "running": 2}
    ended = [e for e in platform.store.events_after("tb", 0) if e.kind == "assignment_finished"]
    assert [e.data["assignment"] for e in ended] == ["tb-000"]
    scheduler.stop()


def test_a_launch_that_fails_ends_as_the_platforms_failure(tmp_path: Path) -> None:
    """A launch that fails (here the assignment's folder is a file, so its spec cannot be
    written) ends the assignment as the platform's failure, run again `infra_retries` times
    first."""
    platform = _trial(tmp_path, 1)
    platform.drivers["local"] = SimulatedDriver(run_s=3600)
    artifacts = platform.root.assignment_dir("demo", "tb", "tb-000")
    artifacts.parent.mkdir(parents=True)
    artifacts.write_text("not a folder\n")
    scheduler = Scheduler(platform)
    deadline = time.monotonic() + 60  # a bound on a hang, not a timing
    while _states(platform) != {"failed": 1} and time.monotonic() < deadline:
        scheduler.tick()
        time.sleep(0.05)
    scheduler.stop()
    with platform.store.session() as s:
        a = s.get_one(Assignment, "tb-000")
        assert (a.state, a.status, a.exit_cause, a.attempts) == (
            "failed",
            "infra_error",
            "infra",
            3,
        )
        assert a.ending.infra_error is not None
        assert a.ending.infra_error.startswith("launch failed: ")
    retried = [e for e in platform.store.events_after("tb", 0) if e.kind == "assignment_retried"]
    assert [e.data["attempt"] for e in retried] == [1, 2]
