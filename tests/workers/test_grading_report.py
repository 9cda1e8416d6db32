"""report.json, SWE-bench style: of a grading with tests left out, and from the runner (the reports
of the example repos' own gradings are checked in test_grading)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from test_grading import EXAMPLES as GRADED
from test_grading import grade_example, solve
from worker_harness import EXAMPLES

from workers import runner
from workers.agents import AGENTS
from workers.grading import swebench_report
from workers.spec import AssignmentSpec


@pytest.fixture(autouse=True)
def script_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(AGENTS, "script", "worker_harness:ScriptAgent")


def ids(name: str, tests: list[str]) -> list[str]:
    return GRADED[name].ids(tests)


def test_missing_and_skipped_tests_are_failures(prepared: Callable[[str], Path]) -> None:
    ws = prepared("mathkit")
    solve(ws, "mathkit", "add", "is_even")
    grade = grade_example(ws, "mathkit", command="python -m pytest -q -k 'add or subtract'")
    report = swebench_report("mathkit", "a-002", grade, patch_exists=True)
    f2p = report.tests_status.FAIL_TO_PASS
    assert f2p.failure == ids("mathkit", ["test_is_even", "test_is_even_zero_and_negative"])
    assert report.status == "partial" and report.resolved is False


def test_an_infra_failure_has_no_test_results() -> None:
    report = swebench_report("t", "a-003", None, patch_exists=False, infra_error="OSError: disk")
    assert report.infra_failure is True and report.infra_error == "OSError: disk"
    assert (report.status, report.resolved, report.patch_successfully_applied) == (
        "error",
        False,
        False,
    )
    empty = {"success": [], "failure": []}
    assert report.to_json()["tests_status"] == {"FAIL_TO_PASS": empty, "PASS_TO_PASS": empty}


def spec_for(tmp_path: Path, program: str, repo: Path = EXAMPLES / "mathkit") -> AssignmentSpec:
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    return AssignmentSpec(
        assignment="t1-000",
        project="p1",
        trial="t1",
        machine="m1",
        task_id="mathkit",
        repo=repo,
        prompt=program,
        test_command="python -m pytest -q",
        fail_to_pass=ids("mathkit", GRADED["mathkit"].f2p),
        pass_to_pass=ids("mathkit", GRADED["mathkit"].p2p),
        timeout_s=60,
        agent="script",
        model="tiny",
        endpoint="http://127.0.0.1:1/v1",
        env={},
        artifacts=artifacts,
    )


SOLVE_BOTH = """
with open("mathkit/basic.py", "a") as fh:
    fh.write("\\n\\ndef add(a, b):\\n    return a + b\\n")
    fh.write("\\n\\ndef is_even(n):\\n    return n % 2 == 0\\n")
"""


def test_runner_writes_report_json_beside_the_result(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, SOLVE_BOTH)
    (spec.artifacts / "report.json").write_text('{"stale": true}')  # an earlier attempt's
    result = runner.run(spec)
    report = json.loads((spec.artifacts / "report.json").read_text())
    assert result.report == str(spec.artifacts / "report.json")
    assert result.grade is not None and result.grade.status == "resolved"
    assert (report["instance_id"], report["assignment"]) == ("mathkit", "t1-000")
    assert (report["patch_exists"], report["resolved"], report["infra_failure"]) == (
        True,
        True,
        False,
    )
    assert report["tests_status"]["FAIL_TO_PASS"]["failure"] == []
    assert "+def add(a, b):" in (spec.artifacts / "patch.diff").read_text()


def test_runner_with_an_idle_agent_reports_no_patch(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, "pass")
    runner.run(spec)
    report = json.loads((spec.artifacts / "report.json").read_text())
    assert (report["patch_exists"], report["status"], report["resolved"]) == (
        False,
        "unresolved",
        False,
    )


def test_runner_reports_an_infra_failure(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, "pass", repo=tmp_path / "no-such-repo")
    with pytest.raises(Exception, match="is not a folder"):
        runner.run(spec)
    report = json.loads((spec.artifacts / "report.json").read_text())
    assert report["infra_failure"] is True
    assert report["infra_error"].startswith("WorkspaceError: task repository ")
    assert (report["status"], report["patch_exists"]) == ("error", False)
