"""SWE-bench style grading: run the task's tests in the workspace and read per-test results.

The test command is run through the shell with pytest's `-rA` summary switched on through
`PYTEST_ADDOPTS`, so every test ends up on one line (`PASSED <id>`, `FAILED <id> - reason`).
The output is read by the task's `parser` (`read_statuses`): pytest's summary by default, or,
as SWE-bench does, the `swebench` package's own parser for the task's repository (Django's
runner, SymPy's `bin/test`, ...; `workers.swebench_logs`), pytest's for a repository it does
not know. A FAIL_TO_PASS or PASS_TO_PASS test that never shows up in the output is `MISSING`.

A SWE-bench task's `test_patch` (the tests that judge it, which the agent never saw) is applied
after the agent and the restore of the task's tests, before they run (`apply_test_patch`).

A Harbor task (parser `harbor`) is judged by its verifier, `bash /tests/test.sh`, as Harbor
runs it: its `tests/` folder (made by the runner from the task's `test_patch`, never in the
workspace) shown read-only at /tests, an empty /logs/verifier for the reward, the workspace at
the task's workdir. The reward (`reward.txt`, or `reward.json`'s `reward`) of 1 or more passes
`HARBOR_TEST`, less fails it; with no reward written, exit status 0 passes (`harbor_statuses`).

The command gets an environment of its own, spelled out whole (`test_env`): none of the
runner's variables (no AUTOVIBE_*, no credentials), no user site, no bytecode written. The
caller restores the task's tests first (`workers.pristine`) and, for a sandboxed assignment,
passes `confine` (`workers.sandbox.confine_offline`): the tests then run in a fresh sandbox
with no network, as an unprivileged user, with the agent's limits.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import processes
from contracts.dataroot import open_log
from contracts.harbor import HARBOR_PARSER, HARBOR_TEST
from contracts.results import GradeStatus as GradeStatus
from contracts.results import SwebenchReport, TestLists, TestsStatus
from workers import swebench_logs
from workers.sandbox import Bind, Confined, end
from workers.workspace import WorkspaceError, baseline_git, isolated_git

PASSING = ("PASSED", "XFAIL")
"""Outcomes that count as a pass (as in SWE-bench); SKIPPED proves nothing, so it fails."""

# When a test shows up more than once (failing teardown after a pass), the worst line wins.
_SEVERITY = {"PASSED": 0, "XFAIL": 1, "SKIPPED": 2, "XPASS": 3, "FAILED": 4, "ERROR": 5}
_SUMMARY_LINE = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S.*?)(?: - .*)?$")
_SUMMARY_HEADER = re.compile(r"^=+ short test summary info =+$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

PYTEST_ADDOPTS = "-rA -p no:cacheprovider"
PLATFORM_PLUGINS_OFF = "-p no:deepeval -p no:schemathesis"
"""pytest plugins of the platform's own libraries (deepeval: the confidence judge; schemathesis:
the API's tests), blocked when a task's tests run on the platform's interpreter (no environment,
no setup): they are not the task's, and deepeval's alone imported for about 1.25 s in every
graded run (examples/mathkit's suite: 3.2 s with them, 0.7 s without)."""
HOME_CONFINED = "/tmp"
"""HOME of a confined test run: the sandbox's private /tmp."""

Confine = Callable[[list[str], dict[str, str]], AbstractContextManager[Confined]]
"""(argv, env) -> a context giving the command made to run confined (`workers.sandbox`)."""


@dataclass
class GradeReport:
    status: GradeStatus
    fail_to_pass: dict[str, str]
    """FAIL_TO_PASS test id -> PASSED, FAILED, ERROR, SKIPPED, XFAIL, XPASS or MISSING."""
    pass_to_pass: dict[str, str]
    exit_code: int | None
    """Exit status of the test command; None when it was killed on timeout."""
    timed_out: bool
    log: Path
    """The test command's whole output."""
    tampered_files: list[str] = field(default_factory=list)
    """Files of the task's tests the agent changed, added or removed (restored before the run)."""

    @property
    def tests_tampered(self) -> bool:
        return bool(self.tampered_files)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["log"] = str(self.log)
        data["tests_tampered"] = self.tests_tampered
        return data


def parse_pytest_summary(output: str) -> dict[str, str]:
    """Test id -> status from the lines after pytest's last `short test summary info` header."""
    lines = [_ANSI.sub("", raw).rstrip() for raw in output.splitlines()]
    # Only the real summary counts: a test's own output may contain look-alike lines.
    starts = [i for i, line in enumerate(lines) if _SUMMARY_HEADER.match(line)]
    statuses: dict[str, str] = {}
    for line in lines[starts[-1] + 1 :] if starts else []:
        match = _SUMMARY_LINE.match(line)
        if match is None:
            continue
        status, test_id = match.groups()
        if status == "SKIPPED":
            # `SKIPPED [1] tests/test_x.py:12: reason` names a location, not a test id.
            test_id = re.sub(r"^\[\d+\] ", "", test_id)
        previous = statuses.get(test_id)
        if previous is None or _SEVERITY[status] > _SEVERITY[previous]:
            statuses[test_id] = status
    return statuses


def read_statuses(
    output: str,
    parser: str | None,
    *,
    task_id: str = "",
    fail_to_pass: list[str] | None = None,
    pass_to_pass: list[str] | None = None,
) -> dict[str, str]:
    """Test id -> status: `parse_pytest_summary` for `pytest` (or no parser), else swebench's
    parser of that name or for that repository, and pytest's for a repository it lacks."""
    if parser is not None and parser != "pytest":
        statuses = swebench_logs.parse(
            output,
            parser,
            instance_id=task_id,
            fail_to_pass=fail_to_pass or [],
            pass_to_pass=pass_to_pass or [],
        )
        if statuses is not None:
            return statuses
        if "/" not in parser:
            raise ValueError(f"task {task_id}: no test log parser {parser!r} in swebench")
    return parse_pytest_summary(output)


class TestPatchError(Exception):
    """A task's test_patch does not apply to its workspace: the task is broken, not the agent."""

    __test__ = False  # not a pytest test class


def patched_paths(workspace: Path, baseline: Path, patch: Path) -> list[str]:
    """The paths `patch` changes, creates or deletes (restored before it is applied)."""
    numstat = baseline_git(baseline, workspace, "apply", "--numstat", "-z", str(patch))
    # `added<TAB>deleted<TAB>path<NUL>`, or for a rename `added<TAB>deleted<TAB><NUL>a<NUL>b<NUL>`
    paths = []
    for field_ in numstat.decode(errors="surrogateescape").split("\0"):
        path = field_.split("\t", 2)[2] if field_.count("\t") >= 2 else field_
        if path:
            paths.append(path)
    return paths


def apply_test_patch(workspace: Path, baseline: Path, patch: Path, task_id: str) -> None:
    """Apply the test patch in `patch` (a host-only file) to the workspace; TestPatchError naming
    the task when it does not apply. Git runs on the host-only baseline and refuses to write
    through a symlink the agent left."""
    try:
        # From the workspace's root: git apply takes the patch's paths relative to where it runs.
        isolated_git(
            baseline, "apply", "--whitespace=nowarn", str(patch), work_tree=workspace,
            cwd=workspace, what=str(workspace),
        )  # fmt: skip
    except WorkspaceError as exc:
        raise TestPatchError(
            f"task {task_id}: its test_patch does not apply: {' '.join(exc.output.split())}"
        ) from None


@dataclass(frozen=True)
class Verifier:
    """A Harbor task's verifier folders on the host (in the runner's artifacts, never the
    workspace): `tests` (its tests/ folder, shown read-only at /tests) and `logs` (empty,
    writable at /logs/verifier, where it writes the reward)."""

    tests: Path
    logs: Path

    def binds(self) -> list[Bind]:
        return [Bind(self.tests, "/tests"), Bind(self.logs, "/logs/verifier", writable=True)]


def harbor_verifier(folder: Path, baseline: Path, patch: Path) -> Verifier:
    """Make a Harbor task's verifier folders afresh under `folder`: `tests/` from its
    `test_patch` (which creates `tests/...`), applied by git there, never in the workspace."""
    if folder.exists():
        shutil.rmtree(folder)
    logs = folder / "logs"
    logs.mkdir(parents=True)
    try:
        isolated_git(baseline, "apply", "--whitespace=nowarn", str(patch), work_tree=folder,
                     cwd=folder, what=str(folder))  # fmt: skip
    except WorkspaceError as exc:
        raise TestPatchError(f"its tests/ folder cannot be made: {exc}") from None
    tests = folder / "tests"
    if not (tests / "test.sh").is_file():
        raise TestPatchError("its test_patch makes no tests/test.sh")
    return Verifier(tests, logs)


def test_env(home: str, platform_interpreter: bool = False) -> dict[str, str]:
    """The test command's whole environment. The running interpreter's folder goes first on
    PATH, so `python` in the command is the platform's own Python (which has pytest); when the
    task has nothing else (`platform_interpreter`), its own libraries' pytest plugins are
    blocked (`PLATFORM_PLUGINS_OFF`)."""
    addopts = f"{PYTEST_ADDOPTS} {PLATFORM_PLUGINS_OFF}" if platform_interpreter else PYTEST_ADDOPTS
    return {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "HOME": home,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "PYTEST_ADDOPTS": addopts,
    }


def run_logged(
    workspace: Path,
    command: str,
    *,
    timeout_s: float,
    log: Path,
    confine: Confine | None,
    platform_interpreter: bool = False,
) -> tuple[int | None, bool]:
    """Run shell `command` in `workspace` with `test_env` (confined by `confine` when given),
    its output in `log`: (exit status, None when killed on timeout; whether it timed out).
    The environment is set with `env -i` on the command line, so whatever runs the command
    can neither add a variable nor drop one; it holds no secret. A sandbox that could not be
    made raises `workers.sandbox.SandboxFailed`: the command never ran."""
    home = HOME_CONFINED if confine is not None else tempfile.mkdtemp(prefix="autovibe-tests-")
    env = test_env(home, platform_interpreter)
    argv = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items())]
    argv += ["/bin/sh", "-c", command]
    log.parent.mkdir(parents=True, exist_ok=True)
    confined = None
    try:
        with contextlib.ExitStack() as stack, open_log(log) as out:
            if confine is not None:
                confined = stack.enter_context(confine(argv, env))
                argv, env = confined.argv, confined.env
            # A session of its own, so a timeout kills whatever the command started too.
            proc = subprocess.Popen(
                argv,
                cwd=workspace,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=confined.pass_fds if confined is not None else (),
            )
            try:
                code: int | None = processes.wait(proc, timeout_s)
            except subprocess.TimeoutExpired:
                code = None
                if confined is None:
                    _kill_group(proc)
            if confined is not None:
                end(proc, confined)  # what the command left in its sandbox too
                confined.check_started(log)
            return code, code is None
    finally:
        if confine is None:
            shutil.rmtree(home, ignore_errors=True)


