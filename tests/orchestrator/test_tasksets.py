"""SWE-bench task sets from local files, over a real git repository made for the test."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from contracts.config import ConfigError, TrialConfig
from orchestrator.tasksets import load_swebench, slugify
from workers.workspace import prepare

F2P = ["tests/test_basic.py::test_add"]
P2P = ["tests/test_basic.py::test_subtract", "tests/test_basic.py::test_multiply"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture(autouse=True)
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Checkouts at base_commit go under the data root's task-repos/ by default."""
    monkeypatch.setenv("AUTOVIBE_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture
def repos(tmp_path: Path) -> tuple[Path, str, str]:
    """repos/acme__mathkit with two commits; returns the root, the old and the new commit."""
    repo = tmp_path / "repos" / "acme__mathkit"
    repo.mkdir(parents=True)
    git(repo, "init", "--quiet", "--initial-branch=main")
    (repo / "mathkit.py").write_text("def add(a, b):\n    raise NotImplementedError\n")
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", "one")
    old = git(repo, "rev-parse", "HEAD")
    (repo / "README").write_text("mathkit\n")
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", "two")
    return tmp_path / "repos", old, git(repo, "rev-parse", "HEAD")


def entry(commit: str, **changes: Any) -> dict[str, Any]:
    """An instance as SWE-bench publishes it: the test lists JSON-encoded."""
    base = {
        "instance_id": "acme__mathkit-1",
        "repo": "acme/mathkit",
        "base_commit": commit,
        "problem_statement": "add() raises instead of adding.",
        "FAIL_TO_PASS": json.dumps(F2P),
        "PASS_TO_PASS": json.dumps(P2P),
        "version": "1.0",
    }
    return {**base, **changes}


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_loads_swebench_entries_as_tasks(tmp_path: Path, repos: tuple[Path, str, str]) -> None:
    root, old, new = repos
    path = write_jsonl(
        tmp_path / "set.jsonl",
        [
            entry(new),
            "",
            # Plain lists are accepted as well as JSON strings; an abbreviated commit too.
            entry(old[:12], instance_id="Acme__MathKit.2", FAIL_TO_PASS=F2P, PASS_TO_PASS=[]),
        ],
    )
    first, second = load_swebench(path, root)
    assert (first.instance_id, first.task.id, first.base_commit) == (
        "acme__mathkit-1",
        "acme__mathkit-1",
        new,
    )
    assert first.at_base_commit is True
    assert first.source == (root / "acme__mathkit").resolve()
    assert first.task.repo == (tmp_path / "data" / "task-repos" / "acme__mathkit" / new).resolve()
    assert first.task.prompt == "add() raises instead of adding."
    assert first.task.test_command == "python -m pytest -q"
    assert (first.task.fail_to_pass, first.task.pass_to_pass) == (F2P, P2P)
    assert (second.task.id, second.at_base_commit, second.task.pass_to_pass) == (
        "acme__mathkit-2",
        True,
        [],
    )
    # The tasks drop straight into a trial.
    trial = TrialConfig(
        name="swe",
        project="demo",
        budget={"amount": "1"},
        agents=["builtin"],
        model_pairs=["tiny"],
        tasks=[first.task, second.task],
    )
    assert [t.id for t in trial.tasks] == ["acme__mathkit-1", "acme__mathkit-2"]


def test_every_bad_line_is_named(tmp_path: Path, repos: tuple[Path, str, str]) -> None:
    root, _, new = repos
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            entry(new),  # line 1: fine
            '{"instance_id": "broken", ',  # line 2
            entry(new, instance_id="x-3", base_commit="0" * 40),  # line 3
            entry(new, instance_id="x-4", repo="acme/absent"),  # line 4
            {"instance_id": "x-5", "repo": "acme/mathkit"},  # line 5
            entry(new, instance_id="x-6", FAIL_TO_PASS="[not json"),  # line 6
            entry(new, instance_id="ACME__mathkit-1"),  # line 7: same slug as line 1
            entry(new, instance_id="x-8", FAIL_TO_PASS="[]"),  # line 8
            ["not", "an", "object"],  # line 9
        ],
    )
    with pytest.raises(ConfigError) as info:
        load_swebench(path, root)
    problems = info.value.problems
    assert problems[0].startswith("line 2: not valid JSON:")
    repo = (root / "acme__mathkit").resolve()
    assert problems[1] == f"line 3: x-3: base_commit {'0' * 40} is not a commit of {repo}"
    assert problems[2].startswith("line 4: x-4: no git repository for acme/absent (looked for ")
    assert "nothing is downloaded" in problems[2]
    assert problems[3] == "line 5: x-5: missing base_commit, problem_statement, FAIL_TO_PASS"
    assert problems[4].startswith(
        "line 6: x-6: FAIL_TO_PASS is a string but not a JSON-encoded list"
    )
    assert problems[5] == (
        "line 7: ACME__mathkit-1: task id 'acme__mathkit-1' repeats the one of line 1"
    )
    assert (
        problems[6]
        == "line 8: x-8: fail_to_pass: List should have at least 1 item after validation, not 0"
    )
    assert problems[7] == "line 9: an entry is a JSON object, not list"
    assert len(problems) == 8
    assert str(info.value).startswith(f"{path}: line 2: ")


