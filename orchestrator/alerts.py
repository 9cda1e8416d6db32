"""What the budget counters tell the scheduler: threshold alerts, and whether a refusal can wait.

Alerts: from the scheduler's tick (at most every `interval_s`) the watch reads each active
trial's scopes (project, machine days, capped tasks) from the counter store and raises every
threshold a scope's settled spend crossed, once per trial, scope and period: a row in
`budget_alerts` (what a restarted orchestrator remembers), a `budget_alert` event on the
trial's SSE stream, and a webhook POST when the trial names one. Webhook calls run on their
own thread with retries and backoff; every failed try is an event, none stalls the scheduler.
Prometheus reads the rows and the counters (orchestrator/metrics.py).

Deferral: an agent that stopped on a 402 waits for the next period when every refusal of its
last attempt came from its machine's daily allowance while the project (and the task) still
had money. Which scope refused is read from the traffic index — the proxy's own decision,
recorded the same way whichever agent ran — not from the agent's error text, which each
agent words differently or drops.
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from budget import CounterError, ScopeState, iso
from budget.scopes import (
    daily_scope,
    machine_scope,
    machines_of,
    project_scope,
    task_scope,
    trial_scopes,
)
from contracts.config import TrialConfig
from contracts.outbound import AddressRefused, Allowlist, checked_addresses
from contracts.records import BudgetDecision
from orchestrator.state import Assignment, BudgetAlert, Store, Trial, stored_config, utcnow

if TYPE_CHECKING:
    from orchestrator.platform import Platform

log = logging.getLogger("autovibe.alerts")

ALERT_EVENT = "budget_alert"
DAILY_SPEND = "daily_spend_above"
"""The threshold label of the daily-spend alert; its scope is `daily:<project>`."""
ONCE = "once"
"""The period label of a scope that never resets."""


# -- scopes -------------------------------------------------------------------------------------


def alert_labels(trial_id: str, config: TrialConfig) -> list[tuple[str, str, str]]:
    """(project, scope, threshold) of every alert the trial may raise."""
    alerts = config.budget.alerts
    p = config.project
    labels = [(p, s, str(f)) for s in trial_scopes(trial_id, config) for f in alerts.thresholds]
    if alerts.daily_spend_above is not None:
        labels.append((p, daily_scope(p), DAILY_SPEND))
    return labels


# -- thresholds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Crossing:
    """A threshold a trial's scope has reached in its current period."""

    trial_id: str
    project: str
    scope: str
    period: str
    threshold: str
    used: Decimal
    limit: Decimal
    currency: str


def crossings(
    trial_id: str,
    config: TrialConfig,
    states: dict[str, ScopeState | None],
    seen: set[tuple[str, str, str, str]],
) -> list[Crossing]:
    """The thresholds reached and not yet in `seen` (trial, scope, period, threshold)."""
    found: list[Crossing] = []

    def add(state: ScopeState, scope: str, threshold: str, used: Decimal, limit: Decimal) -> None:
        period = iso(state.resets_at) or ONCE
        if (trial_id, scope, period, threshold) not in seen:
            found.append(
                Crossing(
                    trial_id, config.project, scope, period, threshold, used, limit, state.currency
                )
            )

    for scope in trial_scopes(trial_id, config):
        state = states.get(scope)
        if state is None or state.limit <= 0:
            continue  # never opened, or a limit nothing can be a fraction of
        for fraction in config.budget.alerts.thresholds:
            if state.spent >= state.limit * Decimal(str(fraction)):
                add(state, scope, str(fraction), state.spent, state.limit)
    figure = config.budget.alerts.daily_spend_above
    days = [s for m in machines_of(config) if (s := states.get(machine_scope(config.project, m)))]
    if figure is not None and days:
        spent = sum((s.spent for s in days), start=Decimal(0))
        if spent > figure:
            add(days[0], daily_scope(config.project), DAILY_SPEND, spent, figure)
    return found


def alert_document(row: BudgetAlert) -> dict[str, Any]:
    """An alert as the SSE event and the webhook carry it."""
    return {
        "alert": row.id,
        "trial": row.trial_id,
        "project": row.project,
        "scope": row.scope,
        "threshold": row.threshold,
        "used": row.used,
        "limit": row.limit,
        "currency": row.currency,
        "period_ends": None if row.period == ONCE else row.period,
        "ts": row.ts.isoformat() + "Z",
    }


