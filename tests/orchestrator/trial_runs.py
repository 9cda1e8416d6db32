"""Trials in a test: the control API as the operator reaches it (no scheduler thread), a
platform whose trials run sandboxed or not, and the scheduler ticked in the test's thread until
a trial's assignment ends."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi.testclient import TestClient
from mitmproxy.certs import CertStore

from contracts.dataroot import DataRoot
from contracts.settings import PROJECT_ROOT, Settings, free_port
from orchestrator.api import create_app
from orchestrator.platform import Platform
from orchestrator.scheduler import Scheduler
from orchestrator.state import Assignment, Trial


def run_to_the_end(platform: Platform, trial_id: str, timeout_s: float = 120) -> Assignment:
    """Tick a scheduler until the trial's first assignment is neither queued nor running."""
    return run_all_to_the_end(platform, trial_id, timeout_s, first_only=True)[0]


def run_all_to_the_end(
    platform: Platform, trial_id: str, timeout_s: float = 120, *, first_only: bool = False
) -> list[Assignment]:
    """Tick a scheduler until none of the trial's assignments (or its first, `first_only`) is
    queued or running; the assignments in the trial's order."""
    scheduler = Scheduler(platform)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        scheduler.tick()
        with platform.store.session() as s:
            assignments = list(s.get_one(Trial, trial_id).assignments)
        watched = assignments[:1] if first_only else assignments
        if all(a.state not in ("queued", "running") for a in watched):
            return assignments
        time.sleep(0.2)
    raise AssertionError(f"assignments still running: {[(a.state, a.result) for a in watched]}")


def operator_token(data: Path) -> str:
    """The operator's bearer token, which the control API writes into the data root `data`."""
    return (DataRoot.at(data).secrets / "operator-token").read_text().strip()


@contextmanager
def operator_api(settings: Settings) -> Iterator[tuple[TestClient, Platform]]:
    """The control API of `settings` without its scheduler thread: the operator's client of it
    (the bearer token from the data root) and its platform."""
    DataRoot.ensure(DataRoot.at(settings.data).root)
    app = create_app(settings, run_scheduler=False)
    headers = {"Authorization": f"Bearer {operator_token(settings.data)}"}
    with TestClient(app, headers=headers) as client:
        yield client, app.state.platform


@contextmanager
def served_api(settings: Settings) -> Iterator[Platform]:
    """The control API of `settings` (no scheduler thread) served for real by uvicorn on
    `settings.api_port`, in a thread, for clients that reach it as an operator's do: its
    platform."""
    app = create_app(settings, run_scheduler=False)
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.host, port=settings.api_port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    try:
        yield app.state.platform
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def trial_settings(tmp_path: Path, *, sandboxed: bool = False, **overrides: Any) -> Settings:
    """A platform on `tmp_path / "data"` (free ports, the repository's configs) with `tmp_path`
    as its task root, whose trials run unsandboxed unless `sandboxed`; `overrides` replace any
    of these."""
    defaults: dict[str, Any] = {
        "data": tmp_path / "data",
        "configs": PROJECT_ROOT / "configs",
        "host": "127.0.0.1",
        "proxy_port": free_port(),
        "model_port": free_port(),
        "allow_unsandboxed": not sandboxed,
        "task_roots": [tmp_path],
    }
    return Settings(**{**defaults, **overrides})


@contextmanager
def sandboxed_api(tmp_path: Path) -> Iterator[tuple[TestClient, Platform]]:
    """The control API (no scheduler thread) of a platform on `tmp_path / "data"` whose task
    root is `tmp_path`, its trials run in bubblewrap: the operator's client and the platform.
    No proxy runs: its CA is made as mitmdump makes it (the sandbox shows it), for agents
    that call no model."""
    settings = trial_settings(tmp_path, sandboxed=True)
    root = DataRoot.at(settings.data)
    DataRoot.ensure(root.proxy_confdir)
    CertStore.from_store(root.proxy_confdir, "mitmproxy", 2048)
    with operator_api(settings) as api:
        yield api
