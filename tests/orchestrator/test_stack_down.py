"""`autovibe down` (stack.down) on services this very process started, as the test suites do:
a stopped service is a zombie until reaped, and must count as stopped."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from common.processes import runs
from contracts.dataroot import DataRoot
from contracts.settings import Settings
from orchestrator import stack


def test_a_zombie_does_not_run() -> None:
    child = subprocess.Popen(["sleep", "60"])
    assert runs(child.pid)
    os.kill(child.pid, signal.SIGKILL)
    while runs(child.pid):  # SIGKILL delivered; then a zombie until reaped below
        pass
    os.kill(child.pid, 0)  # what the old check asked: the pid is still there
    assert child.wait() == -signal.SIGKILL
    assert not runs(child.pid)


def test_down_stops_a_service_it_finds_and_clears_its_pid_file(tmp_path: Path) -> None:
    settings = Settings(data=tmp_path)
    root = DataRoot.at(settings.data)
    DataRoot.ensure(root.run)
    service = subprocess.Popen(["sleep", "60"], start_new_session=True)
    (root.run / "api.pid").write_text(str(service.pid))
    assert stack.running_pid(root, "api") == service.pid
    assert stack.down(settings) == ["api"]
    assert not runs(service.pid)  # a zombie of this process, not a running service
    assert stack.running_pid(root, "api") is None
    assert not (root.run / "api.pid").exists()
    assert service.wait() == -signal.SIGTERM