class BudgetWatch:
    """Raises threshold alerts from the counter store; cheap enough to call on every tick."""

    def __init__(
        self, platform: Platform, *, interval_s: float = 2.0, webhook: Webhook | None = None
    ):
        self.p = platform
        self.interval_s = interval_s
        self.webhook = webhook or Webhook(
            platform.store, allow=Allowlist.parse(platform.settings.webhook_allow)
        )
        self._last = float("-inf")
        self._resumed = False

    def check(self, trial_ids: Iterable[str], *, force: bool = False) -> list[int]:
        """Raise what the trials' scopes crossed since the last check; the new alerts' ids."""
        ids = list(trial_ids)
        if not force and time.monotonic() - self._last < self.interval_s:
            return []
        self._last = time.monotonic()
        if not self._resumed:  # deliveries a stopped orchestrator left pending
            self.webhook.resume()
            self._resumed = True
        if not ids:
            return []
        with self.p.store.session() as s:
            trials = [
                (t.id, stored_config(t.config))
                for t in s.scalars(select(Trial).where(Trial.id.in_(ids)))
            ]
            seen = {
                (r.trial_id, r.scope, r.period, r.threshold)
                for r in s.execute(
                    select(
                        BudgetAlert.trial_id,
                        BudgetAlert.scope,
                        BudgetAlert.period,
                        BudgetAlert.threshold,
                    ).where(BudgetAlert.trial_id.in_(ids))
                )
            }
        names = sorted({n for trial_id, c in trials for n in trial_scopes(trial_id, c)})
        try:
            counters = self.p.counters()
            try:
                states = {n: counters.describe(n) for n in names}
            finally:
                counters.close()
        except CounterError as exc:
            log.warning("budget alerts skipped: the counter store did not answer: %s", exc)
            return []
        new = [c for trial_id, config in trials for c in crossings(trial_id, config, states, seen)]
        if not new:
            return []
        hooks = {trial_id: c.budget.alerts.webhook_url for trial_id, c in trials}
        raised: list[tuple[int, str | None]] = []
        try:
            with self.p.store.session() as s:
                for c in new:
                    url = hooks[c.trial_id]
                    row = BudgetAlert(
                        trial_id=c.trial_id,
                        project=c.project,
                        scope=c.scope,
                        period=c.period,
                        threshold=c.threshold,
                        used=str(c.used),
                        limit=str(c.limit),
                        currency=c.currency,
                        ts=utcnow(),
                        delivery="pending" if url else "none",
                        delivery_attempts=0,
                    )
                    s.add(row)
                    s.flush()
                    doc = alert_document(row)
                    self.p.store.add_event(s, c.trial_id, ALERT_EVENT, **doc)
                    log.info("budget alert %s", doc)
                    raised.append((row.id, url))
        except IntegrityError:
            return []  # another orchestrator raised them first; it delivers them
        for alert_id, url in raised:
            if url:
                self.webhook.send(alert_id, url)
        return [alert_id for alert_id, _ in raised]


# -- webhook ------------------------------------------------------------------------------------


WEBHOOK_FAILED = "webhook call failed"
"""What a viewer reads of a failed call: with the HTTP status when a response came, never the
connection's fate (refused, reset, timed out), which would make the webhook a port scanner."""