def grade(
    workspace: Path,
    test_command: str,
    fail_to_pass: list[str],
    pass_to_pass: list[str],
    *,
    timeout_s: int,
    log: Path,
    confine: Confine | None = None,
    parser: str | None = None,
    task_id: str = "",
    reward_dir: Path | None = None,
    platform_interpreter: bool = False,
) -> GradeReport:
    """Run `test_command` in `workspace` (`run_logged`) and grade it, reading its output with
    `parser` (`read_statuses`; a Harbor task's reward from `reward_dir`, its /logs/verifier,
    with `harbor_statuses`)."""
    exit_code, timed_out = run_logged(
        workspace,
        test_command,
        timeout_s=timeout_s,
        log=log,
        confine=confine,
        platform_interpreter=platform_interpreter,
    )
    output = log.read_text(errors="replace")
    if timed_out:
        with open_log(log, append=True) as out:
            out.write(f"\n[autovibe] test command killed after {timeout_s}s\n".encode())
    if parser == HARBOR_PARSER:
        statuses = harbor_statuses(reward_dir, exit_code, log)
    else:
        statuses = read_statuses(
            output, parser, task_id=task_id, fail_to_pass=fail_to_pass, pass_to_pass=pass_to_pass
        )
    f2p = {test: statuses.get(test, "MISSING") for test in fail_to_pass}
    p2p = {test: statuses.get(test, "MISSING") for test in pass_to_pass}
    return GradeReport(
        status=_status(f2p, p2p),
        fail_to_pass=f2p,
        pass_to_pass=p2p,
        exit_code=exit_code,
        timed_out=timed_out,
        log=log,
    )


