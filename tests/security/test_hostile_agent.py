"""A hostile agent against the real runner and sandbox (issue 17, findings 3, 4, 5 and 9).

Each test runs `python -m workers.runner SPEC` as the local driver does, with the `command`
agent running `hostile/agent.py ATTACK`, bubblewrap around it and the proxy bridge in place,
and a secret in the runner's own environment. It asserts that the attack failed, that nothing
outside the sandbox changed (host files' hashes, the data root) and that the attempt is in
agent.log.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from contracts.dataroot import DataRoot
from contracts.settings import SANDBOX_HOST_UID, free_port
from workers import sandbox
from workers.spec import AssignmentSpec, SandboxSpec

AGENT = Path(__file__).parent / "hostile" / "agent.py"
SECRET = "orchestrator-secret-" + uuid.uuid4().hex[:8]
API_KEY = "sk-ant-" + uuid.uuid4().hex
REAL_TEST: dict[str, Any] = {
    # Without the plugins of our own environment: 0.2 s, not 2.7.
    "test_command": f"PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 {sys.executable} -m pytest -q test_task.py",
    "fail_to_pass": ("test_task.py::test_task",),
}
"""The task's own test (`test_task.py`, passes), run by grading in its sandbox."""


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p): digest(p) for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()
    }


class Run:
    """One hostile assignment's outcome: result.json, what the agent printed, agent.log."""

    def __init__(self, spec: AssignmentSpec, wall_s: float) -> None:
        self.spec = spec
        self.wall_s = wall_s
        self.result: dict[str, Any] = json.loads(spec.result_path.read_text())
        self.log = (spec.artifacts / "agent.log").read_text(errors="replace")
        self.seen: dict[str, Any] = {}
        for line in self.log.splitlines():
            if line.startswith("{"):
                self.seen = json.loads(line)


@pytest.fixture
def root(tmp_path: Path) -> DataRoot:
    root = DataRoot.at(tmp_path / "data")
    DataRoot.ensure(root.secrets)
    (root.secrets / "admin-token").write_text("vault-admin-" + uuid.uuid4().hex)
    return root


@pytest.fixture
def hostile(tmp_path: Path, root: DataRoot) -> Any:
    sandbox.require_tools()
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("a task\n")
    # A test that forks (the shell, then python) and passes as the task has it.
    (repo / "test_task.py").write_text("def test_task():\n    assert True\n")

    def run(
        attack: str,
        *args: str,
        timeout_s: int = 60,
        assignment: str = "",
        read_only: list[Path] | None = None,
        test_command: str = "true",
        fail_to_pass: tuple[str, ...] = ("x",),
        **limits: int,
    ) -> Run:
        assignment = assignment or f"a-{attack}-{uuid.uuid4().hex[:6]}"
        artifacts = DataRoot.ensure(root.assignment_dir("p", "t", assignment))
        spec = AssignmentSpec(
            assignment=assignment,
            project="p",
            trial="t",
            machine="m1",
            task_id="hostile",
            repo=repo,
            prompt="escape",
            test_command=test_command,
            fail_to_pass=list(fail_to_pass),
            pass_to_pass=[],
            timeout_s=timeout_s,
            agent="command",
            agent_command=[sys.executable, str(AGENT), attack, *args],
            model="tiny",
            endpoint="http://127.0.0.1:9/v1",
            env={"AUTOVIBE_ASSIGNMENT": assignment},
            artifacts=artifacts,
            data_root=root.root,
            sandbox=SandboxSpec(
                proxy_host="127.0.0.1",
                proxy_port=free_port(),
                memory_mb=1024,
                cpus=1.0,
                hidden=[root.root],
                read_only=read_only or [],
                **limits,
            ),
        )
        (artifacts / "spec.json").write_text(spec.model_dump_json())
        env = {**os.environ, "AUTOVIBE_TEST_SECRET": SECRET, "ANTHROPIC_API_KEY": API_KEY}
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "workers.runner", str(artifacts / "spec.json")],
            env=env,
            capture_output=True,
            timeout=timeout_s + 60,
        )
        return Run(spec, time.monotonic() - started)

    return run


