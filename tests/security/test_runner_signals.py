"""Cancel and the runner's environment, through the real local driver (issue 17, finding 5).

A runner is launched as the orchestrator does (`LocalDriver.launch`, in a tmux pane or as a
detached subprocess), its agent a `sleep` so that it stays alive. Cancel signals the process
group the driver recorded, only while its leader still is this runner: a pid written into
runner.lock (a process of the host's, group 1, our own group) is never signalled. The runner
is given the orchestrator's settings and secret-store variables, none of its other keys.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from contracts.dataroot import DataRoot
from workers import local, operator
from workers.local import PGID_FILE, LocalDriver, runner_group
from workers.spec import AssignmentSpec


def wait(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(params=[True, False], ids=["tmux", "detached"])
def driver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The local driver, with runners in a tmux server of the test's own or detached."""
    short = Path(tempfile.mkdtemp(prefix="tmx"))  # a socket path stays under 108 bytes
    monkeypatch.setenv("TMUX_TMPDIR", str(short))
    monkeypatch.delenv("TMUX", raising=False)
    if request.param:
        assert shutil.which("tmux"), "tmux not found: install the Debian package tmux"
    yield LocalDriver(tmux=request.param)
    subprocess.run(operator.tmux("kill-server"), capture_output=True)
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def decoy() -> Iterator[subprocess.Popen[bytes]]:
    """A host process leading a group of its own: what a forged pid would name."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def launch(tmp_path: Path, driver: LocalDriver) -> Iterator[Callable[[], AssignmentSpec]]:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("a task\n")
    root = DataRoot.at(tmp_path / "data")
    specs: list[AssignmentSpec] = []

    def start() -> AssignmentSpec:
        assignment = f"ts-{len(specs):03d}"
        spec = AssignmentSpec(
            assignment=assignment,
            project="p",
            trial="ts",
            machine="m1",
            task_id="sleepy",
            repo=repo,
            prompt="wait",
            test_command="true",
            fail_to_pass=[],
            pass_to_pass=[],
            timeout_s=300,
            agent="command",
            agent_command=["sleep", "300"],
            model="tiny",
            endpoint="http://127.0.0.1:9/v1",
            env={},
            artifacts=DataRoot.ensure(root.assignment_dir("p", "ts", assignment)),
            data_root=root.root,
        )
        driver.launch(spec)
        assert driver.alive(spec)
        wait(lambda: (spec.artifacts / "agent.log").exists())  # the agent runs
        specs.append(spec)
        return spec

    yield start
    for spec in specs:  # whatever a failed test left running
        pgid = runner_group(spec)
        if pgid is not None:
            local.kill_group(pgid)


def group_of(spec: AssignmentSpec) -> int:
    return int((spec.artifacts / PGID_FILE).read_text())


def test_cancel_never_signals_a_pid_written_in_runner_lock(
    driver: LocalDriver, launch: Callable[[], AssignmentSpec], decoy: subprocess.Popen[bytes]
) -> None:
    spec = launch()
    # What an agent with the runner's folder could write: another process's pid.
    with spec.lock_path.open("r+") as fh:
        fh.truncate(0)
        fh.write(str(decoy.pid))
    driver.cancel(spec)
    assert decoy.poll() is None, "the host process named in runner.lock was signalled"
    wait(lambda: not driver.alive(spec), timeout=20)  # the runner itself was stopped
    session = operator.session_name(spec.assignment)
    wait(lambda: not operator.has_session(session), timeout=15)  # it ends with the runner


def test_cancel_signals_only_a_group_still_led_by_the_runner(
    driver: LocalDriver, launch: Callable[[], AssignmentSpec], decoy: subprocess.Popen[bytes]
) -> None:
    spec = launch()
    pgid = group_of(spec)
    assert runner_group(spec) == pgid == os.getpgid(pgid)
    recorded = spec.artifacts / PGID_FILE
    # A recorded group whose pid now names another process (the runner died, the pid was
    # reused), group 1, our own group, or no number: none is signalled.
    for forged in (decoy.pid, 1, os.getpgrp(), os.getpid(), "x"):
        recorded.write_text(f"{forged}\n")
        assert runner_group(spec) is None
        driver.cancel(spec)
    assert decoy.poll() is None
    assert driver.alive(spec)
    recorded.write_text(f"{pgid}\n")
    driver.cancel(spec)
    wait(lambda: not driver.alive(spec), timeout=20)


def test_the_runner_gets_only_its_settings_of_the_orchestrators_environment(
    launch: Callable[[], AssignmentSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-orchestrator-shell")
    monkeypatch.setenv("DATABASE_URL", "postgresql://autovibe:hunter2@db/autovibe")
    monkeypatch.setenv("AUTOVIBE_PROBE_SETTING", "kept")
    monkeypatch.setenv("VAULT_ROLE_ID", "role-for-redaction")
    spec = launch()
    environ = Path(f"/proc/{group_of(spec)}/environ").read_bytes().split(b"\0")
    names = {var.split(b"=", 1)[0].decode() for var in environ if var}
    assert "ANTHROPIC_API_KEY" not in names and "DATABASE_URL" not in names
    assert b"AUTOVIBE_PROBE_SETTING=kept" in environ
    assert b"VAULT_ROLE_ID=role-for-redaction" in environ  # the runner redacts with the store
    assert {"PATH", "HOME"} <= names
    tmux_own = {"SHELL", "TERM", "TERM_PROGRAM", "TERM_PROGRAM_VERSION", "TMUX", "TMUX_PANE"}
    others = {n for n in names if not n.startswith(("AUTOVIBE_", "LC_"))}
    assert others <= set(local.RUNNER_ENV) | tmux_own, others
