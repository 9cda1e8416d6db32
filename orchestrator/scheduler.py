"""The scheduler: starts queued assignments on free machines and collects the finished ones.

Crash-safe by construction: an assignment is marked `running` before its runner starts, the
runner holds a lock while alive and writes `result.json` last. On any tick — including the
first after a restart — a running assignment is either still locked (wait), has a result
(collect it once), or has neither (its runner never started or died: run it again).

The confidence judge (an LLM call, seconds) runs off the tick, on the scheduler's `Judges`
thread: an ending is recorded at once with its confidence pending (`pending_confidence`), and
a trial is finished only once every score is in. Pending scores are looked for on every tick,
so those a stop or a crash left are scored again after the restart.

A tick is bounded: it starts at most `STARTS_PER_TICK` and records at most `ENDINGS_PER_TICK`
assignments per trial, and the loop ticks again at once while some were left for the next. The
endings a tick collects are recorded together with the starts it makes, in one write transaction
per trial (one commit, one fsync): the endings' spend is posted before it, the runners are
launched after it. A crash before its commit records neither (the next tick collects the endings
again, their postings made once, and picks the starts again); after it, the starts are running
assignments that `_collect` finds, as before.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from budget import iso
from budget.scopes import JUDGE_MACHINE
from contracts.config import Confidence, Egress, Task, TrialConfig
from contracts.credentials import (
    CREDENTIAL_GRACE_S,
    MachineIdentity,
    mint,
    platform_proxy_url,
    proxy_env,
    proxy_url,
    revoke,
)
from contracts.egress import payments_url
from contracts.providers import PLACEHOLDER_KEY
from contracts.results import AssignmentResult, ConfidenceGate
from contracts.routing import write_policy
from ledger.payments import purchases_preamble
from orchestrator.alerts import BudgetWatch, machine_day_refusal
from orchestrator.mirrors import Mirrors, RepoError
from orchestrator.platform import Platform
from orchestrator.setup_access import BRIDGED_HOST, setup_env
from orchestrator.state import (
    ASSIGNMENT_DONE,
    ASSIGNMENT_WAITING,
    TRIAL_ACTIVE,
    Assignment,
    Trial,
    stored_config,
    utcnow,
)
from orchestrator.supervisor import ModelSupervisor
from workers.agents import get_agent
from workers.driver import WithEndNotice
from workers.result import read_patch, read_result
from workers.spec import AssignmentSpec, SandboxSpec, read_spec, task_fields

log = logging.getLogger("autovibe.scheduler")

JUDGE_RETRY_S = 30.0
"""A judge job that failed unexpectedly (not a judge that is down: that scores tests-only) is
submitted again by the tick after this long."""
STARTS_PER_TICK = 8
"""At most this many assignments of a trial start in one tick; the rest in the next, which the
loop runs at once. Bounds the tick's time (each start writes a policy, a spec, a credential)."""
ENDINGS_PER_TICK = 8
"""At most this many endings of a trial are recorded in one tick; the rest in the next."""
_ZERO = Decimal(0)


@dataclass(frozen=True)
class InfraFailure:
    """An ending that is the platform's fault: never scored as the agent's."""

    cause: str
    """`model_unreachable` (the model plane failed the agent's calls) or `infra` (the runner
    died, could not start or failed outside the agent)."""
    detail: str


@dataclass(frozen=True)
class _Ending:
    """An ending settled (spend posted), to be recorded."""

    assignment_id: str
    trial_id: str
    config: TrialConfig
    result: AssignmentResult
    failure: InfraFailure | None
    unscored: bool
    cost: Decimal


def pending_confidence(gate: Confidence) -> ConfidenceGate:
    """`result.confidence` from an assignment's ending until the judge has scored it."""
    return ConfidenceGate(pending=True, score=None, accepted=None, threshold=gate.threshold)


