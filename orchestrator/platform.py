"""The composed platform: settings, state DB, catalogues, traffic index, ledger, worker driver."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from functools import cached_property

from contracts.config import TrialConfig
from contracts.credentials import load_or_create_key
from contracts.dataroot import DataRoot
from contracts.settings import Settings
from ledger.book import Ledger
from orchestrator.catalog import Catalog
from orchestrator.state import Store, state_url
from proxy.index import ModelUsage, TrafficIndex
from workers.driver import WorkerDriver, get_driver

MICRO = Decimal("0.000001")
"""Money is kept to a millionth: local-model calls cost fractions of a cent."""


@dataclass
class Platform:
    settings: Settings
    root: DataRoot
    store: Store
    catalog: Catalog
    drivers: dict[str, WorkerDriver] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> Platform:
        root = DataRoot.at(settings.data)
        DataRoot.ensure(root.root)
        return cls(settings, root, Store(state_url(settings)), Catalog.load(settings))

    def driver(self, name: str) -> WorkerDriver:
        if name not in self.drivers:
            self.drivers[name] = get_driver(name)
        return self.drivers[name]

    @cached_property
    def credential_key(self) -> bytes:
        return load_or_create_key(self.root)

    @cached_property
    def index(self) -> TrafficIndex:
        DataRoot.ensure(self.root.traffic_logs)
        return TrafficIndex(self.root.traffic_index)

    def ledger(self, project: str) -> Ledger:
        DataRoot.ensure(self.root.financial(project))
        return Ledger(self.root.ledger(project))

    def usage(self, *, trial: str | None = None, assignment: str | None = None) -> list[ModelUsage]:
        """Metered usage, after pulling whatever the proxy has spooled into the index."""
        self.index.catch_up(self.root.traffic_logs)
        return self.index.usage(trial=trial, assignment=assignment)

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