REWARD_MAX_BYTES = 4096


def read_reward(folder: Path) -> float | None:
    """The reward a Harbor verifier wrote in `folder` (its /logs/verifier): `reward.txt` (a
    number), else `reward.json` (an object with a number `reward`); None when it wrote none.
    What the tests wrote is hostile: a symlink is not followed, a file read no further than
    REWARD_MAX_BYTES; ValueError naming the file when it is not a finite number."""
    for name in ("reward.txt", "reward.json"):
        try:
            fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ValueError(f"{name}: not a regular file ({exc.strerror})") from None
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise ValueError(f"{name}: not a regular file")
            text = file.read(REWARD_MAX_BYTES + 1).decode(errors="replace")
        if len(text) > REWARD_MAX_BYTES:
            raise ValueError(f"{name}: longer than {REWARD_MAX_BYTES} bytes")
        try:
            value: object = text.strip()
            if name == "reward.json":
                doc = json.loads(text)
                value = doc.get("reward") if isinstance(doc, dict) else None
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ValueError
            reward = float(value)
        except ValueError:
            raise ValueError(f"{name}: not a number: {text[:80]!r}") from None
        if not math.isfinite(reward):
            raise ValueError(f"{name}: not a finite number: {text[:80]!r}")
        return reward
    return None


