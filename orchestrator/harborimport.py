"""`autovibe tasks import harbor DIR`: Harbor (Terminal-Bench) task folders made a stored task set.

A Harbor task is a folder: `task.toml` (its configuration; `[agent] timeout_sec` is the
agent's timeout), `instruction.md` (the prompt), `tests/test.sh` (the verifier, with whatever
else `tests/` holds), optionally `environment/` (the files of its workspace, Harbor's /app)
and `solution/solve.sh` (the reference solution). DIR is one task folder or a folder of them.

Each task becomes a task of the set, graded the way Harbor grades (`workers.grading`, parser
`harbor`): its `tests/` folder, carried as a `test_patch` that creates it, is shown to the
tests' sandbox at /tests, never put in the workspace; the verifier's reward in /logs/verifier,
else its exit status, decides. The workspace is `environment/`'s files, committed once into a
repository of the data root (`tasks/sources/<task>-<commit>.git`, content-addressed: the same
files are the same commit) from which the mirrors fetch, so a trial checks the task out like
any repository named by URL, with no history. What Harbor's Dockerfile would install is not
run: the task runs with the sandbox's tools (the Dockerfile is named in `ImportedHarbor.notes`).

Every folder is checked before anything is written; every problem is reported with the task
and the cause, and then nothing is written.
"""

from __future__ import annotations

import datetime
import math
import shutil
import stat
import tempfile
import tomllib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from contracts.config import HARBOR_PARSER, HARBOR_TEST, ConfigError, Task, describe_errors
from contracts.dataroot import DataRoot
from contracts.tasksets import TaskSet, TaskSetEntry
from orchestrator.mirrors import Mirrors, RepoError
from orchestrator.tasksets import BadEntry, slugify
from orchestrator.taskstore import TaskStore
from workers.workspace import WorkspaceError, isolated_git

TEST_COMMAND = "bash /tests/test.sh"
WORKDIR = "/app"
"""Where Harbor's images put the task (WORKDIR /app): the workspace is also shown there."""
IMAGE_FILES = ("Dockerfile", "docker-compose.yaml", "docker-compose.yml")
DOCKER_FILES = frozenset({*IMAGE_FILES, ".dockerignore"})
"""Files of `environment/` that describe an image rather than belong to the workspace."""
MAX_FILE_BYTES = 16 * 1024 * 1024
_IDENTITY = {
    "GIT_AUTHOR_NAME": "autovibe", "GIT_AUTHOR_EMAIL": "tasks@autovibe.invalid",
    "GIT_AUTHOR_DATE": "1970-01-01T00:00:00+0000", "GIT_COMMITTER_NAME": "autovibe",
    "GIT_COMMITTER_EMAIL": "tasks@autovibe.invalid",
    "GIT_COMMITTER_DATE": "1970-01-01T00:00:00+0000",
}  # fmt: skip
"""Fixed: a task's files always make the same commit."""


@dataclass
class HarborTask:
    """One task folder, read and checked; nothing written yet."""

    folder: Path
    task_id: str
    prompt: str
    timeout_s: int
    environment: Path | None
    solution: dict[str, str]
    notes: list[str] = field(default_factory=list)


@dataclass
class ImportedHarbor:
    taskset: TaskSet
    notes: list[str]
    """What the import did not do, per task (a Dockerfile that was not built)."""


