"""Embedded worker driver: each assignment is a detached local subprocess (`workers.runner`)."""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
import sys
import time

from workers.runner import kill_group
from workers.spec import AssignmentSpec

LAUNCH_WAIT_S = 30.0


class LocalDriver:
    name = "local"

    def __init__(self) -> None:
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def launch(self, spec: AssignmentSpec) -> None:
        spec.artifacts.mkdir(parents=True, exist_ok=True)
        spec_path = spec.artifacts / "spec.json"
        spec_path.write_text(spec.model_dump_json(indent=2))
        with (spec.artifacts / "runner.log").open("ab") as log:
            # Own session: the runner outlives an orchestrator restart and is killed as a group.
            proc = subprocess.Popen(
                [sys.executable, "-m", "workers.runner", str(spec_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        self._children[spec.assignment] = proc
        # Return only once the runner holds its lock (or has already ended), so that `alive`
        # can never report a just-started runner as dead and get it started twice.
        deadline = time.monotonic() + LAUNCH_WAIT_S
        while time.monotonic() < deadline and proc.poll() is None and not self.alive(spec):
            time.sleep(0.02)

    def alive(self, spec: AssignmentSpec) -> bool:
        child = self._children.get(spec.assignment)
        if child is not None and child.poll() is not None:
            del self._children[spec.assignment]  # reaped: no zombie keeps its pid
        if not spec.lock_path.exists():
            return False
        with spec.lock_path.open("r") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False

    def cancel(self, spec: AssignmentSpec) -> None:
        if not self.alive(spec):
            return
        with contextlib.suppress(ValueError, OSError):
            pid = int(spec.lock_path.read_text().strip())
            kill_group(pid)
