"""`autovibe tasks import swebench FILE`: a SWE-bench dataset file made into a stored task set.

Each line (or array element) is an instance in SWE-bench's format: `instance_id`, `repo`
(`owner/name`), `base_commit`, `patch` (the gold solution), `test_patch`, `FAIL_TO_PASS`,
`PASS_TO_PASS`, `problem_statement` (the prompt), `version`, `environment_setup_commit`; an
instance may add its own `test_cmd`, `parser`, and setup steps `pre_install` and `install` (a
shell command or a list), run once over its repository before any assignment
(`workers.setups`). SWE-bench 5's own fields are read too: the test command between the markers
of its `eval_script` when it has no `test_cmd`, and its `log_parser` when it has no `parser`.
An instance with neither gets `--test-command` (pytest by default), unless swebench reads its
repository's log with a parser that is not pytest's (Django's, SymPy's, ...): pytest's output
would grade every test MISSING, so it is refused, asking for its `test_cmd`. The `swebench`
package (5.x) holds no install steps nor test commands by repository and version any more (its
instances carry a Dockerfile, built into a Docker image, which this platform does not build),
so an instance without `install` gets none, known repository or not. Its repository is named
by URL, as a trial task's may be: `https://github.com/owner/name`, or offline `file://` the folder
`<owner>__<name>` (a clone or a bare repository) under `--repos DIR`. It is fetched into the
data root's mirror (`orchestrator.mirrors`), `base_commit` must be there, and `patch` and
`test_patch` must apply to it. Every problem is reported, naming the line, the instance and
the field or the cause, and then nothing is written; a set that passes is written whole
(`orchestrator.taskstore`).
"""

from __future__ import annotations

import datetime
import urllib.parse
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from contracts.config import ConfigError, Task, describe_errors
from contracts.dataroot import DataRoot
from contracts.tasksets import TaskSet, TaskSetEntry
from orchestrator.mirrors import Mirrors, RepoError
from orchestrator.tasksets import (
    COMMIT_ID,
    DEFAULT_TEST_COMMAND,
    REPO_NAME,
    BadEntry,
    read_instances,
    slugify,
    test_list,
)
from orchestrator.taskstore import TaskStore
from workers import swebench_logs
from workers.workspace import WorkspaceError

REQUIRED = ("instance_id", "repo", "base_commit", "problem_statement", "patch", "FAIL_TO_PASS")


def repo_url(repo_name: str, repos: Path | None) -> str:
    """Where `owner/name` is fetched from: GitHub, or `<owner>__<name>` under `repos`."""
    if repos is None:
        return f"https://github.com/{repo_name}"
    owner, name = repo_name.split("/")
    for candidate in (repos / f"{owner}__{name}", repos / f"{owner}__{name}.git"):
        if candidate.is_dir():
            return "file://" + urllib.parse.quote(str(candidate.resolve()))
    raise BadEntry(f"repo: no {owner}__{name} under {repos} (with --repos nothing is downloaded)")


def import_swebench(
    path: Path,
    root: DataRoot,
    *,
    name: str | None = None,
    repos: Path | None = None,
    context: dict[str, Any] | None = None,
    test_command: str | None = None,
    timeout_s: int = 600,
    replace: bool = False,
) -> TaskSet:
    """Check every instance of `path`, fetch its repository, and store the set as `name`
    (default: the file's stem); ConfigError naming each bad line, and then nothing is
    written. `context`: the server's checks of a task (task roots, parsers); `test_command`:
    the test command of instances that name none (None: pytest, where swebench's parser for
    the repository reads pytest's output)."""
    set_name = name or slugify(path.stem)
    mirrors = Mirrors(root)
    unreachable: dict[str, str] = {}
    entries = read_instances(
        path,
        lambda raw: _entry(raw, repos, mirrors, context, test_command, timeout_s, unreachable),
    )
    try:
        taskset = TaskSet(
            name=set_name,
            kind="swebench",
            source=str(path.resolve()),
            imported_at=datetime.datetime.now(datetime.UTC),
            entries=entries,
        )
    except ValidationError as exc:
        raise ConfigError(str(path), [f"--name {set_name!r}: {describe_errors(exc)[0]}"]) from exc
    TaskStore(root).write(taskset, replace=replace)
    return taskset


