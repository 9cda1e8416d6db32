"""Grading the example task repos for real: pytest runs in a prepared workspace."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from worker_harness import EXAMPLES as EXAMPLE_REPOS

from workers import workspace
from workers.grading import GradeReport, grade, parse_pytest_summary, swebench_report


@dataclass(frozen=True)
class Example:
    """A demo task repo: the file with its stubs, its tests, and a correct body per stub."""

    source: str
    tests: str
    f2p: list[str]
    p2p: list[str]
    solutions: dict[str, str]

    def ids(self, tests: list[str]) -> list[str]:
        return [f"{self.tests}::{test}" for test in tests]


EXAMPLES = {
    "mathkit": Example(
        source="mathkit/basic.py",
        tests="tests/test_basic.py",
        f2p=["test_add", "test_add_negative", "test_is_even", "test_is_even_zero_and_negative"],
        p2p=["test_subtract", "test_multiply", "test_square"],
        solutions={"add": "return a + b", "is_even": "return n % 2 == 0"},
    ),
    "textkit": Example(
        source="textkit/strings.py",
        tests="tests/test_strings.py",
        f2p=[
            "test_greet",
            "test_greet_other_name",
            "test_reverse_words",
            "test_reverse_words_single_and_empty",
        ],
        p2p=["test_shout", "test_word_count", "test_farewell"],
        solutions={
            "greet": 'return f"Hello, {name}!"',
            "reverse_words": 'return " ".join(reversed(text.split()))',
        },
    ),
    "seqkit": Example(
        source="seqkit/sequences.py",
        tests="tests/test_sequences.py",
        f2p=[
            "test_fibonacci_small",
            "test_fibonacci_ten",
            "test_run_length_encode",
            "test_run_length_encode_edges",
        ],
        p2p=["test_running_total", "test_chunk"],
        solutions={
            "fibonacci": "a, b = 0, 1\nfor _ in range(n):\n    a, b = b, a + b\nreturn a",
            "run_length_encode": (
                "out = []\nfor ch in text:\n"
                "    if out and out[-1][0] == ch:\n        out[-1][1] += 1\n"
                "    else:\n        out.append([ch, 1])\n"
                'return "".join(f"{ch}{n}" for ch, n in out)'
            ),
        },
    ),
}
COMMAND = "python -m pytest -q"
STUB = "    raise NotImplementedError\n"


def solve(ws: Path, name: str, *functions: str) -> None:
    """Write the correct body of each named stub into the workspace."""
    example = EXAMPLES[name]
    path = ws / example.source
    source = path.read_text()
    for function in functions:
        stub = source.index(STUB, source.index(f"def {function}("))
        body = "".join(f"    {line}\n" for line in example.solutions[function].splitlines())
        source = source[:stub] + body + source[stub + len(STUB) :]
    path.write_text(source)


def grade_example(ws: Path, name: str, command: str = COMMAND, timeout_s: int = 120) -> GradeReport:
    example = EXAMPLES[name]
    return grade(
        ws,
        command,
        example.ids(example.f2p),
        example.ids(example.p2p),
        timeout_s=timeout_s,
        log=ws.parent / "tests.log",
        platform_interpreter=True,  # as the runner grades a task with no environment or setup
    )


Graded = Callable[..., tuple[Path, GradeReport]]


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory) -> Graded:
    """graded(name, *solved) -> (workspace, report): examples/<name> with the stubs `solved`
    filled in, graded once for the module; the tests that read the same grading share it."""
    done: dict[tuple[str, tuple[str, ...]], tuple[Path, GradeReport]] = {}

    def get(name: str, *solved: str) -> tuple[Path, GradeReport]:
        if (name, solved) not in done:
            ws = tmp_path_factory.mktemp(f"{name}-graded") / "workspace"
            workspace.prepare(EXAMPLE_REPOS / name, ws)
            solve(ws, name, *solved)
            done[name, solved] = (ws, grade_example(ws, name))
        return done[name, solved]

    return get


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_untouched_repo_is_unresolved(graded: Graded, name: str) -> None:
    ws, report = graded(name)
    assert report.status == "unresolved"
    assert set(report.fail_to_pass.values()) == {"FAILED"}
    assert set(report.pass_to_pass.values()) == {"PASSED"}
    assert (report.exit_code, report.timed_out) == (1, False)
    assert "short test summary info" in report.log.read_text()
    assert report.to_json()["log"] == str(ws.parent / "tests.log")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_correct_solutions_resolve_and_show_in_the_patch(graded: Graded, name: str) -> None:
    solutions = EXAMPLES[name].solutions
    ws, report = graded(name, *solutions)
    assert report.status == "resolved", report.log.read_text()
    assert report.exit_code == 0
    diff = workspace.patch(ws)
    assert f"+++ b/{EXAMPLES[name].source}" in diff
    assert "-    raise NotImplementedError" in diff
    first_line = next(iter(solutions.values())).splitlines()[0]
    assert f"+    {first_line}" in diff
    # The test run left caches behind; they are no part of the patch.
    assert "__pycache__" not in diff


def test_some_solutions_are_partial(graded: Graded) -> None:
    _, report = graded("mathkit", "add")
    assert report.status == "partial"
    assert report.fail_to_pass == {
        "tests/test_basic.py::test_add": "PASSED",
        "tests/test_basic.py::test_add_negative": "PASSED",
        "tests/test_basic.py::test_is_even": "FAILED",
        "tests/test_basic.py::test_is_even_zero_and_negative": "FAILED",
    }


@pytest.mark.parametrize(
    ("solved", "status"),
    [(("add", "is_even"), "resolved"), (("add",), "partial"), ((), "unresolved")],
)
def test_report_json_of_real_grading(graded: Graded, solved: tuple[str, ...], status: str) -> None:
    """report.json, SWE-bench style, of the gradings above (resolved, partial, unresolved)."""
    _, grade = graded("mathkit", *solved)
    report = swebench_report("mathkit", "a-001", grade, patch_exists=bool(solved))
    mathkit = EXAMPLES["mathkit"]
    f2p = mathkit.ids(mathkit.f2p)
    add_tests = [t for t in f2p if "test_add" in t]
    passed = {"resolved": f2p, "partial": add_tests, "unresolved": []}[status]
    assert report.to_json() == {
        "instance_id": "mathkit",
        "assignment": "a-001",
        "patch_exists": bool(solved),
        "patch_successfully_applied": True,
        "resolved": status == "resolved",
        "status": status,
        "tests_status": {
            "FAIL_TO_PASS": {"success": passed, "failure": [t for t in f2p if t not in passed]},
            "PASS_TO_PASS": {"success": mathkit.ids(mathkit.p2p), "failure": []},
        },
        "tests_timed_out": False,
        "tests_tampered": False,
        "tampered_files": [],
        "infra_failure": False,
        "infra_error": None,
    }
    json.dumps(report.to_json())  # plain JSON all the way down


def test_broken_pass_to_pass_is_not_resolved(prepared: Callable[[str], Path]) -> None:
    ws = prepared("mathkit")
    solve(ws, "mathkit", "add", "is_even")
    source = ws / "mathkit/basic.py"
    source.write_text(source.read_text().replace("return a * b", "return a * b + 1"))
    report = grade_example(ws, "mathkit")
    assert report.status == "partial"
    assert report.pass_to_pass["tests/test_basic.py::test_multiply"] == "FAILED"


def test_tests_that_never_ran_are_missing(prepared: Callable[[str], Path]) -> None:
    ws = prepared("mathkit")
    solve(ws, "mathkit", "add", "is_even")
    report = grade(
        ws,
        "python -m pytest -q -k subtract",
        ["tests/test_basic.py::test_add", "tests/test_basic.py::test_no_such_test"],
        ["tests/test_basic.py::test_subtract"],
        timeout_s=120,
        log=ws.parent / "tests.log",
        platform_interpreter=True,
    )
    assert report.status == "unresolved"
    assert set(report.fail_to_pass.values()) == {"MISSING"}
    assert report.pass_to_pass == {"tests/test_basic.py::test_subtract": "PASSED"}


def test_the_platforms_own_pytest_plugins_are_not_a_tasks(tmp_path: Path) -> None:
    """On the platform's interpreter (no environment, no setup) the task's tests run without
    the pytest plugins of the platform's own libraries; a task with its own keeps them all."""
    ws = tmp_path / "workspace"
    (ws / "tests").mkdir(parents=True)
    (ws / "tests" / "test_plugins.py").write_text(
        "def test_no_deepeval(pytestconfig):\n"
        "    assert not pytestconfig.pluginmanager.has_plugin('deepeval')\n"
    )
    ids = ["tests/test_plugins.py::test_no_deepeval"]
    blocked = grade(ws, COMMAND, ids, [], timeout_s=60, log=tmp_path / "a.log",
                    platform_interpreter=True)  # fmt: skip
    kept = grade(ws, COMMAND, ids, [], timeout_s=60, log=tmp_path / "b.log")
    assert (blocked.status, kept.status) == ("resolved", "unresolved")


