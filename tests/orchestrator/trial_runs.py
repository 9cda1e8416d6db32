"""Trials in a test: a platform whose trials run sandboxed, and the scheduler ticked in the
test's thread until a trial's assignment ends."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    scheduler = Scheduler(platform)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        scheduler.tick()
        with platform.store.session() as s:
            a = s.get_one(Trial, trial_id).assignments[0]
        if a.state not in ("queued", "running"):
            return a
        time.sleep(0.2)
    raise AssertionError(f"assignment still {a.state}: {a.result}")


@contextmanager
def sandboxed_api(tmp_path: Path) -> Iterator[tuple[TestClient, Platform]]:
    """The control API (no scheduler thread) of a platform on `tmp_path / "data"` whose task
    root is `tmp_path`, its trials run in bubblewrap: the operator's client and the platform.
    No proxy runs: its CA is made as mitmdump makes it (the sandbox shows it), for agents
    that call no model."""
    settings = Settings(
        data=tmp_path / "data", configs=PROJECT_ROOT / "configs", host="127.0.0.1",
        proxy_port=free_port(), model_port=free_port(), task_roots=[tmp_path],
    )  # fmt: skip
    root = DataRoot.at(settings.data)
    DataRoot.ensure(root.proxy_confdir)
    CertStore.from_store(root.proxy_confdir, "mitmproxy", 2048)
    app = create_app(settings, run_scheduler=False)
    token = (root.secrets / "operator-token").read_text().strip()
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        yield client, app.state.platform