class Webhook:
    """POSTs alerts as JSON on its own thread; a failed try is retried with exponential backoff
    (`backoff_s`, doubled each time) up to `attempts` tries, and recorded as an event. Only
    hosts `contracts.outbound` allows are called (`allow`: the server's exceptions)."""

    def __init__(
        self,
        store: Store,
        *,
        timeout_s: float = 5.0,
        attempts: int = 5,
        backoff_s: float = 2.0,
        allow: Allowlist | None = None,
    ):
        self.store = store
        self.allow = allow or Allowlist.parse([])
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._due: list[tuple[float, int, int, str, int]] = []
        """(due, sequence, alert id, url, attempt), earliest first."""
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def send(self, alert_id: int, url: str, attempt: int = 1, delay_s: float = 0.0) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="budget-webhook", daemon=True
                )
                self._thread.start()
            item = (time.monotonic() + delay_s, next(self._seq), alert_id, url, attempt)
            heapq.heappush(self._due, item)
            self._cond.notify()

    def resume(self) -> None:
        """Queue the deliveries still pending in the state DB (a restart left them)."""
        with self.store.session() as s:
            rows = s.execute(
                select(BudgetAlert.id, BudgetAlert.delivery_attempts, Trial.config)
                .join(Trial, Trial.id == BudgetAlert.trial_id)
                .where(BudgetAlert.delivery == "pending")
            ).all()
        for alert_id, attempts, config in rows:
            url = stored_config(config).budget.alerts.webhook_url
            if url:
                self.send(alert_id, url, attempt=attempts + 1)

    def close(self) -> None:
        """Stop the delivery thread; what is still queued stays pending in the state DB."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (not self._due or self._due[0][0] > time.monotonic()):
                    wait = self._due[0][0] - time.monotonic() if self._due else None
                    self._cond.wait(wait)
                if self._stop:
                    return
                _, _, alert_id, url, attempt = heapq.heappop(self._due)
            try:
                self._deliver(alert_id, url, attempt)
            except Exception:  # the thread must outlive any one delivery
                log.exception("budget alert %s: delivery failed unexpectedly", alert_id)

    def _deliver(self, alert_id: int, url: str, attempt: int) -> None:
        with self.store.session() as s:
            row = s.get(BudgetAlert, alert_id)
            if row is None or row.delivery != "pending":
                return
            doc = {"event": ALERT_EVENT, **alert_document(row)}
        error: str | None = None
        detail, refused = "", False
        try:
            resp = post_checked(url, doc, self.allow, self.timeout_s)
            if not resp.is_success:
                error = detail = f"{WEBHOOK_FAILED}: HTTP {resp.status_code}"
        except AddressRefused as exc:
            error, detail, refused = f"{WEBHOOK_FAILED}: address not allowed", str(exc), True
        except (httpx.HTTPError, OSError) as exc:
            error, detail = WEBHOOK_FAILED, f"{type(exc).__name__}: {exc}"
        retry = error is not None and not refused and attempt < self.attempts
        delay = self.backoff_s * 2 ** (attempt - 1)
        with self.store.session() as s:
            row = s.get_one(BudgetAlert, alert_id)
            row.delivery_attempts = attempt
            if error is None:
                row.delivery = "delivered"
                self.store.add_event(
                    s, row.trial_id, "budget_alert_delivered", alert=alert_id, attempt=attempt
                )
            else:
                if not retry:
                    row.delivery = "failed"
                self.store.add_event(
                    s,
                    row.trial_id,
                    "budget_alert_webhook_failed",
                    alert=alert_id,
                    attempt=attempt,
                    error=error,
                    retry_in_s=delay if retry else None,
                )
        if error is not None:
            log.warning(
                "budget alert %s: webhook %s failed (try %d of %d): %s",
                alert_id, url, attempt, self.attempts, detail,
            )  # fmt: skip
        if retry:
            self.send(alert_id, url, attempt + 1, delay)


def post_checked(
    url: str, doc: dict[str, Any], allow: Allowlist, timeout_s: float
) -> httpx.Response:
    """POST `doc` to `url` at an address checked now (`contracts.outbound`), not at whatever
    the name resolves to when connecting: the Host header and TLS name stay the URL's, so
    virtual hosts and certificates work. Never follows a redirect, never uses a proxy."""
    address = checked_addresses(url, allow)[0]
    target = httpx.URL(url)
    with httpx.Client(trust_env=False, timeout=timeout_s, follow_redirects=False) as client:
        return client.post(
            target.copy_with(host=str(address)),
            json=doc,
            headers={"Host": target.netloc.decode("ascii")},
            extensions={"sni_hostname": target.host},
        )


# -- deferral -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deferral:
    scope: str
    until: float
    """When the refusing allowance resets (epoch seconds, UTC)."""


def refusing_scope(decision: BudgetDecision | None) -> str | None:
    """The scope named by a `budget_exhausted` refusal, or None for anything else."""
    if decision is None or decision.action != "refused" or decision.error != "budget_exhausted":
        return None
    return decision.scope


def machine_day_refusal(platform: Platform, config: TrialConfig, a: Assignment) -> Deferral | None:
    """When only its machine's daily allowance refused the assignment's latest attempt, and
    the project (and task) can still pay: until when to defer it. Otherwise None."""
    if a.started_at is None:
        return None
    since = a.started_at.replace(tzinfo=dt.UTC).timestamp() - 1
    platform.index.catch_up(platform.root.traffic_logs)
    refused = [
        f for f in platform.index.flows(assignment=a.id) if f.status == 402 and f.ts_start >= since
    ]
    scopes = {refusing_scope(f.decision()) for f in refused}
    if len(scopes) != 1 or refused[-1].machine is None:
        return None  # no refusal on record, or more than one scope refused
    scope = scopes.pop()
    if scope != machine_scope(config.project, refused[-1].machine):
        return None
    try:
        counters = platform.counters()
        try:
            for name in (project_scope(config.project), task_scope(a.trial_id, a.task_id)):
                state = counters.describe(name)
                if state is None and name.startswith("task:"):
                    continue  # the task has no cap of its own
                if state is None or state.left <= 0:
                    return None
            day = counters.describe(scope, refused[-1].ts_start)
        finally:
            counters.close()
    except CounterError as exc:
        log.warning("assignment %s: cannot tell whether to defer it: %s", a.id, exc)
        return None
    if day is None or day.resets_at is None:
        return None
    return Deferral(scope, float(day.resets_at))
