"""Prometheus metrics of the platform, read fresh from its stores on every scrape.

Request and spend rates come from the traffic index as counters (`rate()` them in Grafana),
budget remaining from the counter store per scope, queue depth and worker states from the
state DB, and index lag from the spool files' sizes against the offsets the index stored.
Index lag is measured before the scrape's own catch-up, so it shows how far the proxy's
indexer is behind.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Metric, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from budget import CounterError
from budget.scopes import trial_scopes
from orchestrator.alerts import alert_labels
from orchestrator.state import Assignment, BudgetAlert, Trial, stored_config
from traffic.spool import FILE_NAME
from traffic.stores import ModelUsage

if TYPE_CHECKING:
    from orchestrator.platform import Platform

log = logging.getLogger("autovibe.metrics")

ASSIGNMENT_STATES = ("queued", "deferred", "running", "finished", "failed", "cancelled")
EXPORTED = (
    "autovibe_trials_submitted_total",
    "autovibe_assignments",
    "autovibe_queue_depth",
    "autovibe_workers_busy",
    "autovibe_proxy_requests_total",
    "autovibe_proxy_tokens_total",
    "autovibe_proxy_spend_usd_total",
    "autovibe_spend_usd",
    "autovibe_budget_limit",
    "autovibe_budget_spent",
    "autovibe_budget_reserved",
    "autovibe_budget_remaining",
    "autovibe_budget_store_up",
    "autovibe_budget_used_ratio",
    "autovibe_budget_alerts_total",
    "autovibe_index_lag_bytes",
    "autovibe_index_lag_files",
)
"""Every series name this module exports; the Grafana dashboard may query only these."""


def index_lag(traffic_logs: Path, index: Path) -> dict[str, int]:
    """Bytes of each spool file (`<project>/<day>/flows.jsonl`) not yet indexed."""
    offsets: dict[str, int] = {}
    if index.exists():
        db = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=5)
        try:
            offsets = dict(db.execute("SELECT path, offset FROM offsets").fetchall())
        except sqlite3.OperationalError:  # an index created before its first flow
            offsets = {}
        finally:
            db.close()
    lag = {}
    for spool in traffic_logs.glob(f"*/*/{FILE_NAME}"):
        key = spool.relative_to(traffic_logs).as_posix()
        lag[key] = max(spool.stat().st_size - offsets.get(key, 0), 0)
    return lag


class _UsageCollector(Collector):
    """Metered calls, tokens and spend per provider and model, as counters: the index only grows."""

    def __init__(self) -> None:
        self.rows: list[ModelUsage] = []

    def collect(self) -> Iterator[Metric]:
        labels = ["provider", "model"]
        calls = CounterMetricFamily("autovibe_proxy_requests", "Metered LLM calls", labels=labels)
        tokens = CounterMetricFamily(
            "autovibe_proxy_tokens", "Metered tokens", labels=[*labels, "kind"]
        )
        usd = CounterMetricFamily("autovibe_proxy_spend_usd", "Metered spend in USD", labels=labels)
        for u in self.rows:
            calls.add_metric([u.provider, u.model], u.calls)
            tokens.add_metric([u.provider, u.model, "prompt"], u.prompt_tokens)
            tokens.add_metric([u.provider, u.model, "completion"], u.completion_tokens)
            usd.add_metric([u.provider, u.model], float(u.cost_usd))
        yield from (calls, tokens, usd)


class _AlertCollector(Collector):
    """Budget alerts raised, per project, scope and threshold: rows that are never deleted."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, int]] = []

    def collect(self) -> Iterator[Metric]:
        alerts = CounterMetricFamily(
            "autovibe_budget_alerts",
            "Budget threshold alerts raised (one per trial, scope, period and threshold)",
            labels=["project", "scope", "threshold"],
        )
        for project, scope, threshold, n in self.rows:
            alerts.add_metric([project, scope, threshold], n)
        yield alerts