def import_harbor(
    path: Path,
    root: DataRoot,
    *,
    name: str | None = None,
    context: dict[str, Any] | None = None,
    replace: bool = False,
) -> ImportedHarbor:
    """Check every task folder of `path`, commit each one's workspace and store the set as
    `name` (default: the folder's name); ConfigError naming each problem, and then nothing
    is written."""
    path = path.absolute()
    set_name = name or slugify(path.name)
    if not path.is_dir():
        raise ConfigError(str(path), ["not a folder (a Harbor task folder, or a folder of them)"])
    folders = [path] if (path / "task.toml").exists() else _task_folders(path)
    if not folders:
        raise ConfigError(str(path), ["no Harbor task here: no task.toml in it or its folders"])
    problems: list[str] = []
    read: list[HarborTask] = []
    seen: dict[str, Path] = {}
    for folder in folders:
        try:
            task = _read(folder)
        except BadEntry as exc:
            problems.append(f"{folder.name}: {exc}")
            continue
        if task.task_id in seen:
            problems.append(f"{folder.name}: task id {task.task_id!r} repeats {seen[task.task_id]}")
            continue
        seen[task.task_id] = folder
        read.append(task)
    if problems:
        raise ConfigError(str(path), problems)
    entries: list[TaskSetEntry] = []
    made: list[Path] = []
    try:
        for task in read:
            entries.append(_entry(task, root, context, made))
        taskset = TaskSet(
            name=set_name,
            kind="harbor",
            source=str(path),
            imported_at=datetime.datetime.now(datetime.UTC),
            entries=entries,
        )
        TaskStore(root).write(taskset, replace=replace)
    except ValidationError as exc:
        _remove(made)
        raise ConfigError(str(path), [f"--name {set_name!r}: {describe_errors(exc)[0]}"]) from exc
    except BaseException:
        _remove(made)
        raise
    return ImportedHarbor(taskset, [note for task in read for note in task.notes])


def _task_folders(path: Path) -> list[Path]:
    return sorted(
        p
        for p in path.iterdir()
        if p.is_dir() and not p.is_symlink() and (p / "task.toml").exists()
    )


def _read(folder: Path) -> HarborTask:
    """The task folder checked whole: BadEntry naming the file and the cause."""
    for entry in _walk(folder):  # files a task folder could use to read the host's
        if entry.is_symlink():
            raise BadEntry(f"{entry.relative_to(folder)} is a symlink (a task folder holds files)")
    config = _text(folder / "task.toml", required=True)
    try:
        toml = tomllib.loads(config)
    except tomllib.TOMLDecodeError as exc:
        raise BadEntry(f"task.toml: not TOML: {exc}") from None
    timeout_s = _timeout(toml)
    prompt = _text(folder / "instruction.md", required=True).strip()
    if not prompt:
        raise BadEntry("instruction.md is empty: it is the agent's prompt")
    if not (folder / "tests").is_dir():
        raise BadEntry("no tests/ folder: a Harbor task is graded by tests/test.sh")
    if not (folder / "tests" / "test.sh").is_file():
        raise BadEntry("no tests/test.sh in tests/: it is the task's verifier")
    environment = folder / "environment"
    notes = []
    if environment.is_dir():
        if (environment / ".git").exists():
            raise BadEntry("environment/.git: a task's files, not a repository, make its workspace")
        built = [n for n in IMAGE_FILES if (environment / n).exists()]
        if built:
            notes.append(
                f"{folder.name}: environment/{built[0]} is not built; the task runs with the "
                "sandbox's tools and the files of environment/"
            )
    solution: dict[str, str] = {}
    if (folder / "solution").is_dir():
        for file in _walk(folder / "solution"):
            if file.is_file():
                solution[file.relative_to(folder / "solution").as_posix()] = _text(file)
        if "solve.sh" not in solution:
            raise BadEntry("solution/ has no solve.sh: the oracle runs it")
    task_id = slugify(folder.name)
    if not task_id:
        raise BadEntry("its folder name makes no task id (letters, digits, - _ .)")
    return HarborTask(
        folder=folder,
        task_id=task_id,
        prompt=prompt,
        timeout_s=timeout_s,
        environment=environment if environment.is_dir() else None,
        solution=solution,
        notes=notes,
    )


def _timeout(toml: dict[str, Any]) -> int:
    agent = toml.get("agent", {})
    if not isinstance(agent, dict):
        raise BadEntry("task.toml: [agent] is a table")
    value = agent.get("timeout_sec", 600)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadEntry(f"task.toml: [agent] timeout_sec is a number of seconds, not {value!r}")
    if not 1 <= value <= 7 * 24 * 3600:
        raise BadEntry(f"task.toml: [agent] timeout_sec is 1 to 604800 seconds, not {value}")
    return math.ceil(value)


