"""The payment broker as workers reach it: the control API under uvicorn, over a project with a
ledger and budget scopes, and the real mitmdump leading `http://broker.autovibe/` to it."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

import uvicorn

from budget import machine_scope, open_counters, project_scope
from contracts.dataroot import DataRoot
from contracts.settings import Settings
from ledger.book import Ledger
from orchestrator.api import create_app
from proxy.launch import wait_ready
from tests.budget.budget_harness import Proxy, serve, start_proxy

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
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, run_scheduler=False),
            host=settings.host,
            port=settings.api_port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_ready(settings.host, settings.api_port, timeout=30)
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
        server.should_exit = True
        thread.join(timeout=10)
        next(model, None)
