"""Embedded worker driver: each assignment is a detached local runner (`workers.runner`).

The runner runs in a tmux session of its own on the `autovibe` tmux server
(`workers.operator`), so an operator can attach to it, watch it and type into it; its pane is
copied into runner.log, and a second pane follows agent.log. tmux keeps it detached: it
outlives an orchestrator restart, is the leader of its own process group (the pane's), and is
found again through its lock, as before. Without tmux it is a plain detached subprocess. The
driver records the group in `runner.pgid` at launch; cancel signals that group only while its
leader still is this assignment's runner, never a pid read from a file the runner wrote.

Environment: the runner gets only what it needs of the orchestrator's (`runner_env`: the
AUTOVIBE_* settings, the secret store's variables for redaction, PATH, HOME, locale), given to
its pane only through a 0600 file the pane reads and deletes (never on a command line, never
stored in the server). tmux is always called with a
bare environment (PATH, HOME, locale), so a server we start has nothing to pass on to other
sessions; what a server started elsewhere holds beyond ours is unset for the runner.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from common.processes import ProcessEnds, cmdline, group_members
from contracts.config import NomadCluster
from contracts.dataroot import atomic_write, open_log, read_untrusted, write_secret_file
from contracts.settings import PROJECT_ROOT
from secretstore import STORE_ENV
from workers import operator
from workers.runner import kill_group
from workers.spec import AssignmentSpec

LAUNCH_WAIT_S = 30.0
TMUX_TIMEOUT_S = 10.0
SERVER_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMUX_TMPDIR")
"""What the tmux client (and so a server it starts) is given; TMUX_TMPDIR picks the socket."""
PGID_FILE = "runner.pgid"
"""The runner's process group, as launched (host-only: the sandbox never sees the folder)."""
RUNNER_ENV = ("PATH", "HOME", "LANG", "TZ", "TMPDIR", "PYTHONPATH", *STORE_ENV)
"""What the runner is given of the orchestrator's environment, with AUTOVIBE_* and LC_*."""

log = logging.getLogger(__name__)