def test_the_orchestrators_environment_does_not_reach_the_agent(hostile: Any) -> None:
    run = hostile("env", SECRET, API_KEY)
    assert run.seen["leaked"] == [], run.log
    assert "AUTOVIBE_TEST_SECRET" not in run.seen["names"]
    assert "ANTHROPIC_API_KEY" not in run.seen["names"]
    assert set(run.seen["names"]) <= sandbox.ENV_ALLOWED | {
        "AUTOVIBE_PROMPT_FILE",
        "AUTOVIBE_OUTPUT",
        "PWD",
        "SHLVL",
        "_",
    } | {n for n in run.seen["names"] if n.startswith("LC_")}


def test_host_files_the_data_root_and_other_assignments_are_out_of_sight(
    hostile: Any, root: DataRoot
) -> None:
    other = DataRoot.ensure(root.assignment_dir("p", "t", "a-other") / "workspace")
    (other / "solution.py").write_text("theirs")
    marker = Path("/root") / f"autovibe-marker-{uuid.uuid4().hex[:8]}"
    marker.write_text("host secret")
    try:
        before = tree_digest(root.root)
        paths = ["/root/.ssh", str(marker), "/etc/shadow", "/etc/gshadow", "/home",
                 str(root.secrets / "admin-token"), str(other / "solution.py")]  # fmt: skip
        run = hostile("files", *paths)
        assert digest(marker) == hashlib.sha256(b"host secret").hexdigest()
    finally:
        marker.unlink()
    for path in paths:
        assert run.seen[path] != "ok", (path, run.log)
    assert "FileNotFoundError" in run.seen["/etc/shadow"] or "Permission" in run.seen["/etc/shadow"]
    after = tree_digest(root.root)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing changed


def test_control_files_are_invisible_and_the_result_is_the_runners(
    hostile: Any, root: DataRoot
) -> None:
    artifacts = root.assignment_dir("p", "t", "a-control")
    names = ("result.json", "report.json", "runner.lock", "spec.json", "routing.json")
    run = hostile("control", *(str(artifacts / n) for n in names), assignment="a-control")
    # What the agent wrote, if anything, went to its own private tmpfs (the data root of this
    # test lies under /tmp): every host control file is the runner's.
    assert set(run.seen) == {str(artifacts / n) for n in names}, run.log
    for name in names:
        path = artifacts / name
        assert not path.exists() or '{"grade": {"status"' not in path.read_text(), name
    assert run.result["agent"]["exit_cause"] == "finished", run.result
    assert run.result["assignment"] == "a-control"
    assert json.loads((artifacts / "spec.json").read_text())["assignment"] == "a-control"


def test_a_planted_transcript_symlink_is_not_followed(hostile: Any, tmp_path: Path) -> None:
    target = Path("/etc") / f"autovibe-target-{uuid.uuid4().hex[:8]}"
    target.write_text("host file\n")
    try:
        before = digest(target)
        run = hostile("symlink", str(target), **REAL_TEST)
        assert digest(target) == before
    finally:
        target.unlink()
    assert "planted" in run.seen, run.log
    # The host refused to read through it. The agent's own doing, so its ending (named in the
    # result) and graded by the real tests; not an infra error, which would be run again.
    assert "infra_error" not in run.result, run.result
    agent = run.result["agent"]
    assert agent["exit_cause"] == "crashed", agent
    assert agent["detail"].startswith(f"{run.spec.output / 'transcript.jsonl'} refused"), agent
    assert run.result["grade"]["fail_to_pass"] == {"test_task.py::test_task": "PASSED"}


def test_an_agent_log_symlink_left_on_the_host_is_not_written_through(
    hostile: Any, root: DataRoot
) -> None:
    target = Path("/etc") / f"autovibe-target-{uuid.uuid4().hex[:8]}"
    target.write_text("host file\n")
    artifacts = DataRoot.ensure(root.assignment_dir("p", "t", "a-log"))
    (artifacts / "agent.log").symlink_to(target)  # as an unconfined earlier attempt could
    try:
        run = hostile("env", assignment="a-log")
        assert digest(target) == hashlib.sha256(b"host file\n").hexdigest()
    finally:
        target.unlink()
    assert "Too many levels of symbolic links" in run.result["infra_error"], run.result


