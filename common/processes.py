"""Child processes the platform and its tests start (servers, proxies, runners): stopping one,
hearing when one ends, and what Linux's /proc says of a process (its command line,
descendants, CPU time)."""

from __future__ import annotations

import os
import select
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def stop(process: subprocess.Popen[bytes], timeout_s: float = 15) -> int:
    """SIGTERM, then SIGKILL if it is still running after `timeout_s`; reaps it and returns its
    exit status (negative: the signal that ended it)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def wait(process: subprocess.Popen[bytes], timeout_s: float | None = None) -> int:
    """`process.wait(timeout_s)`, woken through a pidfd the moment the process ends, where
    Popen.wait polls with sleeps that double up to 50 ms. Raises subprocess.TimeoutExpired."""
    if timeout_s is not None and process.returncode is None:
        ended = select.poll()
        fd = os.pidfd_open(process.pid)  # our unreaped child: valid even once it has exited
        try:
            ended.register(fd, select.POLLIN)
            if not ended.poll(max(0.0, timeout_s) * 1000):
                raise subprocess.TimeoutExpired(process.args, timeout_s)
        finally:
            os.close(fd)
    return process.wait()


def pids() -> list[int]:
    """Every process's pid, from /proc (some may end while they are read)."""
    return [int(proc.name) for proc in Path("/proc").iterdir() if proc.name.isdigit()]


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses): the
    first is field 3, the state."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def runs(pid: int) -> bool:
    """Whether `pid` exists and has not exited: a zombie (exited, not yet reaped by the parent
    that started it) does not run, though `kill(pid, 0)` still finds it."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    """`pid`'s command line, arguments joined by spaces; empty if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) `pid` has used so far; OSError if it is gone."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / TICKS


def descendants(pid: int) -> list[int]:
    """`pid`'s living descendants (not `pid`)."""
    children: dict[int, list[int]] = {}
    for child in pids():
        try:
            parent = int(_stat_fields(child)[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(child)
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def group_members(pgid: int) -> list[int]:
    """The processes of group `pgid` that still run (zombies, dead but not yet reaped, left
    out: they hold no memory, GPU or port)."""
    found = []
    for pid in pids():
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(pid)
    return found


class ProcessEnds:
    """Calls its listeners (on a thread of its own) each time a watched process ends: a pidfd
    per process (Linux 5.3+), one epoll over them, so that the end of a process that is not our
    child (a runner in a tmux pane) is an event rather than something to poll for."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._fds: dict[int, int] = {}
        """pidfd -> pid."""
        self._listeners: set[Callable[[], None]] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def listen(self, wake: Callable[[], None]) -> None:
        """Call `wake` whenever a watched process ends (once per listener: listening again
        with the same callable changes nothing)."""
        with self._lock:
            self._listeners.add(wake)

    def watch(self, pid: int) -> None:
        """Tell the listeners when `pid` ends; at once if it already has."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._notify()
            return
        with self._lock:
            self._fds[fd] = pid
            self._epoll.register(fd, select.EPOLLIN)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="process-ends", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            for fd, _ in self._epoll.poll():
                with self._lock:
                    self._epoll.unregister(fd)
                    del self._fds[fd]
                os.close(fd)
                self._notify()

    def _notify(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for wake in listeners:
            wake()