class LocalDriver:
    name = "local"

    def __init__(self, cluster: NomadCluster | None = None, *, tmux: bool | None = None) -> None:
        """`cluster`: the drivers' one constructor (`workers.driver`); local places nothing."""
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._ends = ProcessEnds()
        """The runners launched here, to hear them end (`on_end`)."""
        self.tmux = shutil.which("tmux") is not None if tmux is None else tmux
        """Run runners in tmux sessions; None: when tmux is installed."""
        if not self.tmux:
            log.warning(
                "tmux not found: local runners start as plain subprocesses, "
                "`autovibe worker attach` cannot reach them (apt-get install tmux)"
            )

    def launch(self, spec: AssignmentSpec) -> None:
        spec.artifacts.mkdir(parents=True, exist_ok=True)
        spec_path = spec.artifacts / "spec.json"
        # 0600: the spec carries the machine's live proxy credential.
        write_secret_file(spec_path, spec.model_dump_json(indent=2))
        pid = self._launch_in_tmux(spec) if self.tmux else None
        if pid is None:
            pid = self._launch_detached(spec)
        self._ends.watch(pid)
        # Host-only, written here: cancel signals this group, never a pid the runner's folders
        # could have been made to hold.
        atomic_write(spec.artifacts / PGID_FILE, f"{pid}\n", mode=0o600)
        # Return only once the runner holds its lock (or has already ended), so that `alive`
        # can never report a just-started runner as dead and get it started twice.
        deadline = time.monotonic() + LAUNCH_WAIT_S
        while time.monotonic() < deadline and _running(pid) and not self.alive(spec):
            self._reap(spec)
            time.sleep(0.02)

    def on_end(self, wake: Callable[[], None]) -> None:
        """`WithEndNotice`: the runner wrote result.json last, so it can be collected now."""
        self._ends.listen(wake)

    def _launch_detached(self, spec: AssignmentSpec) -> int:
        with open_log(spec.artifacts / "runner.log", append=True) as runner_log:
            # Own session: the runner outlives an orchestrator restart and is killed as a group.
            proc = subprocess.Popen(
                _runner_argv(spec),
                env=runner_env(),
                stdin=subprocess.DEVNULL,
                stdout=runner_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        self._children[spec.assignment] = proc
        return proc.pid

    def _launch_in_tmux(self, spec: AssignmentSpec) -> int | None:
        """The runner's pid, or None when tmux could not start it (a note is logged)."""
        client_env = {k: v for k, v in os.environ.items() if k in SERVER_ENV}
        # The server's global environment in the same client, once the session (and the server)
        # is there: one tmux process fewer before the runner starts.
        session = operator.session_argv(spec.assignment, PROJECT_ROOT)
        made = self._tmux(spec, [*session, ";", "show-environment", "-g"], client_env)
        if made is None:
            return None
        env = runner_env()
        foreign = [k for k in _names(made) if k not in env]
        env_file = spec.artifacts / "runner.env"
        operator.write_env_file(env_file, env)
        argv = operator.runner_argv(
            spec.artifacts / "spec.json", spec.assignment, sys.executable, env_file, foreign
        )
        started = self._tmux(spec, argv, client_env)
        try:
            pid = int((started or "").split()[0])
        except (IndexError, ValueError):
            env_file.unlink(missing_ok=True)  # no pane read it
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    operator.tmux(
                        "kill-session", "-t", f"={operator.session_name(spec.assignment)}"
                    ),
                    env=client_env,
                    capture_output=True,
                    timeout=TMUX_TIMEOUT_S,
                )
            return None
        # Best effort: a runner that has already ended has no session left to split.
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                operator.agent_pane_argv(spec.assignment, pid, spec.artifacts / "agent.log"),
                env=client_env,
                capture_output=True,
                timeout=TMUX_TIMEOUT_S,
            )
        return pid

    @staticmethod
    def _tmux(spec: AssignmentSpec, argv: list[str], env: dict[str, str]) -> str | None:
        """stdout of a tmux command, or None when it failed (a note is logged)."""
        try:
            proc = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=TMUX_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("tmux failed (%s): %s runs without a session", exc, spec.assignment)
            return None
        if proc.returncode != 0:
            log.warning(
                "tmux %s failed (%s): %s runs without a session",
                argv[3],
                proc.stderr.strip(),
                spec.assignment,
            )
            return None
        return proc.stdout

    def _reap(self, spec: AssignmentSpec) -> None:
        child = self._children.get(spec.assignment)
        if child is not None and child.poll() is not None:
            del self._children[spec.assignment]  # reaped: no zombie keeps its pid

    def alive(self, spec: AssignmentSpec) -> bool:
        self._reap(spec)
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
        pgid = runner_group(spec)
        if pgid is None:
            log.warning("%s: no runner of its own found to stop", spec.assignment)
            return
        kill_group(pgid)  # the runner ends, and with it its tmux session


def runner_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The runner's whole environment, from the orchestrator's (`env`, default ours): its
    settings and the secret store's variables, no other key, URL or id it happens to hold."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if k in RUNNER_ENV or k.startswith(("AUTOVIBE_", "LC_"))}


def runner_group(spec: AssignmentSpec) -> int | None:
    """The process group `launch` recorded for this assignment's runner, if its leader still
    is that runner (`python -m workers.runner <its spec.json>`); never group 1 or our own."""
    try:
        pgid = int(read_untrusted(spec.artifacts / PGID_FILE, spec.artifacts, 32))
    except (OSError, ValueError):
        return None
    if pgid <= 1 or pgid == os.getpgrp() or pgid not in group_members(pgid):
        return None  # a pid taken over by another process no longer leads that group
    runner = " ".join(_runner_argv(spec)[1:])  # -m workers.runner <spec.json>
    return pgid if cmdline(pgid).rstrip(" ").endswith(" " + runner) else None


def _runner_argv(spec: AssignmentSpec) -> list[str]:
    return [sys.executable, "-m", "workers.runner", str(spec.artifacts / "spec.json")]


def _names(shown: str) -> list[str]:
    """Names in what `tmux show-environment` printed: "NAME=value", or "-NAME" for one removed."""
    return [line.split("=", 1)[0] for line in shown.splitlines() if "=" in line]


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting to be reaped is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