def test_a_collection_error_fails_every_test(prepared: Callable[[str], Path]) -> None:
    ws = prepared("mathkit")
    source = ws / "mathkit/basic.py"
    source.write_text(source.read_text() + "\ndef broken(:\n")
    report = grade_example(ws, "mathkit")
    assert report.status == "unresolved"
    assert set(report.pass_to_pass.values()) == {"MISSING"}
    assert "ERROR tests/test_basic.py" in report.log.read_text()


def test_timeout_kills_the_whole_process_group(prepared: Callable[[str], Path]) -> None:
    ws = prepared("mathkit")
    # The command leaves a grandchild behind that would outlive a plain kill of the shell.
    command = (
        "python -c 'import time; time.sleep(300)' & echo $! > child.pid; python -m pytest -q; wait"
    )
    started = time.monotonic()
    report = grade_example(ws, "mathkit", command, timeout_s=3)
    assert time.monotonic() - started < 30
    assert report.timed_out is True
    assert report.exit_code is None
    assert report.status == "unresolved"
    assert "killed after 3s" in report.log.read_text()
    child = int((ws / "child.pid").read_text())
    assert _gone(child), f"process {child} survived the timeout"


def _gone(pid: int, wait_s: float = 10) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A killed child not yet reaped by its new parent is dead already.
        status = Path(f"/proc/{pid}/status")
        if status.exists() and re.search(r"^State:\s+Z", status.read_text(), re.M):
            return True
        time.sleep(0.1)
    return False