def harbor_statuses(reward_dir: Path | None, exit_code: int | None, log: Path) -> dict[str, str]:
    """`HARBOR_TEST` -> PASSED when the reward is at least 1 (or, with none written, the
    verifier exited 0), else FAILED; an unreadable reward fails it, said in the log."""
    try:
        reward = read_reward(reward_dir) if reward_dir is not None else None
    except ValueError as exc:
        with open_log(log, append=True) as out:
            out.write(f"\n[autovibe] the verifier's reward is unreadable: {exc}\n".encode())
        return {HARBOR_TEST: "FAILED"}
    with open_log(log, append=True) as out:
        said = f"reward {reward:g}" if reward is not None else f"no reward, exit {exit_code}"
        out.write(f"\n[autovibe] verifier: {said}\n".encode())
    if reward is not None:
        return {HARBOR_TEST: "PASSED" if reward >= 1 else "FAILED"}
    return {HARBOR_TEST: "PASSED" if exit_code == 0 else "FAILED"}


def _status(f2p: dict[str, str], p2p: dict[str, str]) -> GradeStatus:
    f2p_passed = [s in PASSING for s in f2p.values()]
    if all(f2p_passed) and all(s in PASSING for s in p2p.values()):
        return "resolved"
    return "partial" if any(f2p_passed) else "unresolved"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # Not workers.runner.kill_group: the runner imports this module, and a test run needs
    # no grace period.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def swebench_report(
    instance_id: str,
    assignment: str,
    grade: GradeReport | None,
    *,
    patch_exists: bool,
    infra_error: str | None = None,
) -> SwebenchReport:
    """An assignment's `report.json`, shaped like SWE-bench's per-instance report.

    `grade` is None when the run never reached its tests (an infra failure). The agent edits
    the workspace in place, so a graded patch has been applied by construction.
    """
    return SwebenchReport(
        instance_id=instance_id,
        assignment=assignment,
        patch_exists=patch_exists,
        patch_successfully_applied=grade is not None,
        resolved=grade is not None and grade.status == "resolved",
        status=grade.status if grade is not None else "error",
        tests_status=TestsStatus(
            FAIL_TO_PASS=_split(grade.fail_to_pass if grade else {}),
            PASS_TO_PASS=_split(grade.pass_to_pass if grade else {}),
        ),
        tests_timed_out=grade.timed_out if grade is not None else False,
        tests_tampered=grade.tests_tampered if grade is not None else False,
        tampered_files=list(grade.tampered_files) if grade is not None else [],
        infra_failure=infra_error is not None,
        infra_error=infra_error,
    )


def _split(statuses: dict[str, str]) -> TestLists:
    """SWE-bench's success/failure lists; SKIPPED and MISSING tests are failures."""
    return TestLists(
        success=[test for test, s in statuses.items() if s in PASSING],
        failure=[test for test, s in statuses.items() if s not in PASSING],
    )
