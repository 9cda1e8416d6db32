"""The composed platform: settings, state DB, catalogues, traffic index, ledger, worker driver."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from functools import cached_property

from budget import CounterStore, open_counters
from budget.scopes import open_trial
from contracts.config import NomadPlacement, TrialConfig
from contracts.credentials import load_or_create_key
from contracts.dataroot import DataRoot
from contracts.settings import Settings
from ledger.book import Ledger, LedgerError, ledger_projects
from ledger.payments import PAYMENTS_FILE, PaymentError, PaymentPolicy
from ledger.posting import Posted, agents_from_artifacts, post_usage, post_vm_hours
from orchestrator.catalog import Catalog
from orchestrator.state import Assignment, Store, state_url, utcnow
from traffic.stores import CallFailures, MeteredFlows, ModelUsage, metered_flows_for
from workers.driver import WorkerDriver, get_driver

MICRO = Decimal("0.000001")
"""Money is kept to a millionth: local-model calls cost fractions of a cent."""
USAGE_POST_INTERVAL_S = 60.0
"""How often the scheduler posts closed hours of usage to the ledgers."""

log = logging.getLogger("autovibe.platform")


@dataclass
class Platform:
    settings: Settings
    root: DataRoot
    store: Store
    catalog: Catalog
    drivers: dict[str, WorkerDriver] = field(default_factory=dict)
    usage_posted_at: float = 0.0
    """When `post_closed_hours` last ran (UNIX time)."""
    _payment_policy: tuple[tuple[int, int], PaymentPolicy | None] | None = None
    """The payment policy read last, with its file's (mtime_ns, size)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Platform:
        root = DataRoot.at(settings.data)
        DataRoot.ensure(root.root)
        return cls(settings, root, Store(state_url(settings)), Catalog.load(settings))

    def driver(self, name: str, nomad: NomadPlacement | None = None) -> WorkerDriver:
        """The worker driver; `nomad` gets the server's cluster with the trial's placement."""
        if name != "nomad":
            nomad = None
        key = name if nomad is None else f"{name}:{nomad.model_dump_json()}"
        if key not in self.drivers:
            if nomad is None:
                self.drivers[key] = get_driver(name)
            else:
                from workers.nomad import cluster_for

                self.drivers[key] = get_driver(name, cluster_for(self.settings, nomad))
        return self.drivers[key]

    @cached_property
    def credential_key(self) -> bytes:
        return load_or_create_key(self.root)

    @cached_property
    def index(self) -> MeteredFlows:
        DataRoot.ensure(self.root.traffic_logs)
        return metered_flows_for(self.settings)

    def ledger(self, project: str) -> Ledger:
        DataRoot.ensure(self.root.financial(project))
        return Ledger(self.root.ledger(project))

    def usage(self, *, trial: str | None = None, assignment: str | None = None) -> list[ModelUsage]:
        """Metered usage, after pulling whatever the proxy has spooled into the index."""
        self.index.catch_up(self.root.traffic_logs)
        return self.index.usage(trial=trial, assignment=assignment)

    def call_failures(self, assignment: str) -> CallFailures:
        """The assignment's calls that the model plane or the proxy failed, as captured."""
        self.index.catch_up(self.root.traffic_logs)
        return self.index.call_failures(assignment)

    def in_currency(self, usd: Decimal, currency: str) -> Decimal:
        return self.catalog.prices.convert(usd, currency).quantize(MICRO, rounding=ROUND_HALF_UP)

    def open_ledger(self, config: TrialConfig, trial_id: str) -> None:
        self.ledger(config.project).open(
            config.project,
            config.budget.amount,
            config.budget.currency,
            self.catalog.prices.fx,
            dt.date.today(),
            funding=trial_id,
        )
        self.open_budgets(config, trial_id)

    def payment_policy(self) -> PaymentPolicy | None:
        """The payment broker's policy (configs/payments.yaml); None when there is none or it
        is unreadable (logged: the broker refuses payments then, the trials go on)."""
        path = self.settings.configs / PAYMENTS_FILE
        try:
            info = path.stat()
        except FileNotFoundError:
            return None
        # Read again only when the file changed: every assignment's prompt names the policy,
        # and parsing the YAML for each was a quarter of a scheduler tick at fleet scale.
        stamp = (info.st_mtime_ns, info.st_size)
        if self._payment_policy is not None and self._payment_policy[0] == stamp:
            return self._payment_policy[1]
        try:
            policy: PaymentPolicy | None = PaymentPolicy.load(path)
        except PaymentError as exc:
            log.error("%s", exc)
            policy = None
        self._payment_policy = (stamp, policy)
        return policy

    def counters(self) -> CounterStore:
        """The budget counter store the proxy reserves in (`AUTOVIBE_BUDGET_STORE`)."""
        return open_counters(
            self.settings.budget_store,
            path=self.root.budget_counters,
            url=self.settings.budget_redis_url,
        )

    def open_budgets(self, config: TrialConfig, trial_id: str) -> None:
        """Open the scopes the proxy charges: project, each machine's day, each capped task.

        Reopening keeps what was spent; limits and periods become this trial's.
        """
        store = self.counters()
        try:
            open_trial(store, config, trial_id, time.time())
        finally:
            store.close()

    # -- the ledger: hourly usage, VM time -------------------------------------------------------

    def post_usage(self, project: str, *, until: float | None = None) -> Posted:
        """Post the project's metered usage by the hour (`ledger.posting`): closed hours up to
        `until`, or everything indexed when None."""
        self.index.catch_up(self.root.traffic_logs)
        agents = agents_from_artifacts(self.root, project)
        return post_usage(self.ledger(project), self.index, project, until=until, agent_of=agents)

    def post_closed_hours(self, now: float | None = None) -> None:
        """At most every `USAGE_POST_INTERVAL_S`: post every project's closed hours, and once a
        day assert each budget's balance at the start of the day."""
        now = time.time() if now is None else now
        if now - self.usage_posted_at < USAGE_POST_INTERVAL_S:
            return
        self.usage_posted_at = now
        # The earlier of the local and UTC dates: fundings and payments are dated locally.
        today = min(dt.date.today(), dt.datetime.fromtimestamp(now, dt.UTC).date())
        for project in ledger_projects(self.root):
            try:
                self.post_usage(project, until=now)
                self.ledger(project).assert_budget(today)
            except LedgerError:
                log.exception("posting usage of %s failed; it is retried next time", project)

    def post_vm_time(self, config: TrialConfig, a: Assignment) -> bool:
        """Post the assignment's wall time on its worker VM at the driver's VM-hour price."""
        if a.started_at is None:
            return False
        try:
            price = self.catalog.prices.compute.vm_hour(config.driver)
        except KeyError as exc:
            log.error("VM time of %s not posted: %s", a.id, exc.args[0])
            return False
        return post_vm_hours(
            self.ledger(config.project),
            assignment=a.id,
            trial=a.trial_id,
            agent=a.agent,
            machine=a.machine or "unknown",
            driver=config.driver,
            seconds=(utcnow() - a.started_at).total_seconds(),
            usd_per_hour=price,
            on=dt.datetime.now(dt.UTC).date(),
        )
