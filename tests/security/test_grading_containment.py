"""Grading and patch extraction against a hostile agent (issue 17, findings 1 and 2).

Each test runs a whole assignment through the real runner (`workers.runner.run`, in this
process, with a secret in its environment): a scripted agent, sandboxed by bubblewrap, solves
part of examples/mathkit and attacks the host side of grading: a conftest.py or
sitecustomize.py that runs on collection, test files and hooks that forge a pass, a
`.git/config` with fsmonitor, hooks, filters and diff drivers, symlinks to host secrets. Each
asserts that the attack failed (no marker on the host, no secret read, the real grade), and
that the attempt is in the artifacts (patch.diff, tests-tampered.diff, `tests_tampered`).
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
import tomllib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from contracts.dataroot import DataRoot
from contracts.results import RunnerResult
from contracts.settings import PROJECT_ROOT, free_port
from workers import runner, sandbox
from workers.agents import AGENTS
from workers.agents.base import AgentOutcome, AgentRun, ExitCause
from workers.spec import AssignmentSpec, SandboxSpec

MATHKIT = PROJECT_ROOT / "examples" / "mathkit"
TESTS = "tests/test_basic.py"
F2P = [f"{TESTS}::{t}" for t in ("test_add", "test_add_negative", "test_is_even")]
F2P += [f"{TESTS}::test_is_even_zero_and_negative"]
P2P = [f"{TESTS}::{t}" for t in ("test_subtract", "test_multiply", "test_square")]
SECRET = "grading-secret-" + uuid.uuid4().hex[:8]

SOLVE_ADD = """
with open("mathkit/basic.py", "a") as fh:
    fh.write("\\n\\ndef add(a, b):\\n    return a + b\\n")