def _entry(
    raw: Any,
    repos: Path | None,
    mirrors: Mirrors,
    context: dict[str, Any] | None,
    test_command: str | None,
    timeout_s: int,
    unreachable: dict[str, str],
) -> TaskSetEntry:
    if not isinstance(raw, dict):
        raise BadEntry(f"an instance is a JSON object, not {type(raw).__name__}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise BadEntry(f"missing field {', '.join(missing)}")
    instance_id, repo_name, commit = raw["instance_id"], raw["repo"], raw["base_commit"]
    if not isinstance(instance_id, str) or not slugify(instance_id):
        raise BadEntry(f"instance_id: a non-empty string, not {instance_id!r}")
    if not isinstance(repo_name, str) or not REPO_NAME.match(repo_name):
        raise BadEntry(f"repo: 'owner/name', not {repo_name!r}")
    if not isinstance(commit, str) or not COMMIT_ID.match(commit):
        raise BadEntry(f"base_commit: a hex commit id, not {commit!r}")
    for key in ("patch", "test_patch", "test_cmd", "parser", "problem_statement", "version",
                "environment_setup_commit", "eval_script", "log_parser"):  # fmt: skip
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise BadEntry(f"{key}: a string, not {type(raw[key]).__name__}")
    setup = [*_steps(raw, "pre_install"), *_steps(raw, "install")]
    # swebench's parser for the repository (pytest's when it has none), unless one is named.
    parser = raw.get("parser") or raw.get("log_parser") or repo_name
    command = _test_command(raw, parser, test_command)
    fail_to_pass = test_list(raw, "FAIL_TO_PASS")  # BadEntry names the field
    pass_to_pass = test_list(raw, "PASS_TO_PASS") if "PASS_TO_PASS" in raw else []
    url = repo_url(repo_name, repos)
    if url in unreachable:  # one try per repository, not one per instance
        raise BadEntry(f"repo: {unreachable[url]}")
    try:
        full = mirrors.resolve(url, commit=commit.lower())
    except RepoError as exc:
        if not mirrors.mirror(url).is_dir():
            unreachable[url] = str(exc)
            raise BadEntry(f"repo: {exc}") from None
        raise BadEntry(f"base_commit: {exc}") from None
    for key in ("patch", "test_patch"):
        if raw.get(key):
            try:
                why = mirrors.patch_problem(url, full, raw[key])
            except WorkspaceError as exc:
                why = str(exc)
            if why is not None:
                raise BadEntry(f"{key} does not apply to base_commit {commit}: {why}")
    try:
        task = Task.model_validate(
            {
                "id": slugify(instance_id),
                "repo": url,
                "commit": full,
                "prompt": raw["problem_statement"],
                "test_command": command,
                "fail_to_pass": fail_to_pass,
                "pass_to_pass": pass_to_pass,
                "timeout_s": timeout_s,
                "test_patch": raw.get("test_patch") or None,
                "parser": parser,
                "environment": {"setup": setup} if setup else None,
            },
            context=context,
        )
    except ValidationError as exc:
        raise BadEntry("; ".join(describe_errors(exc))) from None
    return TaskSetEntry(
        task=task,
        instance_id=instance_id,
        repo_name=repo_name,
        gold_patch=raw["patch"],
        version=None if raw.get("version") is None else str(raw["version"]),
        environment_setup_commit=raw.get("environment_setup_commit"),
    )


def _test_command(raw: dict[str, Any], parser: str, given: str | None) -> str:
    """The instance's `test_cmd`, else its `eval_script`'s test command, else `given`, else
    pytest where `parser` reads pytest's output; BadEntry when none of these fits."""
    if raw.get("test_cmd"):
        return str(raw["test_cmd"])
    if raw.get("eval_script"):
        command = swebench_logs.eval_test_command(raw["eval_script"])
        if command is None:
            raise BadEntry(
                "eval_script: no test command between swebench's markers "
                "(': '>>>>> Start Test Output'' ... ': '>>>>> End Test Output''); give test_cmd"
            )
        return command
    if given is not None:
        return given
    if not swebench_logs.reads_pytest(parser):
        raise BadEntry(
            f"test_cmd: none given, and no eval_script to take it from; swebench 5 keeps no "
            f"test command by repository, and its parser for {parser} is not pytest's, so "
            f"'{DEFAULT_TEST_COMMAND}' could not be graded: add the instance's test_cmd (or "
            "its eval_script)"
        )
    return DEFAULT_TEST_COMMAND


def _steps(raw: dict[str, Any], key: str) -> list[str]:
    """An instance's `pre_install` or `install`: one shell command or a list of them."""
    value = raw.get(key)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return value
    raise BadEntry(f"{key}: a shell command or a list of them, not {value!r:.60}")