def _walk(folder: Path) -> Iterator[Path]:
    yield from sorted(folder.rglob("*"))


def _text(path: Path, required: bool = False) -> str:
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise BadEntry(f"no {path.name}" if required else f"{path} vanished") from None
    if not stat.S_ISREG(info.st_mode):
        raise BadEntry(f"{path.name} is not a file")
    if info.st_size > MAX_FILE_BYTES:
        raise BadEntry(f"{path.name} is larger than {MAX_FILE_BYTES // 2**20} MiB")
    try:
        return path.read_bytes().decode()
    except UnicodeDecodeError:
        raise BadEntry(f"{path.name} is not UTF-8 text") from None


def _entry(
    task: HarborTask, root: DataRoot, context: dict[str, Any] | None, made: list[Path]
) -> TaskSetEntry:
    url, commit, test_patch = _commit(task, root, made)
    try:
        full = Mirrors(root).resolve(url, commit=commit)
    except RepoError as exc:
        raise ConfigError(str(task.folder), [f"{task.task_id}: {exc}"]) from None
    try:
        spec = Task.model_validate(
            {
                "id": task.task_id,
                "repo": url,
                "commit": full,
                "prompt": task.prompt,
                "test_command": TEST_COMMAND,
                "fail_to_pass": [HARBOR_TEST],
                "timeout_s": task.timeout_s,
                "test_patch": test_patch,
                "parser": HARBOR_PARSER,
                "workdir": WORKDIR,
            },
            # Our own repository under the data root: the task roots' checks are for trials.
            context={k: v for k, v in (context or {}).items() if k not in ("task_roots",)},
        )
    except ValidationError as exc:
        raise ConfigError(str(task.folder), describe_errors(exc)) from None
    return TaskSetEntry(
        task=spec,
        instance_id=task.folder.name,
        repo_name=task.folder.name,
        solution=task.solution,
    )


def _commit(task: HarborTask, root: DataRoot, made: list[Path]) -> tuple[str, str, str]:
    """(file:// URL of the task's source repository, its commit, the test_patch creating
    tests/): the workspace files committed, the same files always the same commit."""
    DataRoot.ensure(root.task_sources)
    with tempfile.TemporaryDirectory(prefix=".harbor-", dir=root.task_sources) as tmp:
        git_dir, files, verifier = Path(tmp) / "repo.git", Path(tmp) / "files", Path(tmp) / "v"
        try:
            isolated_git(git_dir, "init", "--quiet", "--bare", str(git_dir))
            if task.environment is not None:
                shutil.copytree(
                    task.environment, files, symlinks=True,
                    ignore=lambda _d, names: [n for n in names if n in DOCKER_FILES],
                )  # fmt: skip
            else:
                files.mkdir()
            shutil.copytree(task.folder / "tests", verifier / "tests", symlinks=True)
            message = f"harbor task {task.task_id}"
            commit = _commit_tree(git_dir, files, Path(tmp) / "index", message)
            tests = _commit_tree(git_dir, verifier, Path(tmp) / "tests.index", "tests")
            patch = isolated_git(git_dir, "diff-tree", "-p", "--binary", "--root", tests)
        except (OSError, WorkspaceError) as exc:
            raise ConfigError(str(task.folder), [f"{task.task_id}: {exc}"]) from None
        source = root.task_sources / f"{task.task_id}-{commit[:12]}.git"
        if not source.exists():
            git_dir.rename(source)
            made.append(source)
    url = "file://" + urllib.parse.quote(str(source))
    return url, commit, patch.decode(errors="surrogateescape")


def _commit_tree(git_dir: Path, files: Path, index: Path, message: str) -> str:
    env = {"GIT_INDEX_FILE": str(index), **_IDENTITY}
    isolated_git(git_dir, "add", "--all", "--force", ".", work_tree=files, cwd=files, env=env)
    tree = isolated_git(git_dir, "write-tree", env=env).decode().strip()
    return isolated_git(git_dir, "commit-tree", tree, "-m", message, env=env).decode().strip()


def _remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
