"""`autovibe tasks validate SET`: every task proven solvable, and not solved by doing nothing.

Each task is run twice through the real runner (`python -m workers.runner SPEC`: workspace
from the mirror's tree, agent, test_patch, grading by the task's parser), once with the
`oracle` agent (it applies the gold patch) and once with the `empty` agent (it changes
nothing), sandboxed as a trial's are. A task is valid when the oracle resolves it and the empty
agent does not; the verdicts go to the set's `validation.json`, and trials naming the set
leave the invalid tasks out (`orchestrator.taskstore`). The runs' folders are kept under
`worker-artifacts/_validation/<set>/` for the operator to read. A task's setup reaches the
operator's registries through the proxy the settings name (`orchestrator.setup_access`), as
machine `setup` of project `_validation`: that proxy must be running for such a setup.
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from subprocess import TimeoutExpired

from contracts.credentials import load_or_create_key
from contracts.dataroot import DataRoot, atomic_write
from contracts.results import RunnerResult
from contracts.settings import PROJECT_ROOT, Settings
from contracts.tasksets import AgentVerdict, SetValidation, TaskSetEntry, TaskVerdict
from orchestrator.mirrors import Mirrors
from orchestrator.setup_access import setup_env
from orchestrator.taskstore import TaskStore
from workers.agents.oracle import GOLD_PATCH, SOLUTION
from workers.spec import AssignmentSpec, SandboxSpec, task_fields

RUNS = "_validation"
"""The folder of `worker-artifacts/` holding validation runs (no project has this name)."""


def validate(
    name: str,
    settings: Settings,
    *,
    jobs: int = 2,
    sandboxed: bool = True,
    progress: Callable[[TaskVerdict], None] | None = None,
) -> SetValidation:
    """Run the oracle and the empty agent on every task of set `name`, record and return the
    verdicts; `progress` hears of each task as it is decided."""
    root = DataRoot.at(settings.data)
    store = TaskStore(root)
    taskset = store.load(name)
    # Made here, not by the runs at once: its file has a fixed temp name.
    key = load_or_create_key(root)

    def one(entry: TaskSetEntry) -> TaskVerdict:
        started = time.monotonic()
        oracle = _run(entry, "oracle", name, root, settings, sandboxed, key)
        empty = _run(entry, "empty", name, root, settings, sandboxed, key)
        solution = "solution/solve.sh" if entry.solution else "the gold patch"
        verdict = _verdict(entry.task.id, oracle, empty, solution)
        verdict.wall_s = round(time.monotonic() - started, 3)
        if progress is not None:
            progress(verdict)
        return verdict

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        verdicts = list(pool.map(one, taskset.entries))
    validation = SetValidation(validated_at=datetime.datetime.now(datetime.UTC), verdicts=verdicts)
    store.record(name, validation)
    return validation


def _verdict(
    task_id: str, oracle: RunnerResult, empty: RunnerResult, solution: str = "the gold patch"
) -> TaskVerdict:
    grades: dict[str, str] = {}
    for agent, result in (("oracle", oracle), ("empty", empty)):
        grades[agent] = result.grade.status if result.grade is not None else "error"
    reason = ""
    applied = oracle.agent is not None and oracle.agent.exit_cause == "finished"
    if oracle.infra_error or empty.infra_error:
        reason = f"infrastructure error: {oracle.infra_error or empty.infra_error}"
    elif not applied:
        how = "no outcome" if oracle.agent is None else oracle.agent.exit_cause
        code = "" if oracle.agent is None else f", exit {oracle.agent.exit_code}"
        reason = f"the oracle could not apply {solution} ({how}{code}; see its agent.log)"
    elif grades["oracle"] != "resolved":
        reason = f"{solution} does not resolve it ({grades['oracle']}{_failing(oracle)})"
    elif grades["empty"] == "resolved":
        reason = "doing nothing resolves it: FAIL_TO_PASS already pass at base_commit"
    return TaskVerdict(
        task=task_id, valid=not reason, reason=reason, oracle=grades["oracle"],
        empty=grades["empty"],
    )  # fmt: skip


def _failing(result: RunnerResult) -> str:
    if result.grade is None:
        return ""
    failing = [
        f"{test} {status}"
        for tests in (result.grade.fail_to_pass, result.grade.pass_to_pass)
        for test, status in tests.items()
        if status not in ("PASSED", "XFAIL")
    ]
    return f"; failing: {', '.join(failing[:5])}" if failing else ""


def _run(
    entry: TaskSetEntry,
    agent: AgentVerdict,
    set_name: str,
    root: DataRoot,
    settings: Settings,
    sandboxed: bool,
    key: bytes,
) -> RunnerResult:
    """One run of `agent` on the task by the real runner, in a fresh folder; `key` signs its
    setup's credential."""
    task = entry.task
    artifacts = root.root / "worker-artifacts" / RUNS / set_name / f"{task.id}.{agent}"
    if artifacts.exists():
        shutil.rmtree(artifacts)
    DataRoot.ensure(artifacts)
    assert isinstance(task.repo, str) and task.commit is not None  # imported sets are pinned
    assignment = f"validate-{task.id}-{agent}"
    # The task's setup may reach the operator's registries through the running proxy.
    setup = setup_env(
        settings, key, root, task=task, project=RUNS, trial=set_name,
        assignment=assignment, sandboxed=sandboxed,
    )  # fmt: skip
    sandbox = None
    if sandboxed:
        sandbox = SandboxSpec(
            # Bridged; called only by a setup with a way out: neither agent has a model.
            proxy_host=settings.host,
            proxy_port=settings.proxy_port,
            memory_mb=4096,
            cpus=1.0,
            host_uid=settings.sandbox_uid,
            hidden=[root.root],
            read_only=[root.ca_cert] if setup is not None else [],
        )
    spec = AssignmentSpec(
        assignment=assignment,
        project=RUNS,
        trial=set_name,
        machine="validation",
        **task_fields(task),
        repo=Mirrors(root).tree(task.repo, task.commit),
        prompt=task.prompt,
        agent=agent,
        model="none",
        endpoint="",
        env={},
        setup_env=setup,
        artifacts=artifacts,
        data_root=root.root,
        sandbox=sandbox,
    )
    if agent == "oracle":
        DataRoot.ensure(spec.output)
        atomic_write(spec.output / GOLD_PATCH, entry.gold_patch.encode(errors="surrogateescape"))
        for relative, text in entry.solution.items():  # a Harbor task's solution/ files
            path = spec.output / SOLUTION / relative
            DataRoot.ensure(path.parent)
            atomic_write(path, text.encode(errors="surrogateescape"))
    spec_path = artifacts / "spec.json"
    atomic_write(spec_path, spec.model_dump_json(indent=2))
    with open(artifacts / "runner.out", "wb") as out, contextlib.suppress(TimeoutExpired):
        subprocess.run(
            [sys.executable, "-m", "workers.runner", str(spec_path)],
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
            # The agent's timeout, the tests' (`workers.runner`), and time to copy and patch.
            timeout=task.timeout_s + max(60, task.timeout_s) + 120,
        )
    try:
        return RunnerResult.model_validate_json(Path(spec.result_path).read_bytes())
    except (OSError, ValueError) as exc:
        return RunnerResult(
            assignment=spec.assignment,
            infra_error=f"the runner left no result ({exc}); see {artifacts / 'runner.out'}",
        )