def test_a_json_array_keeps_line_numbers(tmp_path: Path, repos: tuple[Path, str, str]) -> None:
    root, old, new = repos
    good = entry(new)
    bad = entry(old, instance_id="late", base_commit="not-a-commit")
    path = tmp_path / "set.json"
    path.write_text(json.dumps([good, bad], indent=2))
    with pytest.raises(ConfigError) as info:
        load_swebench(path, root)
    starts = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if line == "  {"]
    assert info.value.problems == [
        f"line {starts[1]}: late: base_commit must be a hex commit id, got 'not-a-commit'"
    ]
    path.write_text(json.dumps([good]))
    (instance,) = load_swebench(path, root, test_command="pytest -x", timeout_s=30)
    assert (instance.task.test_command, instance.task.timeout_s) == ("pytest -x", 30)


def test_repos_root_may_be_the_repository_itself(
    tmp_path: Path, repos: tuple[Path, str, str]
) -> None:
    root, _, new = repos
    path = write_jsonl(tmp_path / "one.jsonl", [entry(new, repo="someone/else")])
    (instance,) = load_swebench(path, root / "acme__mathkit", at_head=True)
    assert instance.task.repo == instance.source == (root / "acme__mathkit").resolve()


def test_each_task_is_checked_out_at_its_base_commit(
    tmp_path: Path, repos: tuple[Path, str, str]
) -> None:
    root, old, new = repos
    source = root / "acme__mathkit"
    (source / "mathkit.py").write_text("# an uncommitted edit in the user's working tree\n")
    before = (git(source, "status", "--porcelain"), git(source, "for-each-ref"))
    path = write_jsonl(
        tmp_path / "set.jsonl",
        [entry(old[:10]), entry(old, instance_id="again"), entry(new, instance_id="new")],
    )
    place = tmp_path / "checkouts"
    at_old, again, at_new = load_swebench(path, root, checkouts=place)
    assert at_old.task.repo == again.task.repo == place / "acme__mathkit" / old
    assert at_new.task.repo == place / "acme__mathkit" / new
    assert all(i.at_base_commit for i in (at_old, again, at_new))
    # The workspace made from the task is the base commit, not the working tree or HEAD.
    ws = tmp_path / "ws"
    prepare(at_old.task.repo, ws)
    assert sorted(p.name for p in ws.iterdir() if p.name != ".git") == ["mathkit.py"]
    assert "raise NotImplementedError" in (ws / "mathkit.py").read_text()
    prepare(at_new.task.repo, ws)
    assert (ws / "README").read_text() == "mathkit\n"
    # The user's repository is left as it was.
    assert (git(source, "status", "--porcelain"), git(source, "for-each-ref")) == before
    # Loading again reuses the checkouts.
    marker = at_old.task.repo / "marker"
    marker.write_text("kept")
    load_swebench(path, root, checkouts=place)
    assert marker.exists()


def test_at_head_keeps_the_repository_and_says_when_it_is_not_at_base_commit(
    tmp_path: Path, repos: tuple[Path, str, str]
) -> None:
    root, old, new = repos
    path = write_jsonl(tmp_path / "set.jsonl", [entry(new), entry(old, instance_id="old")])
    at_head, stale = load_swebench(path, root, at_head=True)
    assert at_head.task.repo == stale.task.repo == (root / "acme__mathkit").resolve()
    assert (at_head.at_base_commit, stale.at_base_commit) == (True, False)
    assert not (tmp_path / "data" / "task-repos").exists()


def test_empty_and_missing_files(tmp_path: Path, repos: tuple[Path, str, str]) -> None:
    root, _, _ = repos
    with pytest.raises(ConfigError, match="no task instances"):
        load_swebench(write_jsonl(tmp_path / "empty.jsonl", []), root)
    with pytest.raises(ConfigError, match="cannot read the task set"):
        load_swebench(tmp_path / "absent.jsonl", root)


@pytest.mark.parametrize(
    ("instance_id", "slug"),
    [
        ("django__django-11099", "django__django-11099"),
        ("Pylint-Dev__pylint.5859", "pylint-dev__pylint-5859"),
        ("x" * 80, "x" * 63),
    ],
)
def test_slugify(instance_id: str, slug: str) -> None:
    assert slugify(instance_id) == slug


def test_carries_test_patch_and_reads_output_with_the_repos_swebench_parser(
    tmp_path: Path, repos: tuple[Path, str, str]
) -> None:
    root, _old, new = repos
    patch = "diff --git a/t.py b/t.py\n"
    path = write_jsonl(
        tmp_path / "set.jsonl",
        [
            entry(new, test_patch=patch),
            entry(new, instance_id="a-2", repo="acme/mathkit", test_cmd="./run", parser="pytest"),
        ],
    )
    first, second = load_swebench(path, root)
    assert (first.task.test_patch, first.task.parser) == (patch, "acme/mathkit")
    assert (second.task.test_patch, second.task.test_command, second.task.parser) == (
        None,
        "./run",
        "pytest",
    )