class Metrics:
    """One registry per API process; `render` refreshes every gauge from the stores."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.trials = Counter("autovibe_trials_submitted", "Trials accepted by the API", registry=r)
        self.assignments = Gauge(
            "autovibe_assignments", "Assignments by state", ["state"], registry=r
        )
        self.queue = Gauge("autovibe_queue_depth", "Assignments waiting for a worker", registry=r)
        self.busy = Gauge(
            "autovibe_workers_busy", "Running assignments per machine", ["machine"], registry=r
        )
        self.usage = _UsageCollector()
        r.register(self.usage)
        self.spend = Gauge("autovibe_spend_usd", "Metered spend in USD, all trials", registry=r)
        scope = ["scope", "currency"]
        self.limit = Gauge(
            "autovibe_budget_limit", "Budget of the scope's period", scope, registry=r
        )
        self.spent = Gauge("autovibe_budget_spent", "Settled spend this period", scope, registry=r)
        self.reserved = Gauge("autovibe_budget_reserved", "Open reservations", scope, registry=r)
        self.remaining = Gauge(
            "autovibe_budget_remaining", "What may still be reserved", scope, registry=r
        )
        self.store_up = Gauge(
            "autovibe_budget_store_up", "1 when the budget counter store answered", registry=r
        )
        self.used_ratio = Gauge(
            "autovibe_budget_used_ratio",
            "Settled spend over the limit of the scope's period",
            ["project", "scope"],
            registry=r,
        )
        self.alerts = _AlertCollector()
        r.register(self.alerts)
        self.lag = Gauge(
            "autovibe_index_lag_bytes", "Spool bytes not yet in the traffic index", registry=r
        )
        self.lag_files = Gauge(
            "autovibe_index_lag_files", "Spool files with bytes not yet indexed", registry=r
        )

    def render(self, platform: Platform) -> bytes:
        """The Prometheus text exposition, every value read now."""
        lag = index_lag(platform.root.traffic_logs, platform.root.traffic_index)
        self.lag.set(sum(lag.values()))
        self.lag_files.set(sum(1 for v in lag.values() if v))
        self._state(platform)
        self._usage(platform)
        self._budgets(platform)
        return generate_latest(self.registry)

    def _state(self, platform: Platform) -> None:
        with platform.store.session() as s:
            counts = dict(
                s.execute(select(Assignment.state, func.count()).group_by(Assignment.state)).all()
            )
            machines = s.execute(
                select(Assignment.machine, func.count())
                .where(Assignment.state == "running")
                .group_by(Assignment.machine)
            ).all()
        for state in ASSIGNMENT_STATES:
            self.assignments.labels(state).set(counts.get(state, 0))
        self.queue.set(counts.get("queued", 0))
        self.busy.clear()
        for machine, n in machines:
            self.busy.labels(machine or "unplaced").set(n)

    def _usage(self, platform: Platform) -> None:
        self.usage.rows = platform.usage()
        self.spend.set(float(sum(u.cost_usd for u in self.usage.rows)))

    def _scopes(self, platform: Platform) -> dict[str, str]:
        """Every scope the trials in the state DB opened (project, machine days, capped tasks),
        with its project."""
        scopes: dict[str, str] = {}
        with platform.store.session() as s:
            # Every alert a trial may raise starts at 0, so that rate() sees its first one.
            alerts: dict[tuple[str, str, str], int] = {}
            for trial_id, config in s.execute(select(Trial.id, Trial.config)).all():
                c = stored_config(config)
                scopes.update(dict.fromkeys(trial_scopes(trial_id, c), c.project))
                for key in alert_labels(trial_id, c):
                    alerts.setdefault(key, 0)
            raised = s.execute(
                select(
                    BudgetAlert.project, BudgetAlert.scope, BudgetAlert.threshold, func.count()
                ).group_by(BudgetAlert.project, BudgetAlert.scope, BudgetAlert.threshold)
            )
            for project, scope, threshold, n in raised:
                alerts[(project, scope, threshold)] = n
            self.alerts.rows = [(*key, n) for key, n in sorted(alerts.items())]
        return scopes

    def _budgets(self, platform: Platform) -> None:
        for g in (self.limit, self.spent, self.reserved, self.remaining, self.used_ratio):
            g.clear()
        scopes = self._scopes(platform)
        try:
            store = platform.counters()
            try:
                states = [store.describe(scope) for scope in sorted(scopes)]
            finally:
                store.close()
        except CounterError as exc:
            log.warning("budget counter store did not answer: %s", exc)
            self.store_up.set(0)
            return
        self.store_up.set(1)
        for st in states:
            if st is None:
                continue
            labels = (st.scope, st.currency)
            self.limit.labels(*labels).set(float(st.limit))
            self.spent.labels(*labels).set(float(st.spent))
            self.reserved.labels(*labels).set(float(st.reserved))
            self.remaining.labels(*labels).set(float(st.left))
            if st.limit > 0:
                ratio = float(st.spent / st.limit)
                self.used_ratio.labels(scopes[st.scope], st.scope).set(ratio)
