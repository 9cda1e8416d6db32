"""Fleet scale for `python -m bench.harness`: the scheduler and the state DB with 1,000 queued
assignments and 200 simulated machines.

The real API app (`create_app`, served by uvicorn in this process, as `autovibe up` runs it) and
the real `Scheduler` with its state DB (SQLite, and PostgreSQL when the machine has it:
`tests/ops/postgres_harness.py`), the trial submitted through `POST /v1/trials`; only the
worker driver is simulated. `SimulatedDriver` is put in the platform's driver cache under
`local`, so the scheduler calls it as it calls the local driver: `launch` writes the spec as
the local driver does and starts a runner that sleeps and then writes its `result.json`, `alive`
answers while it sleeps, and the scheduler hears each end (`on_end`) as it hears the local
driver's runners end. Measured: each tick's time, the time from a runner's end to its ending
being recorded, and the latency of `GET /v1/trials/{id}` polled by another process meanwhile.

    python -m bench.fleet [--quick] [--state sqlite|postgresql] [--profile FILE]

runs the fleet part alone and prints its rows (`python -m bench.harness` publishes them);
`--profile` writes a cProfile of the scheduler's ticks (pstats format).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import heapq
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlalchemy import select

from bench.report import table
from contracts.config import NomadCluster
from contracts.dataroot import atomic_write, write_secret_file
from contracts.results import AgentResult, GradeResult, RunnerResult
from contracts.settings import Settings, free_port
from orchestrator.api import create_app
from orchestrator.client import Client
from orchestrator.scheduler import Scheduler
from orchestrator.state import Assignment
from workers.spec import AssignmentSpec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "ops"))
import postgres_harness  # noqa: E402  the tests' throwaway PostgreSQL cluster: one way to start it

RUN_S = 2.0
"""How long a simulated runner sleeps before it reports."""
POLL_S = 0.25
"""How often the other process asks for the trial while the fleet runs."""


class SimulatedDriver:
    """Runners that sleep `run_s` and report `resolved`; no process, no sandbox."""

    name = "simulated"

    def __init__(self, cluster: NomadCluster | None = None, *, run_s: float = 2.0) -> None:
        self.run_s = run_s
        self.ended: dict[str, float] = {}
        """Assignment -> when its runner wrote result.json (epoch seconds)."""
        self._due: list[tuple[float, str, Path]] = []
        self._running: set[str] = set()
        self._cond = threading.Condition()
        self._listeners: set[Callable[[], None]] = set()
        self._thread = threading.Thread(target=self._report, name="simulated-runners", daemon=True)
        self._thread.start()

    def launch(self, spec: AssignmentSpec) -> None:
        spec.artifacts.mkdir(parents=True, exist_ok=True)
        write_secret_file(spec.artifacts / "spec.json", spec.model_dump_json(indent=2))
        with self._cond:
            self._running.add(spec.assignment)
            heapq.heappush(self._due, (time.time() + self.run_s, spec.assignment, spec.result_path))
            self._cond.notify()

    def on_end(self, wake: Callable[[], None]) -> None:
        """As the local driver: the scheduler hears each runner end."""
        with self._cond:
            self._listeners.add(wake)

    def alive(self, spec: AssignmentSpec) -> bool:
        with self._cond:
            return spec.assignment in self._running

    def cancel(self, spec: AssignmentSpec) -> None:
        with self._cond:
            self._running.discard(spec.assignment)

    def _report(self) -> None:
        while True:
            with self._cond:
                while not self._due or self._due[0][0] > time.time():
                    self._cond.wait(None if not self._due else self._due[0][0] - time.time())
                due, assignment, result_path = heapq.heappop(self._due)
            result = RunnerResult(
                assignment=assignment,
                started=due - self.run_s,
                finished=time.time(),
                wall_s=self.run_s,
                agent=AgentResult(exit_cause="finished", exit_code=0),
                grade=GradeResult(status="resolved"),
            )
            atomic_write(result_path, result.model_dump_json())
            with self._cond:
                self.ended[assignment] = time.time()
                self._running.discard(assignment)
                listeners = list(self._listeners)
            for wake in listeners:
                wake()


class TimedScheduler(Scheduler):
    """The scheduler, each tick timed (wall, and the CPU of the scheduler's own thread: the
    figure that noise from other processes on the machine leaves alone)."""

    ticks: list[float]
    cpu: list[float]
    profile: cProfile.Profile | None = None

    def tick(self) -> bool:
        started, cpu = time.perf_counter(), time.thread_time()
        if self.profile is not None:
            self.profile.enable()
        try:
            return super().tick()
        finally:
            if self.profile is not None:
                self.profile.disable()
            self.cpu.append(time.thread_time() - cpu)
            self.ticks.append(time.perf_counter() - started)


def _poll(api_url: str, token: str, trial_id: str, ready: Any, stop: Any, out: Any) -> None:
    """In another process: GET the trial every POLL_S until stopped; put the latencies."""
    latencies = []
    with httpx.Client(
        base_url=api_url, headers={"Authorization": f"Bearer {token}"}, trust_env=False
    ) as client:
        client.get(f"/v1/trials/{trial_id}", timeout=60).raise_for_status()  # connected, warm
        ready.set()
        while not stop.is_set():
            started = time.perf_counter()
            client.get(f"/v1/trials/{trial_id}", timeout=60).raise_for_status()
            latencies.append(time.perf_counter() - started)
            stop.wait(POLL_S)
    out.put(latencies)


def run_fleet(
    work: Path,
    state: str,
    state_url: str,
    assignments: int,
    machines: int,
    run_s: float = RUN_S,
    profile: cProfile.Profile | None = None,
) -> dict[str, Any]:
    """One trial of `assignments` on `machines` simulated machines; the row of figures."""
    (work / "tasks" / "tiny").mkdir(parents=True)
    (work / "tasks" / "tiny" / "README.md").write_text("nothing to do\n")
    settings = Settings(
        data=work, configs=ROOT / "configs", api_port=free_port(), state_url=state_url
    )
    app = create_app(settings, run_scheduler=False)
    platform = app.state.platform
    driver = SimulatedDriver(run_s=run_s)
    platform.drivers["local"] = driver  # the cache `Platform.driver` answers from
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.host, port=settings.api_port, log_level="warning")
    )
    serving = threading.Thread(target=server.run, name="api", daemon=True)
    serving.start()
    while not server.started:
        time.sleep(0.05)
    client = Client(settings)
    per_task = min(100, assignments)
    config = {
        "name": f"fleet-{state}",
        "project": "fleet",
        "budget": {"amount": 1000, "currency": "CAD", "period": "once"},
        "machines": {"count": machines, "daily_allowance": 100},
        "agents": ["command"],
        "model_pairs": ["tiny"],
        "assignment": {"trials_per_task": per_task},
        "tasks": [
            {
                "id": f"t{i:03d}",
                "repo": str(work / "tasks" / "tiny"),
                "prompt": "nothing",
                "test_command": "true",
                "fail_to_pass": ["t"],
                "agent_command": ["true"],
                "timeout_s": 60,
            }
            for i in range(assignments // per_task)
        ],
        "confidence": {"enabled": False},
    }
    trial_id = client.submit(config)["id"]
    scheduler = TimedScheduler(platform)
    scheduler.ticks, scheduler.cpu, scheduler.profile = [], [], profile
    context = multiprocessing.get_context("spawn")
    ready, stop, out = context.Event(), context.Event(), context.Queue()
    token = client.http.headers["Authorization"].removeprefix("Bearer ")
    poller = context.Process(
        target=_poll, args=(settings.api_url, token, trial_id, ready, stop, out)
    )
    poller.start()
    ready.wait(timeout=120)
    started = time.perf_counter()
    scheduler.start()
    try:
        while client.trial(trial_id)["status"] not in ("finished", "cancelled"):
            time.sleep(1)
        wall = time.perf_counter() - started
    finally:
        stop.set()
        latencies = out.get(timeout=120)
        poller.join()
        scheduler.stop()
        server.should_exit = True
        serving.join(timeout=10)
    with platform.store.session() as s:
        rows = list(s.scalars(select(Assignment).where(Assignment.trial_id == trial_id)))
        states = {a.state for a in rows}
        lags = [_epoch(a.finished_at) - driver.ended[a.id] for a in rows]
    platform.store.engine.dispose()
    ticks = scheduler.ticks
    return {
        "state_db": state,
        "assignments": len(rows),
        "machines": machines,
        "runner_s": run_s,
        "ended": "/".join(sorted(states)),
        "wall_s": round(wall, 1),
        "ticks": len(ticks),
        "tick_p50_ms": round(1000 * statistics.median(ticks), 1),
        "tick_p99_ms": round(1000 * _p(ticks, 99), 1),
        "tick_max_ms": round(1000 * max(ticks), 1),
        "tick_cpu_p50_ms": round(1000 * statistics.median(scheduler.cpu), 1),
        "tick_cpu_p99_ms": round(1000 * _p(scheduler.cpu, 99), 1),
        "collect_p50_s": round(statistics.median(lags), 3),
        "collect_p99_s": round(_p(lags, 99), 3),
        "api_get_p50_ms": round(1000 * statistics.median(latencies), 1),
        "api_get_p99_ms": round(1000 * _p(latencies, 99), 1),
        "api_gets": len(latencies),
    }


def _epoch(moment: dt.datetime | None) -> float:
    assert moment is not None
    return moment.replace(tzinfo=dt.UTC).timestamp()


def _p(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def measure(
    quick: bool,
    states: tuple[str, ...] = ("sqlite", "postgresql"),
    profile: cProfile.Profile | None = None,
) -> list[dict[str, Any]]:
    """SQLite, then PostgreSQL where the machine has it (a throwaway cluster, fsync off)."""
    assignments, machines = (100, 20) if quick else (1000, 200)
    rows = []
    with tempfile.TemporaryDirectory(prefix="autovibe-bench-fleet-") as tmp:
        if "sqlite" in states:
            work = Path(tmp) / "sqlite"
            rows.append(run_fleet(work, "sqlite", "", assignments, machines, profile=profile))
        if "postgresql" in states and postgres_harness.PG_BIN:
            with postgres_harness.cluster() as url:
                work = Path(tmp) / "postgresql"
                rows.append(
                    run_fleet(work, "postgresql", url, assignments, machines, profile=profile)
                )
    return rows


def notes(rows: list[dict[str, Any]]) -> str:
    """The fleet section of the benchmark's notes."""
    if not rows:
        return "Fleet scale was not measured in this run (--no-fleet)."
    missing = (
        ""
        if any(r["state_db"] == "postgresql" for r in rows)
        else " PostgreSQL is not installed here (no /usr/lib/postgresql/*/bin/pg_ctl), so only "
        "SQLite was measured."
    )
    return f"""Fleet scale (`bench/fleet.py`): the API app served by uvicorn in-process with the
real scheduler (ticking every 0.5 s) and state DB, a trial submitted through `POST /v1/trials`,
runners simulated by `SimulatedDriver` (each sleeps `runner_s`, then writes its result.json).
`tick_*`: one scheduler pass (`tick_cpu_*`: the CPU of the scheduler's own thread in it, which
the other processes of a shared machine leave alone); `collect_*`: a runner's result.json written
to its ending recorded (spend posted); `api_get_*`: `GET /v1/trials/{{id}}` from another
process every {POLL_S} s.{missing}

{table(rows)}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100 assignments on 20 machines")
    parser.add_argument("--state", choices=("sqlite", "postgresql"), action="append")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the ticks here")
    args = parser.parse_args()
    profile = cProfile.Profile() if args.profile else None
    states = tuple(args.state or ("sqlite", "postgresql"))
    for row in measure(args.quick, states, profile):
        print(json.dumps(row))
    if profile is not None:
        profile.dump_stats(args.profile)


if __name__ == "__main__":
    main()
