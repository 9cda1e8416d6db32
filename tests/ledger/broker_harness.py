"""The payment broker as workers reach it: the control API under uvicorn, over a project with a
ledger and budget scopes, and the real mitmdump leading `http://broker.autovibe/` to it."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

from budget import machine_scope, open_counters, project_scope
from contracts.dataroot import DataRoot
from contracts.settings import Settings
from ledger.book import Ledger
from tests.budget.budget_harness import Proxy, serve, start_proxy
from tests.orchestrator.trial_runs import served_api

PROJECT = "demo"
PROJECT_BUDGET = Decimal(500)


@contextmanager
def broker_behind_proxy(
    settings: Settings,
    allowances: dict[str, Decimal],
    *,
    transparent_port: int = 0,
    **proxy_options: object,
) -> Iterator[Proxy]:
    """Project `demo` (500 USD ledger and budget, `allowances` per machine a day), the API at
    `settings`, and a proxy (`start_proxy`'s options) whose broker it is."""
    root = DataRoot.at(settings.data)
    Ledger.of(root, PROJECT).open(
        PROJECT, PROJECT_BUDGET, "USD", {"USD": Decimal(1)}, dt.date.today(), funding="t1"
    )
    counters = open_counters("sqlite", path=root.budget_counters)
    now = time.time()
    counters.ensure_scope(project_scope(PROJECT), PROJECT_BUDGET, "USD", "once", now)
    for machine, allowance in allowances.items():
        counters.ensure_scope(machine_scope(PROJECT, machine), allowance, "USD", "daily", now)
    counters.close()
    with served_api(settings):
        model = serve()
        proxy = start_proxy(
            settings.data,
            settings.configs,
            next(model),
            transparent_port=transparent_port,
            autovibe_broker=f"{settings.host}:{settings.api_port}",
            **proxy_options,
        )
        try:
            yield proxy
        finally:
            proxy.stop()
            next(model, None)
