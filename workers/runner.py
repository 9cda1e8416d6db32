"""Runs one assignment to the end: workspace, agent (own process group, timeout), grading.

Started detached by a worker driver (`python -m workers.runner SPEC`), so an orchestrator
restart never interrupts it. It holds an exclusive lock on `runner.lock` while alive and
writes `result.json` atomically last: the orchestrator reads liveness from the lock and the
outcome from the file, and never starts an assignment whose runner still holds the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import processes
from contracts.dataroot import DataRoot, atomic_write, open_log, open_nofollow
from contracts.harbor import HARBOR_PARSER
from contracts.results import AgentResult, GradeResult, RunnerResult
from contracts.settings import Settings
from workers import grading, pristine, redact, sandbox, workspace
from workers.agents import get_agent
from workers.agents.base import AgentOutcome, AgentRun, ExitCause, UntrustedFile
from workers.spec import AssignmentSpec

KILL_GRACE_S = 5.0
WATCH_S = 1.0
"""How often the runner measures the workspace while the agent runs."""


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str))


def kill_group(pid: int, leader: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after a grace period.

    Pass the group leader's Popen when it is our child: it is reaped while we wait, else its
    zombie would keep the group alive for the whole grace period.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_S
    while time.monotonic() < deadline:
        if leader is not None:
            leader.poll()
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def tree_bytes(folder: Path) -> int:
    """Disk space used under `folder` (allocated blocks), symlinks not followed."""
    total = 0
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.lstat(os.path.join(parent, name)).st_blocks * 512
    return total


def run_agent(spec: AssignmentSpec, phases: dict[str, float] | None = None) -> AgentOutcome:
    """Start the agent (sandboxed when the spec says so), wait for it within its timeout and
    its workspace limit, kill its process group, and read what it left; `phases` gets when
    it was started and when its group was gone."""
    phases = {} if phases is None else phases
    agent = get_agent(spec.agent, spec.data_root)
    DataRoot.ensure(spec.output)
    run = AgentRun(
        workspace=spec.workspace,
        prompt=spec.prompt,
        endpoint=spec.endpoint,
        model=spec.model,
        artifacts=spec.output,
        timeout_s=spec.timeout_s,
        log=spec.artifacts / "agent.log",
        agent_command=tuple(spec.agent_command),
    )
    prompt_fd = open_nofollow(
        spec.output / "prompt.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, below=spec.output
    )
    with os.fdopen(prompt_fd, "w") as fh:
        fh.write(spec.prompt)
    # Only the allowlist: nothing of the orchestrator's environment reaches the agent.
    env = sandbox.agent_env(spec.env)
    argv = agent.command(run)
    limit = spec.sandbox.workspace_mb * 1024 * 1024 if spec.sandbox is not None else None
    detail = ""
    confined = None
    # The bridge is left (stopped) only after the sandbox is killed, on every ending.
    with contextlib.ExitStack() as stack, open_log(spec.artifacts / "agent.log") as log:
        if spec.sandbox is not None:
            confined = stack.enter_context(sandbox.confine(spec, argv, env))
            argv, env = confined.argv, confined.env
        phases["agent_start"] = time.time()
        proc = subprocess.Popen(
            argv,
            cwd=spec.workspace,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=confined.pass_fds if confined is not None else (),
        )
        timed_out = False
        deadline = time.monotonic() + spec.timeout_s
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                if limit is not None:
                    used = tree_bytes(spec.workspace) + tree_bytes(spec.output)
                    if used > limit:
                        detail = f"workspace and output hold {used} bytes, over the {limit} limit"
                        log.write(f"\nautovibe runner: {detail}: agent killed\n".encode())
                        break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    processes.wait(proc, min(WATCH_S, max(0.0, deadline - time.monotonic())))
        finally:
            # Also on cancel (SIGTERM) and when the agent exited but left children behind.
            # Sandboxed, the runner goes on only once none of the sandbox's processes runs:
            # grading's sandbox comes next, and what a fork bomb left must not be in its way.
            if confined is None:
                kill_group(proc.pid, proc)
            else:
                ended = sandbox.end(proc, confined)
                if ended.killed or ended.left:
                    log.write(f"\nautovibe runner: {ended}\n".encode())
        exit_code = proc.wait()
        if confined is not None:
            confined.check_started(spec.artifacts / "agent.log")  # an infra error: nothing ran
    phases["agent_end"] = time.time()
    try:
        outcome = agent.collect(run, None if timed_out else exit_code, timed_out)
    except UntrustedFile as exc:
        # What the agent left is its own doing: its ending, graded as usual, not the
        # platform's failure (an infra error is run again).
        cause: ExitCause = "timeout" if timed_out else "crashed"
        outcome = AgentOutcome(cause, None if timed_out else exit_code, exc.path, detail=str(exc))
    outcome.version = outcome.version or agent.version()
    if detail:
        outcome.exit_cause, outcome.detail = "crashed", detail
    return outcome


def use_environment(spec: AssignmentSpec) -> None:
    """Build (or find) the task's environment and have the sandboxes use it as their root; with
    setup commands, the workspace is copied from the tree they left (`workers.setups`)."""
    # Imported here: most assignments have neither, and a runner starts for every one.
    from workers import environments, setups

    if spec.sandbox is None:
        raise environments.BuildFailed(
            f"task {spec.task_id}: a task environment is a sandbox's root; this assignment "
            "runs unsandboxed (sandbox.kind: none)"
        )
    data_root = spec.data_root or DataRoot.at(Settings().data).root
    if spec.environment:
        rootfs = environments.ensure(data_root, spec.environment)
        spec.sandbox = spec.sandbox.model_copy(update={"rootfs": rootfs})
    if spec.setup:
        spec.repo = setups.ensure(spec, data_root)


def run(spec: AssignmentSpec) -> RunnerResult:
    """Workspace, agent, tests; `report.json` (SWE-bench style) is written on every ending but
    a cancel, before the caller writes `result.json`."""
    started = time.time()
    patch_path = spec.artifacts / "patch.diff"
    report_path = spec.artifacts / "report.json"
    report_path.unlink(missing_ok=True)  # an earlier attempt's report is not this one's
    diff = ""
    phases: dict[str, float] = {}
    # Host-only: the baseline the patch is taken against and the tests are restored from.
    baseline = spec.artifacts / "baseline.git"
    try:
        if spec.environment or spec.setup:
            use_environment(spec)
            phases["environment"] = time.time()
        workspace.prepare(spec.repo, spec.workspace, baseline)
        phases["workspace"] = time.time()
        outcome = run_agent(spec, phases)
        # The patch first: what the agent left, test edits included; then the task's tests
        # are put back, and any edit of theirs is kept apart and flagged.
        diff = workspace.patch(spec.workspace, baseline)
        atomic_write(patch_path, diff.encode(errors="surrogateescape"))
        # As SWE-bench: the files the test_patch touches are put back too, then it is applied.
        test_patch = spec.artifacts / "test.patch"
        touched: list[str] = []
        harbor = spec.parser == HARBOR_PARSER
        if spec.test_patch:
            atomic_write(test_patch, spec.test_patch.encode(errors="surrogateescape"))
            if not harbor:
                touched = grading.patched_paths(spec.workspace, baseline, test_patch)
        tests = [] if harbor else [*spec.fail_to_pass, *spec.pass_to_pass]
        tampering = pristine.restore(spec.workspace, baseline, [*tests, *touched])
        verifier: grading.Verifier | None = None
        if harbor:
            verifier = grading.harbor_verifier(spec.artifacts / "verifier", baseline, test_patch)
        elif spec.test_patch:
            grading.apply_test_patch(spec.workspace, baseline, test_patch, spec.task_id)
        tampered_path = spec.artifacts / "tests-tampered.diff"
        tampered_path.unlink(missing_ok=True)
        if tampering.files:
            atomic_write(tampered_path, tampering.diff)
        phases["patch"] = time.time()
        confine = None
        if spec.sandbox:
            binds = verifier.binds() if verifier is not None else []
            confine = functools.partial(sandbox.confine_offline, spec, binds=binds)
        elif verifier is not None:
            raise grading.TestPatchError(
                f"task {spec.task_id}: a Harbor task is graded in a sandbox only (its verifier "
                "runs from /tests and writes /logs/verifier)"
            )
        report = grading.grade(
            spec.workspace,
            spec.test_command,
            spec.fail_to_pass,
            spec.pass_to_pass,
            timeout_s=max(60, spec.timeout_s),
            log=spec.artifacts / "tests.log",
            confine=confine,
            parser=spec.parser,
            task_id=spec.task_id,
            reward_dir=verifier.logs if verifier is not None else None,
            platform_interpreter=spec.environment is None and spec.setup is None,
        )
        report.tampered_files = tampering.files
        phases["graded"] = time.time()
    except Exception as exc:
        failed = grading.swebench_report(
            spec.task_id,
            spec.assignment,
            None,
            patch_exists=bool(diff.strip()),
            infra_error=f"{type(exc).__name__}: {exc}",
        )
        _write_json_atomic(report_path, failed.to_json())
        raise
    finally:
        # The agent has stopped: no stored secret it saw stays in what it left behind.
        redact.redact_artifacts(spec.artifacts, spec.data_root)
    _write_json_atomic(
        report_path,
        grading.swebench_report(
            spec.task_id, spec.assignment, report, patch_exists=bool(diff.strip())
        ).to_json(),
    )
    finished = time.time()
    return RunnerResult(
        assignment=spec.assignment,
        started=started,
        finished=finished,
        wall_s=round(finished - started, 3),
        agent=AgentResult.model_validate(outcome.to_json()),
        grade=GradeResult.model_validate(report.to_json()),
        patch=str(patch_path),
        report=str(report_path),
        phases=phases,
    )


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    from common.logs import configure

    configure()  # runner.log: JSON lines, as Filebeat ships them
    signal.signal(signal.SIGTERM, _terminate)
    # Its tmux session killed (or the tmux server): end the agent too, not only the runner.
    signal.signal(signal.SIGHUP, _terminate)
    spec = AssignmentSpec.model_validate_json(Path(argv[1]).read_text())
    lock = os.fdopen(open_nofollow(spec.lock_path, os.O_WRONLY | os.O_CREAT, 0o600), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"another runner holds {spec.lock_path}", file=sys.stderr)
        return 75
    lock.truncate(0)  # for operators only: cancel never signals a pid read from here
    lock.write(str(os.getpid()))
    lock.flush()
    if spec.result_path.exists():
        return 0
    with open_log(spec.artifacts / "runs.jsonl", append=True) as runs:  # one line per start
        runs.write(json.dumps({"pid": os.getpid(), "started": time.time()}).encode() + b"\n")
    try:
        result = run(spec)
    except Exception as exc:  # the orchestrator must hear of every ending, crashes included
        failed = RunnerResult(
            assignment=spec.assignment, infra_error=f"{type(exc).__name__}: {exc}"
        )
        _write_json_atomic(spec.result_path, failed.to_json())
        raise
    _write_json_atomic(spec.result_path, result.to_json())
    return 0


def exit_now(status: int) -> None:
    """End the process once its output is flushed, without the interpreter's teardown.

    result.json is written and closed, and the scheduler collects when this process is gone
    (a pidfd): unloading every module and pydantic's caches took 30-90 ms and served nothing.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_now(main(sys.argv))  # an exception (result.json written too) ends it the usual way
