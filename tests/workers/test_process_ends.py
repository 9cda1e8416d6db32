"""`common.processes.ProcessEnds`, the local driver's way of hearing its runners end (issue 22),
and `wait`, the runner's way of hearing its agent and tests end:
real processes, a child and one that is not ours (as a runner in a tmux pane is not)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from common.processes import ProcessEnds, wait


def test_the_listeners_hear_a_child_and_a_stranger_end() -> None:
    ends = ProcessEnds()
    ended = threading.Event()
    ends.listen(ended.set)
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    ends.watch(child.pid)
    assert not ended.wait(0.2)  # it still runs
    assert child.stdin is not None
    child.stdin.close()
    assert ended.wait(30)
    child.wait()

    ended.clear()
    # Started by a shell that has already exited: not our child.
    shell = subprocess.run(
        ["/bin/sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    stranger = int(shell.stdout)
    ends.watch(stranger)
    assert not ended.wait(0.2)
    os.kill(stranger, signal.SIGKILL)
    assert ended.wait(30)


def test_a_process_already_gone_is_heard_at_once() -> None:
    ends = ProcessEnds()
    ended = threading.Event()
    ends.listen(ended.set)
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names nothing now
    ends.watch(gone.pid)
    assert ended.is_set()


def test_wait_returns_when_the_child_ends_and_times_out_while_it_runs() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.exit(len(sys.stdin.read()))"],
        stdin=subprocess.PIPE,
    )
    with pytest.raises(subprocess.TimeoutExpired):
        wait(child, 0.2)  # it still runs
    assert child.stdin is not None
    child.stdin.write(b"xyz")
    child.stdin.close()
    assert wait(child, 30) == 3
    assert wait(child, 30) == 3  # already reaped: its status again
