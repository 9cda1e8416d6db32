"""Export of accepted results as patches and as git branches, on a real git repository."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from contracts.config import TrialConfig
from contracts.settings import PROJECT_ROOT, Settings
from orchestrator.cli import app
from orchestrator.export import export_trial
from orchestrator.platform import Platform
from orchestrator.state import Assignment, Trial
from workers import workspace

ADD = ("    raise NotImplementedError", "    return a + b", "def add")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def change(ws: Path, function: str, body: str) -> None:
    """Replace the stub of `function` in mathkit/basic.py with `body`."""
    path = ws / "mathkit" / "basic.py"
    text = path.read_text()
    head, tail = text.split(f"def {function}(", 1)
    stub, rest = tail.split("raise NotImplementedError", 1)
    path.write_text(f"{head}def {function}({stub}{body}{rest}")


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Any]:
    """A source repo whose HEAD moved on past the task's base commit, the task's checkout at
    that commit, and a finished trial of four assignments."""
    source = tmp_path / "acme__mathkit"
    shutil.copytree(PROJECT_ROOT / "examples" / "mathkit", source)
    git(source, "init", "--quiet", "--initial-branch=main")
    git(source, "add", "-A")
    git(source, "commit", "--quiet", "-m", "base")
    base = git(source, "rev-parse", "HEAD")
    (source / "CHANGES").write_text("later\n")
    git(source, "add", "-A")
    git(source, "commit", "--quiet", "-m", "later")
    task_repo = workspace.checkout(source, base, tmp_path / "task-repos" / "acme__mathkit" / base)

    patches = {}
    for aid, function, body in (
        ("tr1-000", "add", "return a + b"),
        ("tr1-001", "is_even", "return n % 2 == 0"),
    ):
        ws = tmp_path / "ws" / aid
        workspace.prepare(task_repo, ws)
        change(ws, function, body)
        patches[aid] = workspace.patch(ws)

    settings = Settings(data=tmp_path / "data", configs=PROJECT_ROOT / "configs")
    platform = Platform.from_settings(settings)
    # Where the runners left them: each assignment's patch.diff in the data root.
    for aid, diff in {**patches, "tr1-002": ""}.items():
        folder = platform.root.assignment_dir("demo", "tr1", aid)
        folder.mkdir(parents=True)
        (folder / "patch.diff").write_text(diff)
    config = TrialConfig.model_validate(
        {
            "name": "export",
            "project": "demo",
            "budget": {"amount": "1"},
            "agents": ["builtin"],
            "model_pairs": ["tiny"],
            "tasks": [
                {
                    "id": "acme-1",
                    "repo": str(task_repo),
                    "prompt": "add() raises",
                    "test_command": "python -m pytest -q",
                    "fail_to_pass": ["tests/test_basic.py::test_add"],
                }
            ],
        }
    )

    def gate(accepted: bool) -> dict[str, Any]:
        return {"score": 0.9 if accepted else 0.2, "accepted": accepted, "threshold": 0.7}

    rows = [
        ("finished", "resolved", {"confidence": gate(True)}),
        ("finished", "partial", {"confidence": gate(False)}),
        # Scored before the gate existed: resolved counts as accepted; an empty patch is skipped.
        ("finished", "resolved", {}),
        ("failed", None, {"infra_error": "boom"}),
    ]
    with platform.store.session() as s:
        s.add(
            Trial(
                id="tr1",
                name="export",
                project="demo",
                status="finished",
                config=config.model_dump(mode="json"),
            )
        )
        for i, (state, status, result) in enumerate(rows):
            s.add(
                Assignment(
                    id=f"tr1-{i:03d}",
                    trial_id="tr1",
                    index=i,
                    task_id="acme-1",
                    agent="builtin",
                    model="tiny",
                    state=state,
                    status=status,
                    result=result,
                )
            )
    return {
        "platform": platform,
        "settings": settings,
        "source": source,
        "base": base,
        "task_repo": task_repo,
    }


def test_accepted_results_export_as_patches_that_apply(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = export_trial(setup["platform"].store, setup["platform"].root, "tr1", out)
    assert [(e.assignment, e.outcome) for e in done] == [
        ("tr1-000", "patch"),
        ("tr1-002", "skipped"),
    ]
    assert done[1].detail == "empty patch"
    patch = out / "tr1-000.patch"
    assert "+    return a + b" in patch.read_text()
    git(setup["task_repo"], "apply", "--check", str(patch))
    assert (out / "export.json").exists()
    # --all adds those flagged for review.
    everything = export_trial(
        setup["platform"].store, setup["platform"].root, "tr1", out, include_review=True
    )
    assert [e.assignment for e in everything if e.outcome == "patch"] == ["tr1-000", "tr1-001"]
    assert [e.accepted for e in everything if e.outcome == "patch"] == [True, False]
    git(setup["task_repo"], "apply", "--check", str(out / "tr1-001.patch"))


def test_accepted_results_export_as_branches_at_the_base_commit(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    source: Path = setup["source"]
    before = (git(source, "rev-parse", "HEAD"), git(source, "status", "--porcelain"))
    done = export_trial(
        setup["platform"].store,
        setup["platform"].root,
        "tr1",
        tmp_path / "out",
        branch="autovibe",
        repo=source,
    )
    assert [(e.outcome, e.detail) for e in done if e.outcome == "branch"] == [
        ("branch", "autovibe/tr1-000")
    ]
    assert git(source, "rev-parse", "autovibe/tr1-000^") == setup["base"]
    assert "return a + b" in git(source, "show", "autovibe/tr1-000:mathkit/basic.py")
    message = git(source, "log", "-1", "--format=%B", "autovibe/tr1-000")
    assert "tr1-000" in message and "Trial: tr1" in message
    # The repository's HEAD, index and working tree are untouched.
    assert (git(source, "rev-parse", "HEAD"), git(source, "status", "--porcelain")) == before
    # Exporting again finds the same change there; another change under that name is refused.
    again = export_trial(
        setup["platform"].store,
        setup["platform"].root,
        "tr1",
        tmp_path / "out",
        branch="autovibe",
        repo=source,
    )
    assert [e.outcome for e in again if e.assignment == "tr1-000"] == ["patch", "branch"]
    git(source, "branch", "-f", "autovibe/tr1-000", "main")
    refused = export_trial(
        setup["platform"].store,
        setup["platform"].root,
        "tr1",
        tmp_path / "out",
        branch="autovibe",
        repo=source,
    )
    skipped = [e for e in refused if e.assignment == "tr1-000" and e.outcome == "skipped"]
    assert "exists" in skipped[0].detail


def test_cli_export(setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOVIBE_DATA", str(setup["settings"].data))
    runner = CliRunner()
    out = tmp_path / "cli-out"
    branches = ["--branch", "av", "--repo", str(setup["source"])]
    result = runner.invoke(app, ["trial", "export", "tr1", "--out", str(out), "--all", *branches])
    # tr1-002's empty patch is skipped: reported, and the exit status says so.
    assert result.exit_code == 1, result.output
    assert "tr1-001 acme-1: branch av/tr1-001" in result.output
    assert sorted(p.name for p in out.glob("*.patch")) == ["tr1-000.patch", "tr1-001.patch"]
    alone = runner.invoke(app, ["trial", "export", "tr1", "--out", str(out), "--branch", "x"])
    assert alone.exit_code == 2
    missing = runner.invoke(app, ["trial", "export", "nope", "--out", str(out)])
    assert missing.exit_code == 2 and "no trial nope" in missing.output
