"""`autovibe worker …`: see the running workers, read their logs, attach to one live."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from common.cli import data_root, err, fail
from workers import operator
from workers.spec import read_spec

if TYPE_CHECKING:
    from workers.vm import VmSpec

app = typer.Typer(
    help="Operator access to workers: ls, logs, attach; ssh and vnc to worker VMs.",
    no_args_is_help=True,
)
console = Console()
if not console.is_terminal:  # pipes: wide enough for ids and paths
    console = Console(width=160)


def _worker(assignment: str) -> operator.Worker:
    try:
        return operator.find(data_root(), assignment)
    except operator.WorkerNotFound as exc:
        raise fail(str(exc)) from exc


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@app.command("ls")
def ls(
    all_: Annotated[bool, typer.Option("--all", "-a", help="Ended ones too.")] = False,
) -> None:
    """Workers: assignment, trial, machine, state, pid, age."""
    found = operator.workers(data_root(), everything=all_)
    if not found:
        console.print("no workers" if all_ else "no running workers (--all shows ended ones)")
        return
    table = Table("assignment", "trial", "machine", "agent", "driver", "state", "pid", "age")
    for w in found:
        table.add_row(
            w.assignment,
            w.trial,
            w.machine,
            w.agent,
            w.driver,
            w.state,
            str(w.pid or "-"),
            _age(w.age_s()),
        )
    console.print(table)


@app.command("logs")
def logs(
    assignment: Annotated[str, typer.Argument(help="Assignment id (or a unique prefix).")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the run ends.")
    ] = False,
) -> None:
    """The agent's output (agent.log) and its transcript, prefixed by file."""
    worker = _worker(assignment)
    paths = operator.log_paths(worker)

    def ended() -> bool:
        return not follow or operator.inspect(worker.artifacts).state != "running"

    for path, line in operator.follow(paths, until=ended):
        sys.stdout.write(f"{path.name}: {line}\n")
        sys.stdout.flush()


@app.command("attach")
def attach(
    assignment: Annotated[str, typer.Argument(help="Assignment id (or a unique prefix).")],
    vm: Annotated[
        Path | None, typer.Option(help="vm.json of a Nomad worker's VM, for SSH and VNC.")
    ] = None,
) -> None:
    """Attach to a local runner's tmux session (C-b d detaches); Nomad: how to reach it."""
    worker = _worker(assignment)
    if worker.driver == "nomad":
        _nomad(worker, vm)
        return
    if worker.state != "running":
        raise fail(f"{worker.assignment} is {worker.state}: read it with `autovibe worker logs`")
    argv = operator.attach_argv(worker.assignment)
    if not operator.has_session(operator.session_name(worker.assignment)):
        raise fail(
            f"{worker.assignment} runs (pid {worker.pid}) but not in a tmux session on the "
            f"`{operator.TMUX_SERVER}` server; follow it with `autovibe worker logs -f`"
        )
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        console.print(shlex.join(argv), highlight=False, soft_wrap=True)
        return
    tmux = shutil.which("tmux")
    if tmux is None:
        raise fail("tmux not found: install the Debian package tmux")
    os.execv(tmux, argv)


def _nomad(worker: operator.Worker, vm: Path | None) -> None:
    from workers.nomad import NomadDriver, NomadError
    from workers.vm import VmSpec

    spec = read_spec(worker.artifacts)
    job = operator.nomad_job(worker)
    try:
        allocation = NomadDriver().status(spec).allocation
    except NomadError as exc:
        err.print(f"Nomad: {exc}", highlight=False)
        allocation = None
    vm_spec = VmSpec.model_validate_json(vm.read_text()) if vm else None
    for line in operator.nomad_access(allocation, vm_spec, job):
        console.print(line, highlight=False, soft_wrap=True)


def _vm(name: str) -> tuple[VmSpec, str, Path | None, Path]:
    """A VM made by `autovibe vm up`: its spec, operator user, key and known_hosts."""
    from workers.vm_host import VmFiles

    files = VmFiles.of(data_root(), name)
    try:
        spec = files.spec()
        access = json.loads(files.access_path.read_text())
    except (OSError, ValueError) as exc:
        raise fail(f"no VM {name!r} made by `autovibe vm up` ({files.folder}): {exc}") from exc
    identity = Path(access["identity"]) if access.get("identity") else None
    return spec, str(access["user"]), identity, files.known_hosts


@app.command("ssh")
def ssh(
    vm_name: Annotated[str, typer.Argument(metavar="VM", help="The VM's name (`vm ls`).")],
    command: Annotated[
        list[str] | None, typer.Argument(help="A command to run instead of a shell.")
    ] = None,
) -> None:
    """SSH into a worker VM as its first operator, with the key `vm up` was given."""
    from workers.vm_host import VmHostError, ssh_argv

    spec, user, identity, known_hosts = _vm(vm_name)
    try:
        argv = ssh_argv(spec, user, identity, known_hosts, *(["-t"] if not command else []))
    except VmHostError as exc:
        raise fail(str(exc)) from exc
    os.execvp("ssh", [*argv, *(command or [])])


@app.command("vnc")
def vnc(
    vm_name: Annotated[str, typer.Argument(metavar="VM", help="The VM's name (`vm ls`).")],
    snapshot: Annotated[
        Path | None, typer.Option(help="Save a screenshot of the desktop (PNG) and exit.")
    ] = None,
) -> None:
    """The VM's desktop over an SSH tunnel (its VNC server listens on the VM's loopback only):
    a viewer if one is installed, else the tunnel until Ctrl-C; --snapshot saves a PNG."""
    from workers.vm_host import VmHostError, tunnel, vnc_snapshot

    spec, user, identity, known_hosts = _vm(vm_name)
    if not spec.desktop:
        raise fail(f"{vm_name} has no desktop (render it with --var desktop=true)")
    try:
        with tunnel(spec, user, identity, known_hosts, spec.vnc_port) as port:
            if snapshot is not None:
                vnc_snapshot(port, snapshot)
                console.print(str(snapshot), highlight=False)
                return
            viewer = shutil.which("vncviewer") or shutil.which("xtigervncviewer")
            if viewer is not None:
                subprocess.run([viewer, f"127.0.0.1::{port}"], check=False)
                return
            console.print(f"VNC of {vm_name} on 127.0.0.1::{port} (Ctrl-C closes the tunnel)")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
    except VmHostError as exc:
        raise fail(str(exc)) from exc
