"""Operator access on a generated data tree, and real runners in real tmux sessions."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner
from worker_harness import EXAMPLES, direct_env

from contracts.dataroot import DataRoot
from workers import operator
from workers.local import LocalDriver
from workers.operator_cli import app
from workers.spec import AssignmentSpec
from workers.vm import VmSpec


def make_spec(root: DataRoot, assignment: str, endpoint: str = "http://127.0.0.1:9/v1") -> Path:
    """An assignment folder with its spec.json: builtin agent on examples/mathkit."""
    artifacts = root.assignment_dir("demo", assignment.rsplit("-", 1)[0], assignment)
    artifacts.mkdir(parents=True)
    spec = AssignmentSpec(
        assignment=assignment,
        project="demo",
        trial=assignment.rsplit("-", 1)[0],
        machine="m" + assignment[-1],
        task_id="mathkit",
        repo=EXAMPLES / "mathkit",
        prompt="fill in the stubs",
        test_command="true",
        fail_to_pass=[],
        pass_to_pass=[],
        timeout_s=120,
        agent="builtin",
        model="tiny",
        endpoint=endpoint,
        env={},
        artifacts=artifacts,
    )
    path = artifacts / "spec.json"
    path.write_text(spec.model_dump_json(indent=2))
    return path


@pytest.fixture
def root(tmp_path: Path) -> DataRoot:
    return DataRoot.at(tmp_path / "data")


@pytest.fixture
def holder() -> Iterator[Callable[[Path], subprocess.Popen[bytes]]]:
    """holder(lock) -> a process holding an flock on `lock`, as a live runner does."""
    procs: list[subprocess.Popen[bytes]] = []

    def hold(lock: Path) -> subprocess.Popen[bytes]:
        code = (
            "import fcntl, sys, time\n"
            f"fh = open({str(lock)!r}, 'w'); fcntl.flock(fh, fcntl.LOCK_EX)\n"
            "print('held', flush=True); time.sleep(120)\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
        procs.append(proc)
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_states_from_lock_and_result_files(
    root: DataRoot, holder: Callable[[Path], subprocess.Popen[bytes]]
) -> None:
    running = make_spec(root, "t1-001").parent
    proc = holder(running / "runner.lock")
    (running / "runs.jsonl").write_text(json.dumps({"pid": proc.pid, "started": 1000.0}) + "\n")
    done = make_spec(root, "t1-002").parent
    (done / "runner.lock").write_text("1")
    graded = {"agent": {"exit_cause": "finished"}, "grade": {"status": "resolved"}}
    (done / "result.json").write_text(json.dumps({"assignment": "t1-002", **graded}))
    crashed = make_spec(root, "t2-001").parent
    failed = {"assignment": "t2-001", "infra_error": "OSError: disk"}
    (crashed / "result.json").write_text(json.dumps(failed))
    stopped = make_spec(root, "t2-002").parent
    (stopped / "runner.lock").write_text("999999")
    make_spec(root, "t3-001")
    (root.root / "worker-artifacts" / "demo" / "t9" / "junk").mkdir(parents=True)
    nomad = make_spec(root, "t3-102").parent
    (nomad / "nomad-dispatch.json").write_text(json.dumps([{"token": "t3-102", "job": "j/d-1"}]))

    listed = operator.workers(root)
    assert [(w.assignment, w.state, w.pid, w.trial, w.machine) for w in listed] == [
        ("t1-001", "running", proc.pid, "t1", "m1")
    ]
    assert listed[0].started == 1000.0 and (listed[0].age_s(2000.0) or 0) == 1000.0
    states = {w.assignment: (w.state, w.driver) for w in operator.workers(root, everything=True)}
    assert states == {
        "t1-001": ("running", "local"),
        "t1-002": ("finished", "local"),
        "t2-001": ("crashed", "local"),
        "t2-002": ("stopped", "local"),
        "t3-001": ("pending", "local"),
        "t3-102": ("pending", "nomad"),
    }
    # Looking never took the lock: the runner still holds it, nobody else can get it.
    with (running / "runner.lock").open() as fh, pytest.raises(BlockingIOError):
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert operator.find(root, "t2-001").state == "crashed"
    with pytest.raises(operator.WorkerNotFound, match="ambiguous: t3-001, t3-102"):
        operator.find(root, "t3-")
    assert operator.find(root, "t3-1").assignment == "t3-102"  # a unique prefix
    with pytest.raises(operator.WorkerNotFound, match="no assignment 'zz'"):
        operator.find(root, "zz")
    proc.kill()
    proc.wait()
    assert operator.inspect(running).state == "stopped"


def test_cli_ls_and_logs(root: DataRoot, holder: Callable[[Path], subprocess.Popen[bytes]]) -> None:
    artifacts = make_spec(root, "t1-001").parent
    proc = holder(artifacts / "runner.lock")
    (artifacts / "agent.log").write_text("collecting stubs\nasking the model\n")
    (artifacts / "output").mkdir()
    (artifacts / "output" / "transcript.jsonl").write_text('{"type": "start"}\n')
    env = {"AUTOVIBE_DATA": str(root.root)}
    listing = CliRunner().invoke(app, ["ls"], env=env)
    assert listing.exit_code == 0, listing.output
    row = next(line for line in listing.output.splitlines() if "t1-001" in line)
    cells = [cell.strip() for cell in row.split("│")[1:-1]]
    assert cells[:7] == ["t1-001", "t1", "m1", "builtin", "local", "running", str(proc.pid)]
    assert cells[7].endswith("s")  # age, e.g. 0m01s
    logs = CliRunner().invoke(app, ["logs", "t1-001"], env=env)
    assert logs.exit_code == 0, logs.output
    assert logs.output.splitlines() == [
        "agent.log: collecting stubs",
        "agent.log: asking the model",
        'transcript.jsonl: {"type": "start"}',
    ]
    proc.kill()
    proc.wait()
    assert "no running workers" in CliRunner().invoke(app, ["ls"], env=env).output
    assert "stopped" in CliRunner().invoke(app, ["ls", "--all"], env=env).output
    missing = CliRunner().invoke(app, ["logs", "nope"], env=env)
    assert missing.exit_code == 1 and "no assignment 'nope'" in missing.output


def test_follow_reads_until_the_run_ends(tmp_path: Path) -> None:
    agent, transcript = tmp_path / "agent.log", tmp_path / "transcript.jsonl"
    ended = threading.Event()

    def write() -> None:
        with agent.open("a") as fh:
            for i in range(5):
                fh.write(f"line {i}\n")
                fh.flush()
                time.sleep(0.05)
            fh.write("no newline at the end")
        transcript.write_text('{"type": "finish"}\n')  # appears late
        ended.set()

    writer = threading.Thread(target=write)
    writer.start()
    seen = list(operator.follow([agent, transcript], until=ended.is_set, poll_s=0.02))
    writer.join()
    assert [(p.name, line) for p, line in seen] == [
        *(("agent.log", f"line {i}") for i in range(5)),
        ("transcript.jsonl", '{"type": "finish"}'),
        ("agent.log", "no newline at the end"),
    ]


def test_nomad_access_commands() -> None:
    vm = VmSpec(name="w7", address="10.0.0.7", desktop=True, ssh_port=2222)
    assert operator.nomad_access("a1b2", vm) == [
        "nomad alloc exec -task runner a1b2 /bin/sh",
        "ssh -p 2222 10.0.0.7",
        "ssh -p 2222 -N -L 5901:127.0.0.1:5901 10.0.0.7   # then: vncviewer 127.0.0.1:5901",
        "virsh domdisplay w7   # VM console (VNC), on its libvirt host",
    ]
    lines = operator.nomad_access(None, VmSpec(name="w8"), job="autovibe-worker-builtin/d-1")
    assert "nomad job allocs autovibe-worker-builtin/d-1" in lines[0]
    assert lines[1] == "nomad alloc exec -task runner <allocation> /bin/sh"
    assert "virsh domifaddr w8" in lines[2]


# -- real runners in real tmux sessions ----------------------------------------------------------


@pytest.fixture
def tmux_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A tmux server of the tests' own (TMUX_TMPDIR), started without proxy variables."""
    assert shutil.which("tmux"), "tmux not found: install the Debian package tmux"
    short = Path(tempfile.mkdtemp(prefix="tmx"))  # the socket path must stay under 108 bytes
    for key in list(os.environ):
        if key not in direct_env():
            monkeypatch.delenv(key)
    monkeypatch.setenv("TMUX_TMPDIR", str(short))
    monkeypatch.delenv("TMUX", raising=False)
    yield short
    subprocess.run(operator.tmux("kill-server"), capture_output=True)
    shutil.rmtree(short, ignore_errors=True)


