"""Grading as SWE-bench does it: the `swebench` package's own log parsers read the test output
(Django's runner, SymPy's bin/test; pytest's summary for a repository it does not know), and a
task's `test_patch` is applied after the agent, before the tests run, by the real runner.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from contracts.config import Task
from contracts.dataroot import DataRoot
from workers import runner, swebench_logs
from workers.grading import parse_pytest_summary, read_statuses
from workers.spec import AssignmentSpec

FIXTURES = Path(__file__).parent / "fixtures" / "swebench"


def test_django_output_is_read_by_swebench_django_parser() -> None:
    output = (FIXTURES / "django.log").read_text()
    statuses = read_statuses(output, "django/django")
    editable = "(admin_views.tests.AdminViewListEditable)"
    assert statuses[f"test_changelist_input_html {editable}"] == "PASSED"
    assert statuses[f"test_inheritance {editable}"] == "PASSED"
    assert statuses[f"test_list_editable_ordering {editable}"] == "FAILED"
    assert statuses[f"test_post_messages {editable}"] == "ERROR"
    assert statuses[f"test_pagination {editable}"] == "SKIPPED"
    # What grading read before: nothing, so every Django id came back MISSING.
    assert parse_pytest_summary(output) == {}


def test_sympy_output_is_read_by_swebench_sympy_parser() -> None:
    statuses = read_statuses((FIXTURES / "sympy.log").read_text(), "sympy/sympy")
    assert statuses["test_seterr"] == statuses["test_divmod"] == "PASSED"
    assert statuses["test_mod"] == "FAILED"
    assert statuses["test_Float_from_tuple"] == "ERROR"


def test_parser_by_name_and_pytest_fallback() -> None:
    django = (FIXTURES / "django.log").read_text()
    assert read_statuses(django, "parse_log_django") == read_statuses(django, "django/django")
    pytest_out = "===== short test summary info =====\nPASSED t.py::a\nFAILED t.py::b - boom\n"
    expected = {"t.py::a": "PASSED", "t.py::b": "FAILED"}
    # A repository swebench does not know, no parser, and `pytest`: pytest's summary.
    for parser in ("acme/widgets", None, "pytest"):
        assert read_statuses(pytest_out, parser) == expected
    with pytest.raises(ValueError, match="task t1: no test log parser 'parse_log_nope'"):
        read_statuses(pytest_out, "parse_log_nope", task_id="t1")
    assert {"django/django", "sympy/sympy", "pytest-dev/pytest"} <= set(swebench_logs.known_repos())


def test_trial_names_a_parser_swebench_has() -> None:
    context = {"parsers": swebench_logs.names()}
    base = {"id": "t", "repo": "/x", "prompt": "p", "test_command": "c", "fail_to_pass": ["a"]}
    for ok in ("pytest", "parse_log_sympy", "acme/widgets", "django/django"):
        assert Task.model_validate({**base, "parser": ok}, context=context).parser == ok
    with pytest.raises(ValidationError, match="unknown test log parser 'junit'"):
        Task.model_validate({**base, "parser": "junit"}, context=context)


# -- test_patch through the real runner ------------------------------------------------------

CALC = "def add(a, b):\n    return a - b\n\n\ndef sub(a, b):\n    return a - b\n"
TESTS = """import unittest

from calc import add, sub


class CalcTests(unittest.TestCase):
    def test_sub(self):
        self.assertEqual(sub(3, 1), 2)
"""
ADDED_TEST = """
    def test_add(self):
        self.assertEqual(add(2, 2), 4)
"""
F2P = "test_add (tests.test_calc.CalcTests.test_add)"
P2P = "test_sub (tests.test_calc.CalcTests.test_sub)"
FIX = "import pathlib; p = pathlib.Path('calc.py'); p.write_text(p.read_text().replace('a - b', 'a + b', 1))"  # noqa: E501
CHEAT = "import pathlib; pathlib.Path('tests/test_calc.py').write_text('')"


def _task_repo(tmp_path: Path) -> tuple[Path, str]:
    """The task (calc with a bug in add) and, from its git history, the test_patch that adds
    the test of add."""
    repo = tmp_path / "calc"
    (repo / "tests").mkdir(parents=True)
    (repo / "calc.py").write_text(CALC)
    (repo / "tests" / "__init__.py").write_text("")
    (repo / "tests" / "test_calc.py").write_text(TESTS)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    with (repo / "tests" / "test_calc.py").open("a") as fh:
        fh.write(ADDED_TEST)
    test_patch = subprocess.run([*git, "diff"], check=True, capture_output=True, text=True).stdout
    subprocess.run([*git, "checkout", "-q", "--", "."], check=True)
    return repo, test_patch


def _run(tmp_path: Path, repo: Path, name: str, agent: str, test_patch: str) -> dict[str, object]:
    root = DataRoot.at(tmp_path / "data")
    spec = AssignmentSpec(
        assignment=name,
        project="p",
        trial="tp",
        machine="m1",
        task_id="calc",
        repo=repo,
        prompt="Fix add.",
        # Django's runner prints unittest's verbose lines: what the django parser reads.
        test_command="python -m unittest -v tests.test_calc 2>&1",
        fail_to_pass=[F2P],
        pass_to_pass=[P2P],
        test_patch=test_patch,
        parser="django/django",
        timeout_s=60,
        agent="command",
        agent_command=[sys.executable, "-c", agent],
        model="tiny",
        endpoint="http://127.0.0.1:9/v1",
        env={},
        artifacts=DataRoot.ensure(root.assignment_dir("p", "tp", name)),
        data_root=root.root,
    )
    return runner.run(spec).to_json()


def test_test_patch_is_applied_after_the_agent_and_graded_by_swebench_parser(
    tmp_path: Path,
) -> None:
    repo, test_patch = _task_repo(tmp_path)
    fixed = _run(tmp_path, repo, "fixed", FIX, test_patch)
    grade = fixed["grade"]
    assert isinstance(grade, dict)
    assert grade["status"] == "resolved", grade
    assert grade["fail_to_pass"] == {F2P: "PASSED"}
    assert grade["pass_to_pass"] == {P2P: "PASSED"}

    # The agent did nothing: the added test ran (FAILED, not MISSING) and judged it.
    idle = _run(tmp_path, repo, "idle", "pass", test_patch)["grade"]
    assert isinstance(idle, dict)
    assert (idle["status"], idle["fail_to_pass"]) == ("unresolved", {F2P: "FAILED"})

    # Emptying the file the test_patch changes does not dodge it: restored, then patched.
    cheat = _run(tmp_path, repo, "cheat", f"{FIX}; {CHEAT}", test_patch)["grade"]
    assert isinstance(cheat, dict)
    assert cheat["status"] == "resolved"
    assert cheat["tampered_files"] == ["tests/test_calc.py"]


def test_test_patch_that_does_not_apply_is_an_infra_error_naming_the_task(tmp_path: Path) -> None:
    repo, test_patch = _task_repo(tmp_path)
    broken = test_patch.replace("self.assertEqual(sub(3, 1), 2)", "self.assertEqual(0, 0)")
    with pytest.raises(Exception, match="task calc: its test_patch does not apply") as info:
        _run(tmp_path, repo, "broken", FIX, broken)
    assert type(info.value).__name__ == "TestPatchError"
    report = json.loads((tmp_path / "data/worker-artifacts/p/tp/broken/report.json").read_text())
    assert report["infra_failure"] is True
    assert "task calc: its test_patch does not apply" in report["infra_error"]