class Judges:
    """One background thread that scores assignments' confidence one at a time (the model plane
    answers one call at a time anyway), so that a slow judge never holds up the tick."""

    def __init__(self, score: Callable[[str], None]) -> None:
        self._score = score
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._cond = threading.Condition()
        self._wanted: set[str] = set()
        """Queued or being scored: submitted again, an assignment is not queued twice."""
        self._retry_at: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self._stopped = False

    def submit(self, assignment_id: str) -> None:
        """Score this assignment in the background; a no-op once stopped."""
        with self._cond:
            if self._stopped or assignment_id in self._wanted:
                return
            if time.monotonic() < self._retry_at.get(assignment_id, 0.0):
                return
            self._wanted.add(assignment_id)
            if self._thread is None:
                # Daemon: a judge call in flight must not hold up the process's exit; what it
                # leaves pending is scored again after the restart.
                self._thread = threading.Thread(target=self._run, name="judges", daemon=True)
                self._thread.start()
        self._queue.put(assignment_id)

    def wait(self, timeout: float) -> bool:
        """Wait until everything submitted is scored; False if `timeout` (s) passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._wanted, timeout)

    def stop(self, timeout: float = 10) -> None:
        """Take no more work, drop what is queued (it stays pending in the state DB) and wait
        up to `timeout` for the call in flight."""
        with self._cond:
            self._stopped = True
            thread = self._thread
        self._queue.put(None)
        if thread is not None:
            thread.join(timeout=timeout)

    def _run(self) -> None:
        while (assignment_id := self._queue.get()) is not None:
            try:
                if not self._stopped:
                    self._score(assignment_id)
            except Exception:  # the tick submits it again; the error is in the log with its trace
                log.exception("confidence of %s not scored; tried again later", assignment_id)
                with self._cond:
                    self._retry_at[assignment_id] = time.monotonic() + JUDGE_RETRY_S
            finally:
                with self._cond:
                    self._wanted.discard(assignment_id)
                    self._cond.notify_all()


class Scheduler:
    def __init__(
        self, platform: Platform, interval_s: float = 0.5, clock: Callable[[], float] = time.time
    ):
        self.p = platform
        self.interval_s = interval_s
        self.clock = clock
        """Epoch seconds; when deferred assignments are due (tests move it on)."""
        self.alerts = BudgetWatch(platform)
        self._stop = threading.Event()
        self._wake = threading.Event()
        """Set to tick now: by a driver when a runner ends (`WithEndNotice`), and by `stop`."""
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.judges = Judges(self.score_confidence)
        self.supervisor = ModelSupervisor(platform.settings, self._announce)
        self._swept = False
        self._specs: dict[str, AssignmentSpec] = {}
        """Running assignment -> the spec its runner was given: written at launch, read from
        spec.json once (after a restart), never read again on every tick."""
        self._settled: dict[str, set[str]] = {}
        """Trial -> its ended assignments whose confidence is not pending: no longer looked at."""
        self._configs: dict[str, TrialConfig] = {}
        """Active trial -> its config, read once: a trial's config never changes once stored."""
        self._launcher = ThreadPoolExecutor(STARTS_PER_TICK, thread_name_prefix="launch")
        """The threads a tick's starts run on (`_start_all`), kept: a thread started per start
        cost more than the start's own work on a loaded machine."""

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)
        self.judges.stop()
        self._launcher.shutdown(wait=False)

    def _loop(self) -> None:
        while not self._stop.is_set():
            # Cleared before the tick: a runner that ends during it wakes the next at once.
            self._wake.clear()
            more = False
            try:
                more = self.tick()
            except Exception:  # keep scheduling; the error is in the log with its trace
                log.exception("scheduler tick failed")
            if not more:
                self._wake.wait(self.interval_s)

    # -- one pass ----------------------------------------------------------------------------
    def tick(self) -> bool:
        """One pass over the active trials; True when starts or endings were left for the next
        (`STARTS_PER_TICK`, `ENDINGS_PER_TICK`)."""
        more = False
        with self._lock:
            with self.p.store.session() as s:
                trial_ids = list(s.scalars(select(Trial.id).where(Trial.status.in_(TRIAL_ACTIVE))))
            if not self._swept:
                self._rescore_cancelled()
                self._swept = True
            if trial_ids:
                # Before collecting: the assignments that hit the gap are run again on a
                # restarted server, not on a dead one.
                self.supervisor.check()
            # What is kept of trials that ended or were cancelled meanwhile.
            for gone in self._configs.keys() - set(trial_ids):
                del self._configs[gone]
            for gone in self._settled.keys() - set(trial_ids):
                del self._settled[gone]
            for trial_id in trial_ids:
                more |= self._step(trial_id)
                self._maybe_finish(trial_id)
            self.alerts.check(trial_ids)
            self.p.post_closed_hours()
        return more

    def _announce(self, kind: str, data: dict[str, object]) -> None:
        """One event on the stream of every active trial."""
        with self.p.store.session() as s:
            for trial_id in s.scalars(select(Trial.id).where(Trial.status.in_(TRIAL_ACTIVE))):
                self.p.store.add_event(s, trial_id, kind, **data)

    def _config(self, trial_id: str) -> TrialConfig:
        """The trial's config, read from the state DB once."""
        config = self._configs.get(trial_id)
        if config is None:
            with self.p.store.session() as s:
                stored = s.scalars(select(Trial.config).where(Trial.id == trial_id)).one()
            config = self._configs[trial_id] = stored_config(stored)
        return config

    def _step(self, trial_id: str) -> bool:
        """Collect the trial's endings and start assignments on its free machines, recorded in
        one transaction; True if endings or starts were left for the next tick."""
        config = self._config(trial_id)
        running, endings = self._collect(config, trial_id)
        settled = self._settle_all(endings)
        ended = {assignment_id for assignment_id, _ in endings}
        # Each ending's machine is free whatever became of it (recorded, retried, deferred).
        busy = {machine for i, machine in running.items() if i not in ended}
        with self.p.store.session() as s:
            recorded = self._record_all(s, settled)
            starting, left = self._mark_starts(s, config, trial_id, busy)
        self._score_later(recorded)
        # Committed as running first: a crash from here on is found by _collect, never lost.
        self.finish_all(self._start_all(config, trial_id, starting))
        return len(endings) == ENDINGS_PER_TICK or left

    def _collect(
        self, config: TrialConfig, trial_id: str
    ) -> tuple[dict[str, str | None], list[tuple[str, AssignmentResult]]]:
        """The trial's running assignments (id -> machine), and those of them that ended, at
        most `ENDINGS_PER_TICK`, with their endings."""
        with self.p.store.session() as s:
            # The columns it needs, not whole rows: ~200 running on every tick at fleet scale.
            rows = s.execute(
                select(Assignment.id, Assignment.attempts, Assignment.machine).where(
                    Assignment.trial_id == trial_id, Assignment.state == "running"
                )
            ).all()
        driver = self.p.driver(config.driver, config.nomad)
        endings: list[tuple[str, AssignmentResult]] = []
        for assignment_id, attempts, _machine in rows:
            if len(endings) == ENDINGS_PER_TICK:
                break
            # A malformed control file ends its own assignment, never the tick.
            try:
                spec = self._specs.get(assignment_id) or self._spec_on_disk(
                    config, trial_id, assignment_id
                )
            except (OSError, ValueError) as exc:
                endings.append(
                    (assignment_id, AssignmentResult.infra(assignment_id, _unreadable("spec", exc)))
                )
                continue
            if spec is not None:
                self._specs[assignment_id] = spec
                result_path = spec.result_path
            else:
                result_path = self._artifacts(config, trial_id, assignment_id) / "result.json"
            try:
                result = (
                    read_result(result_path, assignment_id)
                    if os.path.lexists(result_path)
                    else None
                )
            except (OSError, ValueError) as exc:
                infra = AssignmentResult.infra(assignment_id, _unreadable("result", exc))
                endings.append((assignment_id, infra))
                continue
            if result is not None:
                endings.append((assignment_id, result.kept()))
            elif spec is not None and driver.alive(spec):
                continue
            else:
                endings.append((assignment_id, _lost(assignment_id, attempts)))
        return {assignment_id: machine for assignment_id, _, machine in rows}, endings

    def _mark_starts(
        self, s: Session, config: TrialConfig, trial_id: str, busy: set[str | None]
    ) -> tuple[list[Assignment], bool]:
        """Mark due assignments running on the trial's free machines (not `busy`), at most
        `STARTS_PER_TICK`, in the caller's transaction; and whether some that could start were
        left for the next tick."""
        free = [f"m{i}" for i in range(1, config.machines.count + 1) if f"m{i}" not in busy]
        if not free:
            return [], False
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC).replace(tzinfo=None)
        # One more than can start: whether any is left for the next tick.
        wanted = min(len(free), STARTS_PER_TICK) + 1
        due = list(
            s.scalars(
                select(Assignment)
                .where(
                    Assignment.trial_id == trial_id,
                    or_(
                        Assignment.state == "queued",
                        and_(
                            Assignment.state == "deferred",
                            or_(Assignment.not_before.is_(None), Assignment.not_before <= now),
                        ),
                    ),
                )
                .order_by(Assignment.index)
                .limit(wanted)
            )
        )
        starting: list[Assignment] = []
        for a in due:
            if not free or len(starting) == STARTS_PER_TICK:
                break
            a.state, a.machine, a.not_before = "running", free.pop(0), None
            a.attempts += 1
            a.started_at = utcnow()
            if not starting:
                # The trial's first start: its status alone, not the row with its config.
                first = s.execute(
                    update(Trial)
                    .where(Trial.id == trial_id, Trial.status == "queued")
                    .values(status="running")
                )
                if cast(CursorResult[Any], first).rowcount:
                    self.p.store.add_event(s, trial_id, "trial_started")
            self.p.store.add_event(
                s,
                trial_id,
                "assignment_started",
                assignment=a.id,
                machine=a.machine,
                task=a.task_id,
                agent=a.agent,
                model=a.model,
                attempt=a.attempts,
            )
            starting.append(a)
        return starting, bool(free) and len(due) > len(starting)

    def _start_all(
        self, config: TrialConfig, trial_id: str, starting: Sequence[Assignment]
    ) -> list[tuple[str, AssignmentResult]]:
        """Write each start's routing policy and launch its runner, the starts side by side; the
        endings of those that failed to launch.

        Each start's files are written durably (fsync'd) and each launch may wait for its
        runner; one machine's start never waits for another's: in series, a wave's fsyncs were
        most of the tick at fleet scale (8 starts, 4 fsyncs each), and a local launch waits for
        its runner's Python to take its lock."""
        if not starting:
            return []
        driver = self.p.driver(config.driver, config.nomad)
        if isinstance(driver, WithEndNotice):
            driver.on_end(self._wake.set)
        # Loaded (or made) here, not by the starts at once: its file has a fixed temp name.
        self.p.credential_key  # noqa: B018
        # The budget preamble of every start in this tick: the trial's spend read once.
        spent_usd = self._spent_usd(trial_id)

        def start(a: Assignment) -> AssignmentSpec:
            spec = self._spec(config, trial_id, a, spent_usd)
            driver.launch(spec)
            return spec

        failed: list[tuple[str, AssignmentResult]] = []
        for a in starting:
            self._specs.pop(a.id, None)
        launches = [(a, self._launcher.submit(start, a)) for a in starting]
        for a, launch in launches:
            try:
                self._specs[a.id] = launch.result()
            except (OSError, RepoError) as exc:
                failed.append((a.id, AssignmentResult.infra(a.id, f"launch failed: {exc}")))
        return failed

    def _maybe_finish(self, trial_id: str) -> None:
        """Finish the trial once every assignment has ended and every score is in."""
        settled = self._settled.setdefault(trial_id, set())
        with self.p.store.session() as s:
            # Counts, not rows: the trial's 1,000 assignments are not read on every tick.
            counts = dict(
                s.execute(
                    select(Assignment.state, func.count())
                    .where(Assignment.trial_id == trial_id)
                    .group_by(Assignment.state)
                ).all()
            )
            done = sum(n for st, n in counts.items() if st in ASSIGNMENT_DONE)
            unscored = []
            if done > len(settled):
                ended = s.scalars(
                    select(Assignment.id).where(
                        Assignment.trial_id == trial_id, Assignment.state.in_(ASSIGNMENT_DONE)
                    )
                )
                # Only endings not yet seen settled are read: a score once in stays in.
                unsettled = [i for i in ended if i not in settled]
                for start in range(0, len(unsettled), 500):  # under any DB's limit of parameters
                    chunk = unsettled[start : start + 500]
                    # The stored endings alone, not whole rows.
                    endings = select(Assignment.id, Assignment.result).where(
                        Assignment.id.in_(chunk)
                    )
                    for assignment_id, ending in s.execute(endings):
                        if AssignmentResult.stored(ending).confidence_pending:
                            unscored.append(assignment_id)
                        else:
                            settled.add(assignment_id)
            # Queued again on every tick (a no-op while queued): after a restart, too.
            for assignment_id in unscored:
                self.judges.submit(assignment_id)
            if done < sum(counts.values()) or unscored:
                return
            trial = s.get_one(Trial, trial_id)
            if trial.status in TRIAL_ACTIVE:
                del self._settled[trial_id]
                trial.status = "finished"
                trial.finished_at = utcnow()
                self.p.store.add_event(s, trial_id, "trial_finished", **_tally(trial))

    def _rescore_cancelled(self) -> None:
        """Queue the scores a stop left pending in cancelled trials, which the tick skips."""
        with self.p.store.session() as s:
            rows = s.scalars(
                select(Assignment)
                .join(Trial)
                .where(Trial.status == "cancelled", Assignment.state == "finished")
            )
            unscored = [a.id for a in rows if a.ending.confidence_pending]
        for assignment_id in unscored:
            self.judges.submit(assignment_id)

    # -- endings -------------------------------------------------------------------------------
    def infra_failure(self, assignment_id: str, result: AssignmentResult) -> InfraFailure | None:
        """Why this ending is the platform's failure and not the agent's, or None.

        The runner's own error; the agent's word (`model_unreachable`); or, for any adapter, an
        unresolved ending whose last call through the proxy failed (5xx or no response).
        """
        if result.cancelled:
            return None
        if result.infra_error is not None:
            return InfraFailure("infra", result.infra_error)
        if result.agent is not None and result.agent.exit_cause == "model_unreachable":
            return InfraFailure("model_unreachable", result.agent.detail)
        if result.grade is not None and result.grade.status == "resolved":
            return None
        failures = self.p.call_failures(assignment_id)
        if failures.last_failed:
            return InfraFailure(
                "model_unreachable",
                f"its last model call failed ({failures.last_error}); "
                f"{failures.failed} of {failures.calls} calls failed",
            )
        return None

    def _retry(self, assignment_id: str, config: TrialConfig, failure: InfraFailure) -> bool:
        """Queue a running assignment again after an infrastructure failure, while its trial
        allows retries; its result is set aside and its credential stays valid."""
        with self.p.store.session() as s:
            a = s.get_one(Assignment, assignment_id)
            if a.state != "running" or a.attempts > config.assignment.infra_retries:
                return False
            self._set_aside(config, a)
            a.state, a.machine = "queued", None
            self.p.store.add_event(
                s,
                a.trial_id,
                "assignment_retried",
                assignment=a.id,
                attempt=a.attempts,
                cause=failure.cause,
                detail=failure.detail,
            )
        log.warning(
            "assignment %s: %s (%s); run again", assignment_id, failure.cause, failure.detail
        )
        return True

    def _set_aside(self, config: TrialConfig, a: Assignment) -> None:
        """Keep an attempt's result beside the next one's, so its runner starts afresh."""
        artifacts = self._artifacts(config, a.trial_id, a.id)
        if (artifacts / "result.json").exists():
            os.replace(artifacts / "result.json", artifacts / f"result-attempt{a.attempts}.json")

    def finish(self, assignment_id: str, result: AssignmentResult) -> None:
        """Record an assignment's ending once: post its metered spend, then mark it done.

        An agent stopped by its machine's daily allowance alone (the project can still pay) is
        deferred instead: queued again until the allowance resets, then run afresh.
        """
        self.finish_all([(assignment_id, result)])

    def finish_all(self, endings: Sequence[tuple[str, AssignmentResult]]) -> None:
        """`finish` for several endings: every spend posted first (a project's usage once), then
        every ending recorded in one transaction. A crash in between records none of them; the
        next tick finishes them again, and the postings are made once (`post_spend`)."""
        settled = self._settle_all(endings)
        if not settled:
            return
        with self.p.store.session() as s:
            recorded = self._record_all(s, settled)
        self._score_later(recorded)

    def _settle_all(self, endings: Sequence[tuple[str, AssignmentResult]]) -> list[_Ending]:
        """Defer, retry or post the spend of each ending (`_settle`); what to record."""
        if not endings:
            return []
        configs: dict[str, TrialConfig] = {}
        with self.p.store.session() as s:
            found = _by_id(s, [assignment_id for assignment_id, _ in endings])
            rows = [found[assignment_id] for assignment_id, _ in endings]
            for a in rows:
                if a.trial_id not in configs:
                    configs[a.trial_id] = self._configs.get(a.trial_id) or stored_config(
                        s.get_one(Trial, a.trial_id).config
                    )
        posted: set[str] = set()
        settled: list[_Ending] = []
        for a, (_, result) in zip(rows, endings, strict=True):
            self._specs.pop(a.id, None)
            config = configs[a.trial_id]
            ending = self._settle(a, config, result, usage_posted=config.project in posted)
            if ending is not None:
                posted.add(config.project)
                settled.append(ending)
        return settled

    def _record_all(self, s: Session, settled: Sequence[_Ending]) -> list[_Ending]:
        """Record settled endings in the caller's transaction; those that were not yet."""
        if not settled:
            return []
        # One query for the batch: a get per ending would flush the previous one's changes.
        current = _by_id(s, [e.assignment_id for e in settled])
        return [e for e in settled if self._record(s, current[e.assignment_id], e)]

    def _score_later(self, recorded: Sequence[_Ending]) -> None:
        """After the endings' commit: hand those that await their confidence to the judges; the
        others are settled, which `_maybe_finish` then need not read back."""
        for e in recorded:
            if e.unscored:
                self.judges.submit(e.assignment_id)
            else:
                self._settled.setdefault(e.trial_id, set()).add(e.assignment_id)

    def _settle(
        self, a: Assignment, config: TrialConfig, result: AssignmentResult, *, usage_posted: bool
    ) -> _Ending | None:
        """Defer, retry or post the spend of an ending; what to record, or None when there is
        nothing (more) to record."""
        assignment_id = a.id
        exit_cause = result.agent.exit_cause if result.agent is not None else None
        if a.state == "running" and exit_cause == "budget_exhausted":
            deferral = machine_day_refusal(self.p, config, a)
            if deferral is not None:
                # Kept aside, so that the next attempt's runner starts instead of returning
                # this result; the spend is posted once, when the assignment really ends.
                # The credential stays valid (revocation is per assignment id, for good); it
                # expires on its own, and the spent allowance refuses it until the reset.
                self._set_aside(config, a)
                with self.p.store.session() as s:
                    a = s.get_one(Assignment, assignment_id)
                    if a.state != "running":
                        return None
                    until = dt.datetime.fromtimestamp(deferral.until, dt.UTC)
                    a.state, a.machine = "deferred", None
                    a.not_before = until.replace(tzinfo=None)
                    a.ending = result.model_copy(update={"deferred_until": iso(deferral.until)})
                    self.p.store.add_event(
                        s,
                        a.trial_id,
                        "assignment_deferred",
                        assignment=a.id,
                        scope=deferral.scope,
                        not_before=iso(deferral.until),
                        attempt=a.attempts,
                    )
                return None
        if a.state in ASSIGNMENT_DONE:
            revoke(self.p.root, assignment_id)
            return None
        failure = self.infra_failure(assignment_id, result)
        if failure is not None and self._retry(assignment_id, config, failure):
            return None
        revoke(self.p.root, assignment_id)
        cost = self.post_spend(config, a, usage_posted=usage_posted)
        unscored = (
            failure is None
            and config.confidence.enabled
            and result.grade is not None
            and result.confidence is None
        )
        if failure is not None:
            result = result.model_copy(
                update={"infra_error": failure.detail, "infra_cause": failure.cause}
            )
        if unscored:
            result = result.model_copy(update={"confidence": pending_confidence(config.confidence)})
        return _Ending(assignment_id, a.trial_id, config, result, failure, unscored, cost)

    def _record(self, s: Session, a: Assignment, e: _Ending) -> bool:
        """Mark the assignment done with its ending, in the caller's transaction; False when it
        already was."""
        config, result, failure = e.config, e.result, e.failure
        if a.state in ASSIGNMENT_DONE:
            return False
        a.finished_at = utcnow()
        a.ending = result.model_copy(update={"cost": e.cost, "currency": config.budget.currency})
        if result.cancelled:
            a.state, a.exit_cause = "cancelled", "cancelled"
        elif failure is not None:
            a.state, a.status, a.exit_cause = "failed", "infra_error", failure.cause
        else:
            # Not an infra_error, so the runner wrote both (`RunnerResult._one_shape`).
            assert result.grade is not None and result.agent is not None
            a.state = "finished"
            a.status = result.grade.status
            a.exit_cause = result.agent.exit_cause
        self.p.store.add_event(
            s,
            a.trial_id,
            f"assignment_{a.state}",
            assignment=a.id,
            status=a.status,
            exit_cause=a.exit_cause,
            cost=str(e.cost),
            currency=config.budget.currency,
            **({"confidence": "pending"} if e.unscored else {}),
            **({"detail": failure.detail} if failure is not None else {}),
        )
        return True

    def judge_proxy(self, config: TrialConfig, trial_id: str, assignment_id: str) -> str:
        """The proxy URL the confidence judge calls through: a credential of machine
        `judge` of the trial's project, for `<assignment>-judge` (its cost is the project's,
        not the judged agent's), valid for the judge's timeout."""
        st = self.p.settings
        return platform_proxy_url(
            self.p.credential_key, st.host, st.proxy_port, machine=JUDGE_MACHINE,
            project=config.project, trial=trial_id, assignment=assignment_id,
            lifetime_s=config.confidence.timeout_s * 4,
        )  # fmt: skip

    def score_confidence(self, assignment_id: str) -> None:
        """Score a pending confidence with the trial's judge and record it once; below the
        threshold the assignment is flagged `needs_review`. Runs on the `Judges` thread."""
        with self.p.store.session() as s:
            a = s.get_one(Assignment, assignment_id)
            config = stored_config(s.get_one(Trial, a.trial_id).config)
            result, task_id = a.ending, a.task_id
        if not result.confidence_pending:
            return
        # Imported here: DeepEval takes seconds to import, the API should not wait for it.
        from orchestrator import confidence

        patch = read_patch(self._artifacts(config, a.trial_id, assignment_id))
        st = self.p.settings
        gate = confidence.assess_result(
            config, task_id, result, patch, st.model_url,
            proxy=self.judge_proxy(config, a.trial_id, assignment_id),
        )  # fmt: skip
        with self.p.store.session() as s:
            # Locked (PostgreSQL): a scheduler of another process may score it at the same time.
            a = s.get_one(Assignment, assignment_id, with_for_update=True)
            if not a.ending.confidence_pending:
                return
            a.ending = a.ending.model_copy(update={"confidence": gate})
            self.p.store.add_event(
                s,
                a.trial_id,
                "confidence_scored",
                assignment=a.id,
                confidence=gate.score,
                accepted=gate.accepted,
            )
            if not gate.accepted:
                # Not `assignment_…`: followers count those as endings.
                self.p.store.add_event(
                    s,
                    a.trial_id,
                    "needs_review",
                    assignment=a.id,
                    confidence=gate.score,
                    threshold=gate.threshold,
                    reason=gate.reason,
                )

    def post_spend(
        self, config: TrialConfig, a: Assignment, *, usage_posted: bool = False
    ) -> Decimal:
        """Post the project's metered usage (hourly, exactly once; not again when `usage_posted`
        by this batch of endings) and the assignment's VM time to the ledger; return the
        assignment's metered cost in the budget currency."""
        # Posting the batch's usage caught the index up: the later endings of the batch read it.
        usage = (
            self.p.index.usage(assignment=a.id) if usage_posted else self.p.usage(assignment=a.id)
        )
        if not usage_posted:
            self.p.post_usage(config.project)
        self.p.post_vm_time(config, a)
        cost_usd = sum((u.cost_usd for u in usage), start=_ZERO)
        return self.p.in_currency(cost_usd, config.budget.currency)

    # -- specs -----------------------------------------------------------------------------------
    def _artifacts(self, config: TrialConfig, trial_id: str, assignment_id: str) -> Path:
        return self.p.root.assignment_dir(config.project, trial_id, assignment_id)

    def _spec_on_disk(
        self, config: TrialConfig, trial_id: str, assignment_id: str
    ) -> AssignmentSpec | None:
        """The spec this assignment's runner was given, None before its launch; `OSError` or
        `ValueError` when it is not a regular file, malformed, or not this assignment's."""
        artifacts = self._artifacts(config, trial_id, assignment_id)
        if not os.path.lexists(artifacts / "spec.json"):
            return None
        spec = read_spec(artifacts)
        if (spec.assignment, spec.artifacts) != (assignment_id, artifacts):
            raise ValueError(
                f"it is {spec.assignment!r}'s in {spec.artifacts}, not {assignment_id!r}'s"
            )
        return spec

    def _spec(
        self, config: TrialConfig, trial_id: str, a: Assignment, spent_usd: Decimal | None = None
    ) -> AssignmentSpec:
        """The assignment's spec, its routing policy written; `spent_usd`: the trial's spend
        when the caller read it already (for a batch of starts)."""
        if spent_usd is None:
            spent_usd = self._spent_usd(trial_id)
        task = next(t for t in config.tasks if t.id == a.task_id)
        machine = a.machine or "m1"
        # The credential carries the worker's egress lists: the proxy applies them per caller.
        egress = self.p.catalog.egress
        lists = egress.of_trial(config) if egress is not None else Egress()
        identity = MachineIdentity(
            project=config.project,
            trial=trial_id,
            assignment=a.id,
            machine=machine,
            expires=time.time() + task.timeout_s + CREDENTIAL_GRACE_S,
            task=task.id,
            egress_allow=None if lists.allow is None else tuple(lists.allow),
            egress_tcp_allow=None if lists.tcp_allow is None else tuple(lists.tcp_allow),
        )
        pair = self.p.catalog.models.pairs.get(a.model.split(":")[0])
        context = min(pair.normal.context, pair.thinking.context) if pair else None
        write_policy(self.p.root, identity, a.model, config.routing, context=context)
        st = self.p.settings
        sandbox = None
        if config.sandbox.kind == "bwrap":
            sandbox = SandboxSpec(
                proxy_host=st.host,
                proxy_port=st.proxy_port,
                network=config.sandbox.network,
                transparent_port=st.proxy_transparent_port or None,
                dns_port=st.proxy_dns_port or None,
                memory_mb=config.sandbox.memory_mb,
                cpus=config.sandbox.cpus,
                processes=config.sandbox.processes,
                tmp_mb=config.sandbox.tmp_mb,
                workspace_mb=config.sandbox.workspace_mb,
                host_uid=st.sandbox_uid,
                hidden=[self.p.root.root],
                # The agent's install folder (<data>/agents/<name>/) is under the hidden root.
                read_only=[
                    self.p.root.ca_cert,
                    *get_agent(a.agent, self.p.root.root).read_only_paths(self.p.root.root),
                    # The `command` agent's program, were it under the data root's tasks.
                    *(
                        [Path(task.agent_command[0])]
                        if a.agent == "command"
                        and task.agent_command
                        and "/" in task.agent_command[0]
                        else []
                    ),
                ],
            )
        # In the sandbox the proxy is bridged onto its loopback, whatever host it listens on.
        host = BRIDGED_HOST if sandbox else st.host
        credential = mint(self.p.credential_key, identity)
        proxy = proxy_url(host, st.proxy_port, machine, credential)
        # A provider's model is called at its real host through the proxy, which puts the key in.
        endpoint, model = self.p.catalog.endpoint(a.model)
        env = {
            **proxy_env(proxy, self.p.root.ca_cert),
            "OPENAI_BASE_URL": endpoint,
            "OPENAI_API_KEY": PLACEHOLDER_KEY,
            "ANTHROPIC_BASE_URL": endpoint.removesuffix("/v1"),
            "AUTOVIBE_MODEL_ENDPOINT": endpoint,
            "AUTOVIBE_MODEL": model,
            "AUTOVIBE_MACHINE": machine,
            "AUTOVIBE_ASSIGNMENT": a.id,
            # The payment broker, reached by name through the proxy (proxy.addons.egress), and
            # the credential the agent already holds in its proxy URL, as its bearer token.
            "AUTOVIBE_PAYMENTS_URL": payments_url(
                config.project,
                # A transparent worker has no proxy to name the broker: the API's address,
                # which its environment's gateway rewrite turns into the gateway's.
                f"{_bracketed(st.host)}:{st.api_port}"
                if sandbox is not None and sandbox.network == "transparent"
                else None,
            ),
            "AUTOVIBE_MACHINE_TOKEN": credential,
        }
        return AssignmentSpec(
            assignment=a.id,
            project=config.project,
            trial=trial_id,
            machine=machine,
            **task_fields(task),
            repo=self._task_folder(task),
            prompt=self.prompt(config, spent_usd, task.prompt),
            agent=a.agent,
            agent_command=task.agent_command or [] if a.agent == "command" else [],
            model=model,
            endpoint=endpoint,
            env=env,
            setup_env=setup_env(
                st,
                self.p.credential_key,
                self.p.root,
                task=task,
                project=config.project,
                trial=trial_id,
                assignment=a.id,
                sandboxed=sandbox is not None,
            ),
            artifacts=self._artifacts(config, trial_id, a.id),
            data_root=self.p.root.root,
            sandbox=sandbox,
        )

    def _task_folder(self, task: Task) -> Path:
        """The folder a workspace is copied from: the task's own, or for a repo named by URL
        its commit's tree exported from the mirror (no history); RepoError when unusable."""
        if isinstance(task.repo, Path):
            return task.repo
        mirrors = Mirrors(self.p.root)
        commit = task.commit or mirrors.resolve(task.repo, ref=task.ref)
        return mirrors.tree(task.repo, commit)

    def _spent_usd(self, trial_id: str) -> Decimal:
        """What the trial's metered calls cost so far, in USD."""
        return sum((u.cost_usd for u in self.p.usage(trial=trial_id)), start=_ZERO)

    def prompt(self, config: TrialConfig, spent_usd: Decimal, task_prompt: str) -> str:
        """The task prompt, preceded by the budget preamble every agent gets (`spent_usd`: the
        trial's spend so far)."""
        b = config.budget
        left = max(b.amount - self.p.in_currency(spent_usd, b.currency), _ZERO)
        return (
            "## Budget\n"
            f"Project {config.project} has {left:.4f} {b.currency} left of its "
            f"{b.amount:.2f} {b.currency} {b.period} budget; this machine may spend "
            f"{config.machines.daily_allowance:.2f} {b.currency} per day. Every model call is "
            "metered and priced, and refused once a budget is spent: spend as if it were "
            "your own money.\n\n"
            f"{purchases_preamble(self.p.payment_policy())}"
            "## Task\n"
            f"{task_prompt.strip()}\n"
        )