def test_a_host_process_cannot_be_signalled(hostile: Any) -> None:
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        run = hostile("kill", str(sleeper.pid))
        assert sleeper.poll() is None, "the host's sleep was killed"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run.seen["kill"].startswith("ProcessLookupError"), run.log
    assert run.seen["uid"] == sandbox.SANDBOX_UID


@pytest.mark.skipif(
    os.geteuid() != 0, reason="as a user the runner starts bubblewrap as that user already"
)
def test_on_the_host_the_agent_is_an_unprivileged_user_not_root(
    hostile: Any, tmp_path: Path
) -> None:
    # A root-only file the sandbox shows: mapped to root, the agent would own and read it.
    private = tmp_path / "root-only.txt"
    private.write_text("root only")
    private.chmod(0o600)
    run = hostile("identity", str(private), read_only=[private])
    assert run.seen["uid"] == sandbox.SANDBOX_UID, run.log
    assert run.seen[str(private)].startswith("PermissionError"), run.log
    # What it writes is the sandbox user's on the host; the runner still reads it back.
    assert (run.spec.workspace / "mine.txt").stat().st_uid == SANDBOX_HOST_UID
    assert run.result["agent"]["exit_cause"] == "finished", run.result
    assert run.result["grade"]["status"] in {"resolved", "unresolved"}, run.result


def test_a_fork_bomb_is_bounded_and_grading_still_runs(hostile: Any) -> None:
    # The default process limit. The bomb's children sleep; the agent then goes over its
    # workspace limit and the runner kills the sandbox, full: every process of it is gone
    # before grading, whose own sandbox (limits afresh) runs the real test.
    limit = SandboxSpec.model_fields["processes"].default
    run = hostile("forkbomb", "24", workspace_mb=16, timeout_s=30, **REAL_TEST)
    assert run.seen["children"] < limit, run.log
    assert "BlockingIOError" in run.seen["error"], run.log  # EAGAIN
    killed = re.search(r"autovibe runner: (\d+) processes of the sandbox killed\n", run.log)
    assert killed and int(killed[1]) > run.seen["children"], run.log
    assert "infra_error" not in run.result, run.result
    assert run.result["agent"]["exit_cause"] == "crashed", run.result  # over its workspace
    tests_log = (run.spec.artifacts / "tests.log").read_text()
    assert run.result["grade"]["fail_to_pass"] == {"test_task.py::test_task": "PASSED"}, tests_log
    assert run.result["grade"]["status"] == "resolved", run.result
    assert run.wall_s < 30
    assert subprocess.run(["true"]).returncode == 0  # the host still forks


@pytest.mark.skipif(sandbox._pids_hierarchy() is None, reason="no pids cgroup to fill")
def test_a_sandbox_that_cannot_start_is_an_infra_error_not_a_grade(hostile: Any) -> None:
    # One process allowed: bubblewrap cannot make the sandbox's namespaces, and no agent ran.
    run = hostile("env", processes=1)
    assert "sandbox did not start" in run.result["infra_error"], run.result
    assert "Creating new namespace failed" in run.result["infra_error"], run.result
    assert "grade" not in run.result, run.result


@pytest.mark.slow
def test_tmp_is_bounded(hostile: Any) -> None:
    run = hostile("fill", "/tmp", "64", tmp_mb=16, timeout_s=10)
    assert run.seen["written_mb"] <= 16, run.log
    assert "No space left" in run.seen["error"], run.log


def test_the_workspace_is_bounded(hostile: Any) -> None:
    run = hostile("fill", ".", "48", workspace_mb=16, timeout_s=30)
    # Each file is capped (RLIMIT_FSIZE) and the runner kills the agent past the total.
    assert run.result["agent"]["exit_cause"] == "crashed", run.result
    assert "over the" in run.result["agent"]["detail"], run.result
    assert "agent killed" in run.log
    assert run.wall_s < 30