def pane(session: str, pane_id: str = "") -> str:
    """What a pane of the session shows now (the active one, the runner's, by default)."""
    argv = operator.tmux("capture-pane", "-p", "-t", pane_id or f"={session}:")
    return subprocess.run(argv, capture_output=True, text=True).stdout


def panes(session: str) -> dict[str, int]:
    """pane id -> pid of the process it runs, for every pane of the session."""
    argv = operator.tmux("list-panes", "-t", f"={session}:", "-F", "#{pane_id} #{pane_pid}")
    listed = subprocess.run(argv, capture_output=True, text=True).stdout.split()
    return {listed[i]: int(listed[i + 1]) for i in range(0, len(listed), 2)}


def tmux_env(*target: str) -> str:
    """`show-environment` of the server (-g) or of a session (-t =NAME)."""
    argv = operator.tmux("show-environment", *target)
    return subprocess.run(argv, capture_output=True, text=True).stdout


def wait(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A model endpoint that accepts and never answers: the agent waits, the runner lives."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    yield f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
    silent.close()


def spec_of(spec_path: Path) -> AssignmentSpec:
    return AssignmentSpec.model_validate_json(spec_path.read_text())


def test_local_driver_runs_the_runner_in_a_tmux_session_to_its_result(
    root: DataRoot, tmux_dir: Path
) -> None:
    spec = spec_of(make_spec(root, "t1.x-001"))  # `.` is not allowed in a tmux session name
    driver = LocalDriver()
    assert driver.tmux
    driver.launch(spec)
    session = operator.session_name(spec.assignment)
    assert session == "autovibe-t1_x-001"
    wait(lambda: spec.result_path.exists())
    wait(lambda: not operator.has_session(session), timeout=10)  # it ends with the runner
    result = json.loads(spec.result_path.read_text())
    assert result["agent"]["exit_cause"] == "model_unreachable"  # nothing listens at the endpoint
    assert operator.inspect(spec.artifacts).state == "finished"
    assert not driver.alive(spec)
    logs = CliRunner().invoke(app, ["logs", "t1.x-001"], env={"AUTOVIBE_DATA": str(root.root)})
    assert "transcript.jsonl: " in logs.output


def test_attach_watch_type_into_and_interrupt_a_live_runner(
    root: DataRoot, tmux_dir: Path, silent_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tmux server already runs, started from an operator's shell with variables of its own.
    shell_env = {**os.environ, "OPERATOR_ONLY": "from-the-shell"}
    subprocess.run(
        operator.tmux("new-session", "-d", "-s", "operator", "sleep", "300"), env=shell_env
    )
    monkeypatch.setenv("AUTOVIBE_PROBE_SECRET", "s3cret")  # in the orchestrator's environment
    spec = spec_of(make_spec(root, "t1-001", endpoint=silent_endpoint))
    LocalDriver().launch(spec)
    session = operator.session_name(spec.assignment)
    assert operator.has_session(session)
    worker = operator.inspect(spec.artifacts)
    assert worker.state == "running"

    # The runner is the session's first pane and the lock holder: kill_group reaches it.
    shown = subprocess.run(
        operator.tmux("display-message", "-p", "-t", f"={session}:", "#{pane_pid}"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert worker.pid == int(shown.stdout) == int(spec.lock_path.read_text())
    assert os.getpgid(worker.pid) == worker.pid == os.getsid(worker.pid)
    # The orchestrator's environment reaches the runner, in its own pane only; what the
    # server was started with beyond that does not.
    environ = Path(f"/proc/{worker.pid}/environ").read_bytes().split(b"\0")
    assert b"AUTOVIBE_PROBE_SECRET=s3cret" in environ
    assert not any(var.startswith(b"OPERATOR_ONLY=") for var in environ)
    for listed in (tmux_env("-g"), tmux_env("-t", f"={session}"), tmux_env("-t", "=operator")):
        assert "s3cret" not in listed

    # The second pane follows the agent's own output.
    (agent_pane,) = [p for p, pid in panes(session).items() if pid != worker.pid]
    agent_log = spec.artifacts / "agent.log"
    wait(agent_log.exists)  # the runner has started the agent
    with agent_log.open("a") as fh:
        fh.write("a line of the agent's\n")
    wait(lambda: "a line of the agent's" in pane(session, agent_pane))

    env = {"AUTOVIBE_DATA": str(root.root), "TMUX_TMPDIR": str(tmux_dir)}
    attach = CliRunner().invoke(app, ["attach", "t1-001"], env=env)
    assert attach.exit_code == 0, attach.output
    assert attach.output.strip() == "tmux -L autovibe attach-session -t =autovibe-t1-001"

    # What an attached operator does: type into the runner's pane, see it there, and stop the
    # runner with C-c (it ends without a result: the scheduler runs the assignment again).
    subprocess.run(operator.tmux("send-keys", "-t", f"={session}:", "hello", ""), check=True)
    wait(lambda: "hello" in pane(session))
    subprocess.run(operator.tmux("send-keys", "-t", f"={session}:", "C-c", ""), check=True)
    wait(lambda: not operator.has_session(session), timeout=15)
    assert operator.inspect(spec.artifacts).state == "stopped"
    assert not spec.result_path.exists()
    assert "KeyboardInterrupt" in (spec.artifacts / "runner.log").read_text()  # the pane's copy
    gone = CliRunner().invoke(app, ["attach", "t1-001"], env=env)
    assert gone.exit_code == 1 and "t1-001 is stopped" in gone.output


def test_a_runner_outlives_its_driver_and_is_cancelled_by_the_next_one(
    root: DataRoot, tmux_dir: Path, silent_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOVIBE_PROBE_SECRET", "s3cret")
    spec = spec_of(make_spec(root, "t1-002", endpoint=silent_endpoint))
    LocalDriver().launch(spec)
    session = operator.session_name(spec.assignment)
    # The driver started the tmux server: neither its command line (`ps`) nor the global
    # environment every session inherits holds what the runner was given.
    server = subprocess.run(
        operator.tmux("display-message", "-p", "#{pid}"), capture_output=True, text=True
    )
    assert b"s3cret" not in Path(f"/proc/{int(server.stdout)}/cmdline").read_bytes()
    assert "AUTOVIBE_PROBE_SECRET" not in tmux_env("-g")
    pid = int(spec.lock_path.read_text())
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert parent != os.getpid()  # the tmux server's child: no orchestrator to outlive

    restarted = LocalDriver()  # what a restarted orchestrator has: no memory of the launch
    assert restarted.alive(spec)
    restarted.cancel(spec)
    wait(lambda: not operator.has_session(session), timeout=15)
    assert not restarted.alive(spec)
    assert operator.inspect(spec.artifacts).state == "stopped"


def test_without_tmux_the_runner_is_a_plain_detached_subprocess(
    root: DataRoot,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no tmux on it
    with caplog.at_level(logging.WARNING, logger="workers.local"):
        driver = LocalDriver()
    monkeypatch.setenv("PATH", path)  # the runner needs git
    assert not driver.tmux
    assert "tmux not found" in caplog.text
    spec = spec_of(make_spec(root, "t2-001"))
    driver.launch(spec)
    wait(lambda: spec.result_path.exists())
    assert json.loads(spec.result_path.read_text())["agent"]["exit_cause"] == "model_unreachable"
    wait(lambda: not driver.alive(spec))
