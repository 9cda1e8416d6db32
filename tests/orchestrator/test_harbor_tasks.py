"""Harbor task folders: written here in Harbor's layout (`task.toml`, `instruction.md`,
`environment/`, `tests/test.sh` writing /logs/verifier/reward.txt, `solution/solve.sh`),
imported, validated by the real runner in bubblewrap (the oracle runs solve.sh, the empty agent
nothing), and run by a trial through the scheduler. The task is a shell script, not Python:
graded by the verifier's reward, its tests shown at /tests and never in the workspace.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from harbor_fixture import SOLVE_SH, run_harbor_trial, write_task
from typer.testing import CliRunner

from contracts.config import ConfigError
from contracts.dataroot import DataRoot
from orchestrator.cli import app as cli
from orchestrator.harborimport import import_harbor
from orchestrator.taskstore import TaskStore
from workers.grading import read_reward
from workers.sandbox import require_tools

pytestmark = pytest.mark.slow  # validation and a trial: sandboxed runs of the real runner


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"AUTOVIBE_DATA": str(tmp_path / "data"), "AUTOVIBE_TASK_ROOTS": str(tmp_path)}


def test_a_harbor_folder_is_imported_validated_and_graded_by_its_reward(
    tmp_path: Path, env: dict[str, str]
) -> None:
    require_tools()
    bench = tmp_path / "greetings"
    write_task(bench / "fix-greeting")
    write_task(bench / "already-greets", solved=True)
    runner = CliRunner()
    started = time.monotonic()
    out = runner.invoke(cli, ["tasks", "import", "harbor", str(bench)], env=env)
    imported_s = time.monotonic() - started
    assert out.exit_code == 0, out.output
    assert "environment/Dockerfile is not built" in out.output, out.output
    store = TaskStore(DataRoot.at(tmp_path / "data"))
    taskset = store.load("greetings")
    assert taskset.kind == "harbor"
    entry = taskset.entry("fix-greeting")
    assert entry is not None and entry.solution == {"solve.sh": SOLVE_SH}
    task = entry.task
    assert (task.parser, task.workdir, task.timeout_s) == ("harbor", "/app", 120)
    assert task.fail_to_pass == ["tests/test.sh"] and task.test_command == "bash /tests/test.sh"
    assert task.test_patch is not None and "expected.txt" in task.test_patch
    # The same files are the same commit: importing again reuses the source repository.
    again = import_harbor(bench, DataRoot.at(tmp_path / "data"), name="again")
    assert again.taskset.entries[0].task.commit == taskset.entries[0].task.commit

    started = time.monotonic()
    out = runner.invoke(cli, ["tasks", "validate", "greetings"], env=env)
    validated_s = time.monotonic() - started
    print(f"import {imported_s:.2f} s, validate {validated_s:.2f} s (2 tasks, 4 runs)")
    assert out.exit_code == 1, out.output  # the task already solved is invalid
    validation = store.validation("greetings")
    assert validation is not None
    verdicts = {v.task: (v.valid, v.oracle, v.empty) for v in validation.verdicts}
    assert verdicts == {
        "fix-greeting": (True, "resolved", "unresolved"),
        "already-greets": (False, "resolved", "resolved"),
    }, out.output
    runs = tmp_path / "data" / "worker-artifacts" / "_validation" / "greetings"
    oracle, empty = runs / "fix-greeting.oracle", runs / "fix-greeting.empty"
    assert (oracle / "workspace" / "greet.sh").read_text() == 'echo "Hello, world!"\n'
    assert "verifier: reward 1" in (oracle / "tests.log").read_text()
    assert "verifier: reward 0" in (empty / "tests.log").read_text()
    # The tests were shown at /tests, never put in the workspace the agent could read.
    for run in (oracle, empty):
        assert sorted(p.name for p in (run / "workspace").iterdir()) == [".git", "greet.sh"]
    assert (oracle / "verifier" / "tests" / "expected.txt").is_file()
    report = json.loads((empty / "report.json").read_text())
    assert report["tests_status"]["FAIL_TO_PASS"]["failure"] == ["tests/test.sh"]


def test_a_trial_runs_a_harbor_task_in_its_workdir(tmp_path: Path) -> None:
    require_tools()
    fix = ["sh", "-c", 'test "$PWD" = /app && echo \'echo "Hello, world!"\' > greet.sh']
    a = run_harbor_trial(tmp_path, fix)
    assert (a.state, a.status) == ("finished", "resolved"), a.result


def test_bad_harbor_folders_are_named_and_nothing_is_imported(tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path / "data")
    bench = tmp_path / "broken"
    write_task(bench / "good")
    no_tests = write_task(bench / "no-tests")
    for file in (no_tests / "tests").iterdir():
        file.unlink()
    (no_tests / "tests").rmdir()
    (write_task(bench / "no-prompt") / "instruction.md").unlink()
    (write_task(bench / "bad-toml") / "task.toml").write_text("[agent\ntimeout_sec = 1\n")
    (write_task(bench / "bad-timeout") / "task.toml").write_text('[agent]\ntimeout_sec = "x"\n')
    os.symlink("/etc/hostname", write_task(bench / "leaky") / "environment" / "host")
    (write_task(bench / "no-solve") / "solution" / "solve.sh").unlink()
    with pytest.raises(ConfigError) as caught:
        import_harbor(bench, root)
    problems = str(caught.value)
    for expected in (
        "no-tests: no tests/ folder",
        "no-prompt: no instruction.md",
        "bad-toml: task.toml: not TOML",
        "bad-timeout: task.toml: [agent] timeout_sec is a number of seconds, not 'x'",
        "leaky: environment/host is a symlink",
        "no-solve: solution/ has no solve.sh",
    ):
        assert expected in problems, problems
    assert "good" not in problems
    assert not (root.root / "tasks" / "broken").exists()
    assert not root.task_sources.exists() or not any(root.task_sources.iterdir())


def test_a_reward_is_a_finite_number_in_a_regular_file(tmp_path: Path) -> None:
    """What the verifier wrote is read as hostile: no symlink followed, no huge file read."""
    logs = tmp_path / "logs"
    logs.mkdir()
    assert read_reward(logs) is None
    (logs / "reward.json").write_text('{"reward": 0.5, "tests": 4}')
    assert read_reward(logs) == 0.5
    (logs / "reward.txt").write_text("1\n")  # reward.txt first, as Harbor reads it
    assert read_reward(logs) == 1
    for bad, why in (("nan", "not a finite number"), ("yes", "not a number"),
                     ("1" * 5000, "longer than")):  # fmt: skip
        (logs / "reward.txt").write_text(bad)
        with pytest.raises(ValueError, match=why):
            read_reward(logs)
    (logs / "reward.txt").unlink()
    os.symlink("/etc/hostname", logs / "reward.txt")
    with pytest.raises(ValueError, match="not a regular file"):
        read_reward(logs)
