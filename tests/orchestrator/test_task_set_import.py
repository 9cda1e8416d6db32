"""Task sets: a SWE-bench-format dataset made from a small real git repository (a bug-fix
branch per instance, `patch` and `test_patch` taken from its history), imported offline from
`--repos` into the data root's mirror, validated by the real runner with the oracle and the
empty agent, and run by a trial that names the set. No network: git over `file://`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from git_servers import git
from trial_runs import operator_api, run_to_the_end, trial_settings
from typer.testing import CliRunner

from contracts.config import ConfigError, TaskSetRef
from contracts.dataroot import DataRoot
from orchestrator.cli import app as cli
from orchestrator.platform import Platform
from orchestrator.state import Trial
from orchestrator.taskimport import import_swebench
from orchestrator.taskstore import TaskStore

CALC = (
    "def add(a, b):\n    return a - b\n\n\n"
    "def mul(a, b):\n    return a + b\n\n\n"
    "def sub(a, b):\n    return a - b\n"
)
TESTS = "from calc import *  # noqa\n\n\ndef test_sub():\n    assert sub(3, 1) == 2\n"
FIX_ADD = "import pathlib; p = pathlib.Path('calc.py'); p.write_text(p.read_text().replace('a - b', 'a + b', 1))"  # noqa: E501
F2P = "tests/test_calc.py::test_{}"


def _fix_branch(work: Path, base: str, fn: str, wrong: str, right: str, expected: int) -> str:
    """The fix of `fn` and its new test, on a branch of its own from `base`."""
    git(work, "checkout", "-q", "-b", f"fix-{fn}", base)
    calc = work / "calc.py"
    body = f"def {fn}(a, b):\n    return "
    calc.write_text(calc.read_text().replace(body + wrong, body + right))
    tests = work / "tests" / "test_calc.py"
    test = f"\n\ndef test_{fn}():\n    assert {fn}(2, 3) == {expected}\n"
    tests.write_text(tests.read_text() + test)
    git(work, "commit", "-qam", f"fix {fn}()")
    git(work, "checkout", "-q", "main")
    return git(work, "rev-parse", f"fix-{fn}").strip()


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path, str]:
    """(dataset file, --repos folder, base commit): three instances of `acme/calc`, the third
    one invalid (its FAIL_TO_PASS test passes already)."""
    work = tmp_path / "repos" / "acme__calc"
    (work / "tests").mkdir(parents=True)
    git(work, "init", "-q", "--initial-branch=main")
    (work / "calc.py").write_text(CALC)
    (work / "tests" / "test_calc.py").write_text(TESTS)
    git(work, "add", "-A")
    git(work, "commit", "-qm", "calc")
    base = git(work, "rev-parse", "HEAD").strip()
    instances = []
    for number, (fn, wrong, right, expected) in enumerate(
        [("add", "a - b", "a + b", 5), ("mul", "a + b", "a * b", 6)], start=1
    ):
        fix = _fix_branch(work, base, fn, wrong, right, expected)
        instances.append(
            {
                "instance_id": f"acme__calc-{number}",
                "repo": "acme/calc",
                "base_commit": base,
                "patch": git(work, "diff", base, fix, "--", "calc.py"),
                "test_patch": git(work, "diff", base, fix, "--", "tests"),
                "problem_statement": f"{fn}() is wrong.",
                "FAIL_TO_PASS": json.dumps([F2P.format(fn)]),
                "PASS_TO_PASS": json.dumps([F2P.format("sub")]),
                "version": "1.0",
                "environment_setup_commit": base,
            }
        )
    already = {**instances[0], "instance_id": "acme__calc-3", "test_patch": ""}
    already["FAIL_TO_PASS"], already["PASS_TO_PASS"] = [F2P.format("sub")], []
    instances.append(already)
    path = tmp_path / "calcset.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in instances))
    return path, tmp_path / "repos", base


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"AUTOVIBE_DATA": str(tmp_path / "data"), "AUTOVIBE_TASK_ROOTS": str(tmp_path)}


@pytest.mark.slow  # six sandboxed runs of the real runner: ~18 s
def test_import_and_validate_keep_the_valid_tasks(
    dataset: tuple[Path, Path, str], env: dict[str, str], tmp_path: Path
) -> None:
    path, repos, base = dataset
    runner = CliRunner()
    started = time.monotonic()
    out = runner.invoke(
        cli, ["tasks", "import", "swebench", str(path), "--repos", str(repos)], env=env
    )
    imported_s = time.monotonic() - started
    assert out.exit_code == 0, out.output
    store = TaskStore(DataRoot.at(tmp_path / "data"))
    taskset = store.load("calcset")
    assert [e.task.id for e in taskset.entries] == ["acme__calc-1", "acme__calc-2", "acme__calc-3"]
    task = taskset.entries[0].task
    assert task.repo == f"file://{(repos / 'acme__calc').resolve()}" and task.commit == base
    assert task.parser == "acme/calc" and task.test_patch and "test_add" in task.test_patch
    started = time.monotonic()
    out = runner.invoke(cli, ["tasks", "validate", "calcset"], env=env)
    validated_s = time.monotonic() - started
    print(f"import {imported_s:.2f} s, validate {validated_s:.2f} s (3 tasks, 6 runs)")
    assert out.exit_code == 1, out.output  # one task is invalid
    validation = store.validation("calcset")
    assert validation is not None
    verdicts = {v.task: (v.valid, v.oracle, v.empty) for v in validation.verdicts}
    assert verdicts == {
        "acme__calc-1": (True, "resolved", "unresolved"),
        "acme__calc-2": (True, "resolved", "unresolved"),
        "acme__calc-3": (False, "resolved", "resolved"),
    }, out.output
    assert "doing nothing resolves it" in validation.invalid()["acme__calc-3"]
    listed = runner.invoke(cli, ["tasks", "ls"], env=env)
    assert listed.output.split() == ["calcset", "3", "tasks", "2", "valid"], listed.output
    # The empty run was graded with the test_patch applied: the new test ran and failed.
    empty = tmp_path / "data" / "worker-artifacts" / "_validation" / "calcset"
    report = json.loads((empty / "acme__calc-1.empty" / "report.json").read_text())
    assert report["tests_status"]["FAIL_TO_PASS"]["failure"] == [F2P.format("add")]
    # Trials drawing from the set get the valid tasks only.
    drawn = store.select(TaskSetRef(set="calcset", sample=2), seed=7)
    assert sorted(t.id for t in drawn) == ["acme__calc-1", "acme__calc-2"]
    with pytest.raises(ValueError, match="acme__calc-3: invalid"):
        store.select(TaskSetRef(set="calcset", ids=["acme__calc-3"]), seed=0)


def test_bad_instances_are_refused_by_line_and_nothing_is_imported(
    dataset: tuple[Path, Path, str], tmp_path: Path
) -> None:
    path, repos, _ = dataset
    good = json.loads(path.read_text().splitlines()[0])
    lines = [
        json.dumps(good),
        '{"instance_id": "broken", ',
        json.dumps({k: v for k, v in good.items() if k != "FAIL_TO_PASS"} | {"instance_id": "a-2"}),
        json.dumps(good | {"instance_id": "a-3", "base_commit": "deadbeef"}),
        json.dumps(good | {"instance_id": "a-4", "patch": good["patch"].replace("a - b", "a / b")}),
        json.dumps(good | {"instance_id": "a-5", "FAIL_TO_PASS": "[not json"}),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    root = DataRoot.at(tmp_path / "data")
    with pytest.raises(ConfigError) as caught:
        import_swebench(bad, root, repos=repos, context={"task_roots": [tmp_path]})
    problems = caught.value.problems
    assert problems[0].startswith("line 2: not valid JSON"), problems
    assert problems[1] == "line 3: a-2: missing field FAIL_TO_PASS"
    assert problems[2].startswith("line 4: a-3: base_commit: commit deadbeef is not in file://")
    assert problems[3].startswith("line 5: a-4: patch does not apply to base_commit"), problems
    assert problems[4].startswith("line 6: a-5: FAIL_TO_PASS is a string but not"), problems
    assert len(problems) == 5
    assert TaskStore(root).names() == []
    assert [p.name for p in (tmp_path / "data" / "tasks").iterdir()] == ["mirrors"]
    # A repository outside --repos is named, and a file:// repo must lie under the task roots.
    with pytest.raises(ConfigError, match="line 1: acme__calc-1: repo: no acme__calc under"):
        import_swebench(path, root, repos=tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="task roots"):
        import_swebench(path, root, repos=repos, context={"task_roots": [tmp_path / "data"]})


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, Platform]]:
    with operator_api(trial_settings(tmp_path)) as api:
        yield api


def _trial(name: str, tasks: dict[str, Any], agents: list[str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "project": "sets",
        "budget": {"amount": "1", "currency": "CAD", "period": "monthly"},
        "agents": agents or ["command"],
        "model_pairs": ["tiny"],
        "sandbox": {"kind": "none"},
        "tasks": tasks,
    }


def test_a_trial_names_the_set_and_runs_its_task(
    api: tuple[TestClient, Platform], dataset: tuple[Path, Path, str], tmp_path: Path
) -> None:
    client, platform = api
    path, repos, base = dataset
    import_swebench(path, platform.root, repos=repos, context={"task_roots": [tmp_path]})
    ref = {"set": "calcset", "ids": ["acme__calc-1"], "agent_command": ["python3", "-c", FIX_ADD]}
    resp = client.post("/v1/trials", json=_trial("fromset", ref))
    assert resp.status_code == 201, resp.text
    trial_id = resp.json()["id"]
    with platform.store.session() as s:
        config = s.get_one(Trial, trial_id).config
    assert config["task_set"]["set"] == "calcset"
    assert [(t["id"], t["commit"]) for t in config["tasks"]] == [("acme__calc-1", base)]
    a = run_to_the_end(platform, trial_id)
    assert (a.state, a.status) == ("finished", "resolved"), a.result
    # The oracle is validation's alone; an unknown set or task is named.
    resp = client.post("/v1/trials", json=_trial("cheat", ref, agents=["oracle"]))
    assert resp.status_code == 422 and "unknown agent 'oracle'" in resp.text, resp.text
    resp = client.post("/v1/trials", json=_trial("nosuch", {"set": "other", "sample": 1}))
    assert resp.status_code == 422 and "no task set 'other'" in resp.text, resp.text


def test_a_set_reference_needs_the_server_and_one_way_to_choose() -> None:
    from contracts.config import TrialConfig

    trial = _trial("ref", {"set": "calcset", "sample": 2})
    with pytest.raises(ValueError, match="expanded by the server that holds it"):
        TrialConfig.model_validate(trial)
    both = _trial("ref", {"set": "calcset", "sample": 2, "ids": ["a"]})
    with pytest.raises(ValueError, match=r"`ids`\) or draw them"):
        TrialConfig.model_validate(both)
