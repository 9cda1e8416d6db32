"""Task sets in SWE-bench's format, from a local JSON or JSONL file; repos already on disk.

An entry has `instance_id`, `repo` (`owner/name`), `base_commit`, `problem_statement`,
`FAIL_TO_PASS` and `PASS_TO_PASS`; its `test_patch` is applied after the agent, before the
tests, and the output is read by `swebench`'s parser for `repo` (pytest's summary for a
repository it does not know); an entry may name its own `test_cmd` and `parser`. SWE-bench's
published files hold the test lists as JSON-encoded strings; plain lists are accepted too.
Nothing is downloaded: the repository is looked up as `repos_root/<owner>__<name>`,
`repos_root/<owner>/<name>`, or is `repos_root` itself, and its `base_commit` must exist
there (`git cat-file -e`). Every bad entry is reported with its file and line, all at once.

A workspace is a copy of its task's repository folder (`workers.workspace.prepare`), so each
task's `repo` is a checkout of its repository at `base_commit`
(`checkouts/<owner>__<name>/<commit>`, a shared clone made once per commit; by default under
the data root's `task-repos/`). With `at_head=True` the task uses the repository as it is,
and `SweBenchInstance.at_base_commit` says whether its HEAD is `base_commit`, so a caller can
refuse or warn.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from contracts.config import ConfigError, Task, describe_errors
from contracts.settings import Settings
from workers.workspace import WorkspaceError, checkout

DEFAULT_TEST_COMMAND = "python -m pytest -q"
REQUIRED = ("instance_id", "repo", "base_commit", "problem_statement", "FAIL_TO_PASS")
REPO_NAME = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
COMMIT_ID = re.compile(r"^[0-9a-fA-F]{7,64}$")


@dataclass(frozen=True)
class SweBenchInstance:
    instance_id: str
    """As in the file; `task.id` is its slug."""
    repo_name: str
    """`owner/name` as in the file."""
    base_commit: str
    at_base_commit: bool
    """Whether `task.repo` is at `base_commit` (always, unless loaded with `at_head`)."""
    task: Task
    source: Path
    """The repository found under `repos_root`; `task.repo` is its checkout at `base_commit`."""


def slugify(instance_id: str) -> str:
    """A task id (`contracts.config.Slug`) from an instance id: lower case, `-` for the rest."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", instance_id.lower()).strip("-_")
    return slug[:63].rstrip("-_")


def load_swebench(
    path: Path,
    repos_root: Path,
    *,
    test_command: str = DEFAULT_TEST_COMMAND,
    timeout_s: int = 600,
    checkouts: Path | None = None,
    at_head: bool = False,
) -> list[SweBenchInstance]:
    """Read and check every entry of `path` and check each repository out at its base_commit
    under `checkouts` (default `$AUTOVIBE_DATA/task-repos`), or with `at_head` leave it as it
    is; raises ConfigError naming each bad line."""
    git = _Git()
    place = None if at_head else (checkouts or Settings().data / "task-repos").resolve()
    return read_instances(
        path, lambda entry: _instance(entry, repos_root, git, test_command, timeout_s, place)
    )


class BadEntry(Exception):
    """One entry is unusable; the message says why."""


class _WithTask(Protocol):
    @property
    def task(self) -> Task: ...


Instance = TypeVar("Instance", bound=_WithTask)


def read_instances(path: Path, build: Callable[[Any], Instance]) -> list[Instance]:
    """`build` of every entry of `path`, their task ids unique; ConfigError naming each bad line
    (an entry `build` refused with BadEntry, a repeated task id), or when there is none."""
    problems: list[str] = []
    instances: list[Instance] = []
    seen: dict[str, int] = {}
    for line, entry in read_entries(path, problems):
        try:
            instance = build(entry)
        except BadEntry as exc:
            problems.append(f"line {line}: {entry_label(entry)}{exc}")
            continue
        first = seen.setdefault(instance.task.id, line)
        if first != line:
            problems.append(
                f"line {line}: {entry_label(entry)}task id {instance.task.id!r} repeats the one of "
                f"line {first}"
            )
            continue
        instances.append(instance)
    if problems:
        raise ConfigError(str(path), problems)
    if not instances:
        raise ConfigError(str(path), ["no task instances in the file"])
    return instances


def entry_label(entry: Any) -> str:
    if isinstance(entry, dict) and isinstance(entry.get("instance_id"), str):
        return f"{entry['instance_id']}: "
    return ""