def _bracketed(host: str) -> str:
    """`host` as the host of a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def _by_id(s: Session, ids: Sequence[str]) -> dict[str, Assignment]:
    """The assignments of `ids` (a tick's batch, a few), in one query."""
    return {a.id: a for a in s.scalars(select(Assignment).where(Assignment.id.in_(ids)))}


def _lost(assignment_id: str, attempts: int) -> AssignmentResult:
    """The ending of a running assignment with no runner alive and no result."""
    return AssignmentResult.infra(
        assignment_id, f"runner died without a result (attempt {attempts})"
    )


def _unreadable(name: str, exc: Exception) -> str:
    """An infra_error's text for a control file the scheduler could not read."""
    reason = str(exc).strip().replace("\n", "; ") or type(exc).__name__
    return f"{name}.json unreadable: {type(exc).__name__}: {reason}"


def _tally(trial: Trial) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in trial.assignments:
        key = a.status or a.state
        out[key] = out.get(key, 0) + 1
    return out


def cancel(platform: Platform, trial_id: str) -> None:
    """Stop a trial: queued assignments never start, running ones are killed, spend is posted."""
    with platform.store.session() as s:
        trial = s.get_one(Trial, trial_id)
        if trial.status not in TRIAL_ACTIVE:
            return
        config = stored_config(trial.config)
        trial.status = "cancelled"
        trial.finished_at = utcnow()
        running = [a.id for a in trial.assignments if a.state == "running"]
        for a in trial.assignments:
            if a.state in ASSIGNMENT_WAITING:
                a.state = "cancelled"
        platform.store.add_event(s, trial_id, "trial_cancelled")
    scheduler = Scheduler(platform)
    for assignment_id in running:
        try:
            spec = scheduler._spec_on_disk(config, trial_id, assignment_id)
        except (OSError, ValueError) as exc:
            log.warning("assignment %s not stopped: %s", assignment_id, _unreadable("spec", exc))
            spec = None
        if spec is not None:
            platform.driver(config.driver, config.nomad).cancel(spec)
        scheduler.finish(assignment_id, AssignmentResult(assignment=assignment_id, cancelled=True))