"""
"""Solves test_add and test_add_negative: the real grade is `partial`."""
PARTIAL = {
    "fail_to_pass": {t: "PASSED" if "add" in t else "FAILED" for t in F2P},
    "pass_to_pass": dict.fromkeys(P2P, "PASSED"),
}


class HostileScript:
    """Runs its prompt as a Python program in the workspace (inside the agent's sandbox)."""

    name = "hostile"

    def __init__(self, root: Path | None = None) -> None:
        """Every adapter is built with the data root (`workers.agents.get_agent`)."""

    def version(self) -> str:
        return "hostile"

    def command(self, run: AgentRun) -> list[str]:
        return [sys.executable, "-c", run.prompt]

    def collect(self, run: AgentRun, exit_code: int | None, timed_out: bool) -> AgentOutcome:
        cause: ExitCause = "timeout" if timed_out else "finished" if exit_code == 0 else "crashed"
        return AgentOutcome(cause, exit_code, run.log)


class Graded:
    """One assignment's outcome as the host left it."""

    def __init__(self, spec: AssignmentSpec, result: RunnerResult) -> None:
        self.spec = spec
        self.result = result
        assert result.grade is not None, result
        self.grade: dict[str, Any] = result.grade.to_json()
        self.report: dict[str, Any] = json.loads((spec.artifacts / "report.json").read_text())
        self.patch = (spec.artifacts / "patch.diff").read_text()
        tampered = spec.artifacts / "tests-tampered.diff"
        self.tampered = tampered.read_text() if tampered.exists() else ""
        self.tests_log = (spec.artifacts / "tests.log").read_text(errors="replace")


Run = Callable[[str], Graded]


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    """run(program) -> the graded assignment whose sandboxed agent ran `program`."""
    sandbox.require_tools()
    monkeypatch.setitem(AGENTS, "hostile", f"{__name__}:HostileScript")
    # What the runner's environment holds must never reach the tests.
    monkeypatch.setenv("AUTOVIBE_VAULT_SECRET_ID", SECRET)
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    root = DataRoot.at(tmp_path / "data")

    def go(program: str) -> Graded:
        assignment = f"a-{uuid.uuid4().hex[:6]}"
        artifacts = DataRoot.ensure(root.assignment_dir("p1", "t1", assignment))
        spec = AssignmentSpec(
            assignment=assignment,
            project="p1",
            trial="t1",
            machine="m1",
            task_id="mathkit",
            repo=MATHKIT,
            prompt=textwrap.dedent(program),
            test_command="python -m pytest -q",
            fail_to_pass=F2P,
            pass_to_pass=P2P,
            timeout_s=60,
            agent="hostile",
            model="tiny",
            endpoint="http://127.0.0.1:9/v1",
            env={},
            artifacts=artifacts,
            data_root=root.root,
            sandbox=SandboxSpec(
                proxy_host="127.0.0.1",
                proxy_port=free_port(),
                memory_mb=2048,
                cpus=1.0,
                hidden=[root.root],
            ),
        )
        return Graded(spec, runner.run(spec))

    return go


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_real_partial_grade(graded: Graded) -> None:
    for record in (graded.grade, graded.report):
        assert record["status"] == "partial", graded.tests_log
    assert graded.grade["fail_to_pass"] == PARTIAL["fail_to_pass"], graded.tests_log
    assert graded.grade["pass_to_pass"] == PARTIAL["pass_to_pass"]


def test_a_planted_conftest_never_runs_and_the_tests_see_no_secret(
    run: Run, tmp_path: Path
) -> None:
    host = tmp_path / "host-markers"
    host.mkdir()
    # Run at collection: leave a mark in the workspace and on the host, dump the environment.
    payload = textwrap.dedent(f"""
        import os, pathlib
        pathlib.Path("PLANTED_RAN").write_text(repr(dict(os.environ)))
        pathlib.Path({str(host)!r}, "planted").write_text(repr(dict(os.environ)))
    """)
    # The agent's own module runs in the test process by right: it must find no secret and
    # no way out of the grading sandbox.
    module_payload = textwrap.dedent(f"""
        import os as _os, pathlib as _pathlib
        _pathlib.Path("MODULE_ENV").write_text(repr(dict(_os.environ)))
        try:
            _pathlib.Path({str(host)!r}, "module").write_text("escaped")
        except OSError:
            pass
    """)
    graded = run(
        SOLVE_ADD
        + f"""
import pathlib
payload = {payload!r}
for name in ("conftest.py", "tests/conftest.py", "sitecustomize.py", "pytest.py"):
    pathlib.Path(name).write_text(payload)
with open("mathkit/basic.py", "a") as fh:
    fh.write({module_payload!r})
"""
    )
    ws = graded.spec.workspace
    assert not (ws / "PLANTED_RAN").exists(), "a planted conftest/sitecustomize/pytest.py ran"
    assert sorted(p.name for p in host.iterdir()) == [], "code from the workspace wrote on the host"
    dumped = (ws / "MODULE_ENV").read_text()  # the tests did import the agent's module
    assert SECRET not in dumped and "AUTOVIBE_" not in dumped, dumped
    assert_real_partial_grade(graded)
    planted = ["conftest.py", "pytest.py", "sitecustomize.py", "tests/conftest.py"]
    for record in (graded.grade, graded.report):
        assert (record["tests_tampered"], record["tampered_files"]) == (True, planted)
    assert "+++ b/tests/conftest.py" in graded.tampered and "PLANTED_RAN" in graded.tampered
    for name in planted:
        assert not (ws / name).exists()


FORGE = """
import pathlib
tests = pathlib.Path("tests/test_basic.py")
tests.write_text(tests.read_text().replace("assert is_even", "assert True or is_even"))
pathlib.Path("tests/conftest.py").write_text('''
import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    report.outcome = "passed"
''')
pathlib.Path("pytest.ini").write_text("[pytest]\\naddopts = -k 'not is_even'\\n")
project = pathlib.Path("pyproject.toml")
project.write_text(project.read_text() + 'addopts = "-p no:terminal"\\n')
"""


def test_a_forged_pass_is_undone_and_flagged(run: Run) -> None:
    graded = run(SOLVE_ADD + FORGE)
    assert_real_partial_grade(graded)  # not `resolved`, as the forged tests and hook said
    ws = graded.spec.workspace
    for name in (TESTS, "pyproject.toml"):
        assert (ws / name).read_bytes() == (MATHKIT / name).read_bytes()
    assert not (ws / "pytest.ini").exists() and not (ws / "tests/conftest.py").exists()
    tampered = ["pyproject.toml", "pytest.ini", "tests/conftest.py", TESTS]
    for record in (graded.grade, graded.report):
        assert (record["tests_tampered"], record["tampered_files"]) == (True, tampered)
    # The agent's versions are kept: in the tamper diff, and in the patch it is judged by.
    assert "+    assert True or is_even(4) is True" in graded.tampered
    assert '+    report.outcome = "passed"' in graded.tampered
    assert "+addopts = -k 'not is_even'" in graded.tampered
    assert "+    assert True or is_even(4) is True" in graded.patch


def test_git_config_hooks_and_filters_run_nothing_during_patch_extraction(
    run: Run, tmp_path: Path
) -> None:
    host = tmp_path / "host-markers"
    host.mkdir()
    touch = f"sh -c 'touch {host}/$0' "
    graded = run(
        SOLVE_ADD
        + f"""
import os, pathlib
with open(".git/config", "a") as fh:
    fh.write('''
[core]
    fsmonitor = "{touch}fsmonitor"
    hooksPath = hooks
    pager = "{touch}pager"
[filter "evil"]
    clean = "{touch}clean; cat"
    smudge = "{touch}smudge; cat"
    process = "{touch}process"
[diff "evil"]
    textconv = "{touch}textconv; cat"
    command = "{touch}diffcmd"
[diff]
    external = "{touch}external"
''')
pathlib.Path(".gitattributes").write_text("* filter=evil diff=evil\\n")
for folder in ("hooks", ".git/hooks"):
    pathlib.Path(folder).mkdir(exist_ok=True)
    for hook in ("pre-commit", "post-index-change", "pre-auto-gc", "post-checkout"):
        script = pathlib.Path(folder, hook)
        script.write_text("#!/bin/sh\\ntouch {host}/hook-" + hook + "\\n")
        script.chmod(0o755)
"""
    )
    assert sorted(p.name for p in host.iterdir()) == [], "git ran the agent's commands"
    # The patch is still right: the change, the agent's new files, never its .git.
    assert "+    return a + b" in graded.patch
    assert "+++ b/.gitattributes" in graded.patch and "+++ b/hooks/pre-commit" in graded.patch
    assert "fsmonitor" not in graded.patch and "+++ b/.git/" not in graded.patch
    assert_real_partial_grade(graded)
    assert graded.grade["tests_tampered"] is False


def test_symlinks_to_host_secrets_are_recorded_as_links_never_followed(
    run: Run, tmp_path: Path
) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text(SECRET)
    hostdir = tmp_path / "host-folder"
    hostdir.mkdir()
    (hostdir / "keep.txt").write_text("host data\n")
    before = {p.name: digest(p) for p in hostdir.iterdir()}
    graded = run(
        SOLVE_ADD
        + f"""
import os, shutil
os.symlink({str(secret)!r}, "leak.txt")
os.symlink("/etc/shadow", "shadow")
os.symlink({str(secret)!r}, "mathkit/conftest.py")
# The task's tests replaced by a link to a host folder: restoring them must not write there.
shutil.rmtree("tests")
os.symlink({str(hostdir)!r}, "tests")
"""
    )
    assert "new file mode 120000" in graded.patch
    assert f"+{secret}" in graded.patch and "+/etc/shadow" in graded.patch
    assert SECRET not in graded.patch and "root:" not in graded.patch
    assert {p.name: digest(p) for p in hostdir.iterdir()} == before, "written through a link"
    assert secret.read_text() == SECRET
    # The tests were put back as a folder, and graded for real.
    ws = graded.spec.workspace
    assert not (ws / "tests").is_symlink()
    assert (ws / TESTS).read_bytes() == (MATHKIT / TESTS).read_bytes()
    assert_real_partial_grade(graded)
    assert graded.grade["tampered_files"] == ["mathkit/conftest.py", "tests", TESTS]
    assert f"symlink -> {hostdir}" in graded.tampered and SECRET not in graded.tampered
    # Nothing the host wrote holds the secret.
    for path in graded.spec.artifacts.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SECRET.encode() not in path.read_bytes(), path


PLUGIN = """
import pathlib
pathlib.Path("forge.py").write_text('''
import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    outcome.get_result().outcome = "passed"
''')
"""
"""The agent's own module, a pytest plugin that passes every test: harmless unless pytest's
configuration loads it (`-p forge`)."""


def test_pytests_section_is_the_tasks_and_the_rest_of_pyproject_the_agents(run: Run) -> None:
    graded = run(
        SOLVE_ADD
        + PLUGIN
        + """
project = pathlib.Path("pyproject.toml")
text = project.read_text().replace(
    'requires-python = ">=3.10"', 'requires-python = ">=3.10"\\ndependencies = ["attrs>=23"]'
)
project.write_text(text + 'addopts = "-p forge"\\n\\n[tool.ruff]\\nline-length = 99\\n')
"""
    )
    assert_real_partial_grade(graded)  # the plugin the agent's addopts named never loaded
    for record in (graded.grade, graded.report):
        assert (record["tests_tampered"], record["tampered_files"]) == (True, ["pyproject.toml"])
    assert '+addopts = "-p forge"' in graded.tampered
    assert "ruff" not in graded.tampered and "attrs" not in graded.tampered
    # The agent's dependencies and tool settings stay; pytest's table is the task's again.
    kept = tomllib.loads((graded.spec.workspace / "pyproject.toml").read_text())
    task = tomllib.loads((MATHKIT / "pyproject.toml").read_text())
    assert kept["project"]["dependencies"] == ["attrs>=23"]
    assert kept["tool"] == {"pytest": task["tool"]["pytest"], "ruff": {"line-length": 99}}
    assert '+addopts = "-p forge"' in graded.patch and "+dependencies" in graded.patch


TOML_FORGE = '[pytest]\naddopts = ["-p", "forge"]\n'


@pytest.mark.parametrize("name", ["pytest.toml", ".pytest.toml"])
def test_a_planted_pytest_toml_is_removed_and_flagged(run: Run, name: str) -> None:
    """pytest 9 reads `pytest.toml` before any other configuration file."""
    graded = run(SOLVE_ADD + PLUGIN + f"pathlib.Path({name!r}).write_text({TOML_FORGE!r})\n")
    assert_real_partial_grade(graded)
    assert (graded.grade["tests_tampered"], graded.grade["tampered_files"]) == (True, [name])
    assert not (graded.spec.workspace / name).exists()
    assert '+addopts = ["-p", "forge"]' in graded.tampered