def read_entries(path: Path, problems: list[str]) -> Iterator[tuple[int, Any]]:
    """(line, parsed object) for a JSON array or for JSON Lines; parse errors go to `problems`."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the task set: {exc.strerror}"]) from exc
    if text.lstrip().startswith("["):
        yield from _array_entries(text, path)
        return
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not valid JSON: {exc.msg} (column {exc.colno})")


def _array_entries(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    # Decoded element by element, so each entry keeps the line it starts on.
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]":
            return
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                str(path), [f"line {exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})"]
            ) from exc
        yield text.count("\n", 0, pos) + 1, value
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            line = text.count("\n", 0, pos) + 1
            raise ConfigError(str(path), [f"line {line}: expected ',' or ']' in the JSON array"])


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _instance(
    entry: Any,
    repos_root: Path,
    git: _Git,
    test_command: str,
    timeout_s: int,
    checkouts: Path | None,
) -> SweBenchInstance:
    if not isinstance(entry, dict):
        raise BadEntry(f"an entry is a JSON object, not {type(entry).__name__}")
    missing = [k for k in REQUIRED if k not in entry]
    if missing:
        raise BadEntry(f"missing {', '.join(missing)}")
    instance_id, repo_name, commit = entry["instance_id"], entry["repo"], entry["base_commit"]
    if not isinstance(instance_id, str) or not slugify(instance_id):
        raise BadEntry(f"instance_id must be a non-empty string, got {instance_id!r}")
    if not isinstance(repo_name, str) or not REPO_NAME.match(repo_name):
        raise BadEntry(f"repo must be 'owner/name', got {repo_name!r}")
    if not isinstance(commit, str) or not COMMIT_ID.match(commit):
        raise BadEntry(f"base_commit must be a hex commit id, got {commit!r}")
    fail_to_pass = test_list(entry, "FAIL_TO_PASS")
    pass_to_pass = test_list(entry, "PASS_TO_PASS") if "PASS_TO_PASS" in entry else []
    source = _find_repo(repo_name, repos_root)
    if not git.has_commit(source, commit):
        raise BadEntry(f"base_commit {commit} is not a commit of {source}")
    repo = source
    if checkouts is not None:
        full = git.resolve(source, commit)
        try:
            repo = checkout(source, full, checkouts / repo_name.replace("/", "__") / full)
        except WorkspaceError as exc:
            raise BadEntry(f"cannot check out base_commit {commit}: {exc}") from exc
    for key in ("test_patch", "test_cmd", "parser"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise BadEntry(f"{key} must be a string")
    try:
        task = Task(
            id=slugify(instance_id),
            repo=repo,
            prompt=entry["problem_statement"],
            test_command=entry.get("test_cmd") or test_command,
            fail_to_pass=fail_to_pass,
            pass_to_pass=pass_to_pass,
            timeout_s=timeout_s,
            test_patch=entry.get("test_patch") or None,
            # swebench's parser for the repository (pytest's when it has none), unless declared.
            parser=entry.get("parser") or repo_name,
        )
    except ValidationError as exc:
        raise BadEntry("; ".join(describe_errors(exc))) from exc
    return SweBenchInstance(
        instance_id=instance_id,
        repo_name=repo_name,
        base_commit=commit,
        at_base_commit=checkouts is not None or git.head(repo).startswith(commit.lower()),
        task=task,
        source=source,
    )


def test_list(entry: dict[str, Any], key: str) -> list[str]:
    value = entry[key]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadEntry(f"{key} is a string but not a JSON-encoded list: {exc.msg}") from exc
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise BadEntry(f"{key} must be a list of test ids (or that list JSON-encoded)")
    return value


def _find_repo(repo_name: str, repos_root: Path) -> Path:
    owner, name = repo_name.split("/")
    # The last: `repos_root` is itself the repository (a task set over one repository).
    candidates = [repos_root / f"{owner}__{name}", repos_root / owner / name, repos_root]
    for candidate in candidates:
        if (candidate / ".git").exists():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise BadEntry(f"no git repository for {repo_name} (looked for {tried}; nothing is downloaded)")


class _Git:
    """`git cat-file -e` and `rev-parse HEAD`, HEADs remembered per repository."""

    def __init__(self) -> None:
        self._heads: dict[Path, str] = {}

    def has_commit(self, repo: Path, commit: str) -> bool:
        proc = subprocess.run(
            ["git", "-C", str(repo), "cat-file", "-e", f"{commit}^{{commit}}"],
            capture_output=True,
            check=False,
        )
        return proc.returncode == 0

    def resolve(self, repo: Path, commit: str) -> str:
        """The full id of a (possibly abbreviated) commit known to exist."""
        proc = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", f"{commit}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
        )
        return proc.stdout.strip().lower()

    def head(self, repo: Path) -> str:
        if repo not in self._heads:
            proc = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                check=False,
            )
            self._heads[repo] = proc.stdout.strip().lower() if proc.returncode == 0 else ""
        return self._heads[repo]
