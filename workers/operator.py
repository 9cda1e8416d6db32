"""Operator access to workers: list them, read and follow their logs, attach to them live.

Everything is read from the data root, the same files the orchestrator reads: `spec.json`
(what the assignment is), `runner.lock` (held while the runner lives; its holder is read from
/proc/locks, so looking never takes the lock a starting runner needs), `result.json` (written
last). Local runners run in a tmux session of their own on a dedicated tmux server
(`tmux -L autovibe`), so an operator can watch the runner and type into it; Nomad workers are
reached with `nomad alloc exec`, their VM with SSH (and VNC through an SSH tunnel).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from contracts.dataroot import DataRoot, open_nofollow, read_untrusted, write_secret_file
from workers.result import read_result
from workers.spec import read_spec

# workers.nomad (the Nomad client) and workers.vm (Jinja) are imported where a Nomad worker
# or its VM is handled: every `autovibe` command imports this module through its CLI.
if TYPE_CHECKING:
    from workers.vm import VmSpec

TMUX_SERVER = "autovibe"
"""Socket name of the tmux server the local runners live on (`tmux -L autovibe`)."""
LOGS = ("agent.log", "output/transcript.jsonl")
"""What `logs` shows: the agent's output (the runner's copy) and its transcript (in the
agent's output folder, never read through a symlink)."""


RUNS_LIMIT = 1024 * 1024
"""Most bytes of runs.jsonl read for a worker's start time."""


class WorkerNotFound(LookupError):
    pass


# -- tmux ---------------------------------------------------------------------------------------


def tmux(*args: str) -> list[str]:
    """argv of a tmux command on the runners' own server."""
    return ["tmux", "-L", TMUX_SERVER, *args]


def session_name(assignment: str) -> str:
    """tmux session of an assignment's runner (tmux turns `.` and `:` into `_` itself)."""
    return "autovibe-" + re.sub(r"[^A-Za-z0-9_-]", "_", assignment)


def session_argv(assignment: str, cwd: Path, hold_s: int = 60) -> list[str]:
    """A new detached session for an assignment, its pane holding a placeholder (`sleep`) until
    `runner_argv` puts the runner in it.

    Two steps, because a tmux server is the client that started it: its command line (which
    `ps` shows anyone) and its global environment (which every session inherits) are that
    client's. So the session is made by a client with no environment worth hiding, and the
    runner's environment is given afterwards to the pane alone. The window closes when its
    process ends, whatever the operator's tmux.conf says: the session lasts as long as the
    runner (or the placeholder, should the runner never come).
    """
    session = session_name(assignment)
    return tmux(
        "new-session", "-d", "-E", "-s", session, "-c", str(cwd), "-x", "200", "-y", "50",
        "sleep", str(hold_s),
        ";", "set-option", "-w", "-t", f"={session}:", "remain-on-exit", "off",
    )  # fmt: skip


ENV_SOURCE = 'set -a && . "$1" && set +a && rm -f -- "$1" && shift && exec "$@"'
"""The pane's first command: read the runner's environment from a file, delete the file, then
become the runner (exec: the pane's pid stays the runner's)."""
_SHELL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def write_env_file(path: Path, env: Mapping[str, str]) -> None:
    """`env` as shell assignments in a 0600 file, read once by the pane (`ENV_SOURCE`). The
    values never appear on a command line, where any local user could read them in /proc. A
    name the shell cannot assign is left out."""
    lines = (f"{k}={shlex.quote(v)}\n" for k, v in env.items() if _SHELL_NAME.match(k))
    write_secret_file(path, "".join(lines))


def runner_argv(
    spec_path: Path,
    assignment: str,
    python: str,
    env_file: Path | None = None,
    unset: Sequence[str] = (),
) -> list[str]:
    """Replace the placeholder of the assignment's session by `python -m workers.runner SPEC`
    and print the runner's pid.

    The runner is the pane's process itself (the pane's shell execs it): a session and
    process-group leader whose pid is the one it writes to runner.lock, so `kill_group` stops it
    as before. `env_file` (written by `write_env_file`) gives this pane alone its environment,
    on top of the tmux server's global environment, and is deleted once read; `unset` names
    global variables the runner must not see. pipe-pane copies what the pane shows into
    runner.log (in the same tmux command, before the runner can print; the terminal's CRs
    dropped).
    """
    session = session_name(assignment)
    log = spec_path.parent / "runner.log"
    command = [python, "-m", "workers.runner", str(spec_path)]
    if unset:
        command = ["env", *(arg for name in unset for arg in ("-u", name)), *command]
    if env_file is not None:
        command = ["/bin/sh", "-c", ENV_SOURCE, "sh", str(env_file), *command]
    copy = f"exec tr -d '\\r' >> {shlex.quote(str(log))}"
    return tmux(
        "respawn-pane", "-k", "-t", f"={session}:", *command,
        ";", "pipe-pane", "-o", "-t", f"={session}:", copy,
        ";", "display-message", "-p", "-t", f"={session}:", "#{pane_pid}",
    )  # fmt: skip


def agent_pane_argv(assignment: str, runner_pid: int, agent_log: Path) -> list[str]:
    """A second pane, under the runner's, that shows agent.log (the agent's own output) as it
    is written and closes once the runner has ended. The runner's pane stays the active one."""
    return tmux(
        "split-window", "-d", "-v", "-l", "70%", "-t", f"={session_name(assignment)}:",
        "tail", "-n", "+1", "-F", f"--pid={runner_pid}", str(agent_log),
    )  # fmt: skip


def has_session(session: str) -> bool:
    # `=name` matches exactly; a bare name would also match a prefix of another session.
    return (
        subprocess.run(tmux("has-session", "-t", f"={session}"), capture_output=True).returncode
        == 0
    )


def attach_argv(assignment: str) -> list[str]:
    return tmux("attach-session", "-t", f"={session_name(assignment)}")


# -- what runs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    assignment: str
    project: str
    trial: str
    machine: str
    agent: str
    artifacts: Path
    driver: str
    """`local` or `nomad`."""
    state: str
    """running · finished · crashed (infra error) · stopped (ended without a result) · pending."""
    pid: int | None
    """The runner's pid while it holds its lock (local workers)."""
    started: float | None
    """When the latest runner started (runs.jsonl), else when the spec was written."""

    def age_s(self, now: float | None = None) -> float | None:
        return None if self.started is None else (now or time.time()) - self.started


def lock_holder(path: Path) -> int | None:
    """Pid holding a flock on `path`, from /proc/locks; never takes the lock itself."""
    try:
        st = path.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146321 0 EOF"; blocked waiters carry "->".
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue
        if fields[5] == device:
            return int(fields[4])
    return None


def _started(artifacts: Path) -> float | None:
    try:
        runs = read_untrusted(artifacts / "runs.jsonl", artifacts, RUNS_LIMIT).splitlines()
        return float(json.loads(runs[-1])["started"])
    except (OSError, IndexError, KeyError, TypeError, ValueError):
        pass
    try:
        return (artifacts / "spec.json").stat().st_mtime
    except OSError:
        return None


def inspect(artifacts: Path) -> Worker:
    """The worker of one assignment folder (which must hold spec.json: `read_spec`)."""
    from workers.nomad import RECORD as NOMAD_RECORD

    spec = read_spec(artifacts)
    pid = lock_holder(spec.lock_path)
    if spec.result_path.exists():
        try:
            result = read_result(spec.result_path, spec.assignment)
            state = "crashed" if result.infra_error is not None else "finished"
        except (OSError, ValueError):  # a symlink, or no runner's result
            state = "crashed"
    elif pid is not None:
        state = "running"
    elif spec.lock_path.exists():
        state = "stopped"
    else:
        state = "pending"
    return Worker(
        assignment=spec.assignment,
        project=spec.project,
        trial=spec.trial,
        machine=spec.machine,
        agent=spec.agent,
        artifacts=artifacts,
        driver="nomad" if (artifacts / NOMAD_RECORD).exists() else "local",
        state=state,
        pid=pid if state == "running" else None,
        started=_started(artifacts),
    )


def workers(root: DataRoot, everything: bool = False) -> list[Worker]:
    """Running workers (all of them with `everything`), oldest first."""
    found = []
    for spec_path in (root.root / "worker-artifacts").glob("*/*/*/spec.json"):
        try:
            worker = inspect(spec_path.parent)
        except (OSError, ValueError):
            continue  # half-written or foreign folder: not a worker to show
        if everything or worker.state == "running":
            found.append(worker)
    return sorted(found, key=lambda w: (w.started or 0.0, w.assignment))


def find(root: DataRoot, assignment: str) -> Worker:
    """The worker with this assignment id, or the only one whose id starts with it."""
    matches = [w for w in workers(root, everything=True) if w.assignment.startswith(assignment)]
    exact = [w for w in matches if w.assignment == assignment]
    if exact or len(matches) == 1:
        return (exact or matches)[0]
    if not matches:
        raise WorkerNotFound(f"no assignment {assignment!r} under {root.root / 'worker-artifacts'}")
    names = ", ".join(w.assignment for w in matches[:5])
    raise WorkerNotFound(f"{assignment!r} is ambiguous: {names}")


# -- logs ---------------------------------------------------------------------------------------


def log_paths(worker: Worker) -> list[Path]:
    return [worker.artifacts / name for name in LOGS]


def follow(
    paths: list[Path], until: Callable[[], bool], poll_s: float = 0.2
) -> Iterator[tuple[Path, str]]:
    """Lines of `paths` as they are written, from the start; ends once `until()` is true and
    everything written before that has been read. A file may appear late."""
    offsets = dict.fromkeys(paths, 0)
    partial = dict.fromkeys(paths, b"")
    while True:
        done = until()  # checked before reading, so the last lines are never lost
        for path in paths:
            try:
                with os.fdopen(open_nofollow(path), "rb") as fh:
                    fh.seek(offsets[path])
                    chunk = fh.read()
            except OSError:  # not there yet, or a symlink the agent planted: not followed
                continue
            offsets[path] += len(chunk)
            *lines, partial[path] = (partial[path] + chunk).split(b"\n")
            for line in lines:
                yield path, line.decode(errors="replace")
        if done:
            for path, rest in partial.items():
                if rest:
                    yield path, rest.decode(errors="replace")
            return
        time.sleep(poll_s)


# -- Nomad workers ------------------------------------------------------------------------------


def nomad_access(allocation: str | None, vm: VmSpec | None, job: str | None = None) -> list[str]:
    """Commands that reach a Nomad worker: a shell in its task, SSH and VNC to its VM."""
    from workers.nomad import TASK as NOMAD_TASK

    if allocation:
        lines = [f"nomad alloc exec -task {NOMAD_TASK} {allocation} /bin/sh"]
    else:
        where = f"nomad job allocs {job}" if job else "nomad job allocs <job>"
        lines = [
            f"# allocation unknown (not placed yet, or Nomad not reachable): find it with {where}",
            f"nomad alloc exec -task {NOMAD_TASK} <allocation> /bin/sh",
        ]
    if vm is None:
        lines.append("# VM: pass --vm <vm.json> (written by `autovibe vm render`) for SSH/VNC")
        return lines
    if vm.address is None:
        lines.append(f"# VM {vm.name}: no address in its spec yet (virsh domifaddr {vm.name})")
        return lines
    port = "" if vm.ssh_port == 22 else f" -p {vm.ssh_port}"
    lines.append(f"ssh{port} {vm.address}")
    if vm.desktop:
        tunnel = f"ssh{port} -N -L {vm.vnc_port}:127.0.0.1:{vm.vnc_port} {vm.address}"
        lines.append(f"{tunnel}   # then: vncviewer 127.0.0.1:{vm.vnc_port}")
    lines.append(f"virsh domdisplay {vm.name}   # VM console (VNC), on its libvirt host")
    return lines


def nomad_job(worker: Worker) -> str | None:
    """The latest dispatched job of a Nomad worker as the record names it (read as untrusted;
    shown quoted for a shell, as the operator may paste it)."""
    from workers.nomad import read_records as read_nomad_records

    try:
        return shlex.quote(read_nomad_records(worker.artifacts)[-1].job)
    except (OSError, ValueError, IndexError):
        return None