def test_summary_parsing_reads_only_the_real_summary() -> None:
    output = "\n".join(
        [
            "PASSED tests/test_x.py::test_fake  (printed by a test, before the summary)",
            "==================== short test summary info ====================",
            "PASSED tests/test_x.py::test_a",
            "FAILED tests/test_x.py::test_b - AssertionError: assert 1 == 2",
            "ERROR tests/test_x.py::test_c - RuntimeError",
            "PASSED tests/test_x.py::test_d",
            "ERROR tests/test_x.py::test_d - teardown failed",
            "XFAIL tests/test_x.py::test_e - known bug",
            "SKIPPED [1] tests/test_x.py:40: no network",
            "PASSED tests/test_x.py::test_p[1-2]",
            "\x1b[32mPASSED\x1b[0m tests/test_x.py::test_colour",
            "2 failed, 3 passed in 0.10s",
        ]
    )
    assert parse_pytest_summary(output) == {
        "tests/test_x.py::test_a": "PASSED",
        "tests/test_x.py::test_b": "FAILED",
        "tests/test_x.py::test_c": "ERROR",
        "tests/test_x.py::test_d": "ERROR",
        "tests/test_x.py::test_e": "XFAIL",
        "tests/test_x.py:40: no network": "SKIPPED",
        "tests/test_x.py::test_p[1-2]": "PASSED",
        "tests/test_x.py::test_colour": "PASSED",
    }
