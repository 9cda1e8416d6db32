"""Driving a trial to its end in a test: the scheduler ticked in the test's thread."""

from __future__ import annotations

import time

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
