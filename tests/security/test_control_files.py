"""Forged or malformed control files against the real scheduler (issue 17, finding 5).

A result.json or spec.json that is malformed, of the wrong shape, another assignment's, or a
symlink ends its own assignment as `infra_error` with the reason, and the scheduler's tick
goes on; a `patch` path written into a result is never read (export and the confidence judge
take the data root's own patch.diff). Real: Platform, SQLite state DB, Scheduler.tick.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from contracts.config import TrialConfig
from contracts.dataroot import atomic_write, open_log
from contracts.settings import PROJECT_ROOT, Settings
from orchestrator import export
from orchestrator.platform import Platform
from orchestrator.scheduler import Scheduler
from orchestrator.state import Assignment, Trial
from workers.spec import SPEC_LIMIT, AssignmentSpec

TRIAL = "tc"
AID = "tc-000"
SECRET = "host-only-secret-of-the-operator\n"
GOOD = {
    "assignment": AID,
    "started": 1.0,
    "finished": 2.0,
    "wall_s": 1.0,
    "agent": {"exit_cause": "finished", "exit_code": 0},
    "grade": {"status": "unresolved", "fail_to_pass": {}, "pass_to_pass": {}},
}


@pytest.fixture
def platform(tmp_path: Path) -> Platform:
    platform = Platform.from_settings(
        Settings(data=tmp_path / "data", configs=PROJECT_ROOT / "configs")
    )
    config = TrialConfig.model_validate(
        {
            "name": "control",
            "project": "demo",
            "budget": {"amount": "1"},
            "agents": ["builtin"],
            "model_pairs": ["tiny:thinking"],
            "assignment": {"infra_retries": 0},
            "confidence": {"enabled": False},
            "tasks": [
                {
                    "id": "mathkit",
                    "repo": str(PROJECT_ROOT / "examples" / "mathkit"),
                    "prompt": "Implement add.",
                    "test_command": "python -m pytest -q",
                    "fail_to_pass": ["tests/test_basic.py::test_add"],
                }
            ],
        }
    )
    with platform.store.session() as s:
        s.add(
            Trial(
                id=TRIAL,
                name="control",
                project="demo",
                status="running",
                config=config.model_dump(mode="json"),
            )
        )
        s.add(
            Assignment(
                id=AID,
                trial_id=TRIAL,
                index=0,
                task_id="mathkit",
                agent="builtin",
                model="tiny",
                state="running",
                machine="m1",
                attempts=1,
            )
        )
    platform.open_ledger(config, TRIAL)
    spec = AssignmentSpec(
        assignment=AID,
        project="demo",
        trial=TRIAL,
        machine="m1",
        task_id="mathkit",
        repo=config.tasks[0].repo,
        prompt="Implement add.",
        test_command="python -m pytest -q",
        fail_to_pass=[],
        pass_to_pass=[],
        timeout_s=60,
        agent="builtin",
        model="tiny",
        endpoint=platform.settings.model_url,
        env={},
        artifacts=artifacts(platform),
    )
    spec.workspace.mkdir(parents=True)
    (spec.artifacts / "spec.json").write_text(spec.model_dump_json())
    return platform


def artifacts(platform: Platform) -> Path:
    return platform.root.assignment_dir("demo", TRIAL, AID)


def ending(platform: Platform) -> Assignment:
    with platform.store.session() as s:
        a = s.get_one(Assignment, AID)
        s.expunge(a)
        return a


def tick_ends_infra_error(platform: Platform, reason: str) -> dict[str, Any]:
    Scheduler(platform).tick()  # raises nothing
    a = ending(platform)
    assert (a.state, a.status, a.exit_cause) == ("failed", "infra_error", "infra"), a.result
    result = a.result or {}
    assert reason in result["infra_error"], result["infra_error"]
    return result


@pytest.mark.parametrize(
    ("written", "reason"),
    [
        ("{not json", "result.json unreadable: ValidationError"),
        ("{}", "assignment\n  Field required"),
        ("[]", "Input should be an object"),
        # A forged pass: no agent outcome, no run behind it.
        (json.dumps({"assignment": AID, "grade": {"status": "resolved"}}), "needs `agent`"),
        (json.dumps({**GOOD, "grade": {"status": 1}}), "grade.status"),
        (json.dumps({**GOOD, "agent": {"exit_cause": "won"}}), "agent.exit_cause"),
        # A forged confidence would skip the judge; only the runner's fields are read.
        (
            json.dumps({**GOOD, "confidence": {"accepted": True, "score": 1}}),
            "Extra inputs are not permitted",
        ),
        (json.dumps({**GOOD, "assignment": "tc-999"}), "'tc-999''s, not 'tc-000''s"),
    ],
    ids=["not-json", "empty", "list", "forged-pass", "wrong-type", "bad-cause", "extra", "other"],
)
def test_a_malformed_result_is_an_infra_error(
    platform: Platform, written: str, reason: str
) -> None:
    (artifacts(platform) / "result.json").write_text(written)
    result = tick_ends_infra_error(platform, reason.replace("\n", "; "))
    assert result["infra_error"].startswith("result.json unreadable: ")
    assert "grade" not in result and "confidence" not in result


def test_a_symlinked_result_is_not_followed(platform: Platform) -> None:
    # A resolved result somewhere else (the agent's workspace, say), linked as result.json.
    forged = artifacts(platform) / "workspace" / "result.json"
    forged.write_text(json.dumps({**GOOD, "grade": {"status": "resolved"}}))
    (artifacts(platform) / "result.json").symlink_to(forged)
    result = tick_ends_infra_error(platform, "Too many levels of symbolic links")
    assert "grade" not in result


@pytest.mark.parametrize(
    ("written", "reason"),
    [
        ("{not json", "spec.json unreadable: ValidationError"),
        ("{}", "Field required"),
        ("link", "Too many levels of symbolic links"),
        # This assignment's own spec, well formed, but past what a spec may hold: cut short.
        ("oversized", "EOF while parsing"),
    ],
)
def test_a_malformed_spec_is_an_infra_error(platform: Platform, written: str, reason: str) -> None:
    spec = artifacts(platform) / "spec.json"
    if written == "link":
        real = artifacts(platform) / "workspace" / "spec.json"
        os.replace(spec, real)
        spec.symlink_to(real)
    elif written == "oversized":
        spec.write_text(json.dumps(json.loads(spec.read_text()) | {"prompt": "x" * SPEC_LIMIT}))
    else:
        spec.write_text(written)
    tick_ends_infra_error(platform, reason)


def test_a_well_formed_result_is_collected(platform: Platform) -> None:
    (artifacts(platform) / "result.json").write_text(json.dumps(GOOD))
    Scheduler(platform).tick()
    a = ending(platform)
    assert (a.state, a.status, a.exit_cause) == ("finished", "unresolved", "finished")
    assert (a.result or {})["agent"] == {"exit_cause": "finished", "exit_code": 0}


# -- the patch a result names ----------------------------------------------------------------


def test_a_forged_patch_path_is_never_read(platform: Platform, tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text(SECRET)
    patch = artifacts(platform) / "patch.diff"
    # Recorded as the runner wrote it, with a `patch` path naming a host file.
    result = {**GOOD, "grade": {"status": "resolved"}, "patch": str(secret)}
    (artifacts(platform) / "result.json").write_text(json.dumps(result))
    Scheduler(platform).tick()
    assert ending(platform).status == "resolved"

    # Export takes the data root's patch.diff: absent, or a symlink to the secret, it is empty.
    (candidate,) = export._candidates(platform.store, platform.root, TRIAL)
    assert candidate.patch == ""
    patch.symlink_to(secret)
    (candidate,) = export._candidates(platform.store, platform.root, TRIAL)
    assert candidate.patch == ""
    patch.unlink()
    patch.write_text("diff --git a/x b/x\n")
    (candidate,) = export._candidates(platform.store, platform.root, TRIAL)
    assert candidate.patch == "diff --git a/x b/x\n"

    # The judge is shown the data root's patch too: with none, an empty change, never asked
    # (a change read from the secret would have been sent to it, and found it unreachable).
    patch.unlink()
    patch.symlink_to(secret)
    with platform.store.session() as s:
        a = s.get_one(Assignment, AID)
        a.result = {**(a.result or {}), "confidence": {"pending": True, "threshold": 0.7}}
    Scheduler(platform).score_confidence(AID)
    gate = (ending(platform).result or {})["confidence"]
    assert gate["reason"].startswith("judge 0/10: empty change"), gate


# -- writing control files and logs --------------------------------------------------------


def test_no_control_file_or_log_is_written_through_a_symlink(tmp_path: Path) -> None:
    host = tmp_path / "cron.d-x"
    host.write_text(SECRET)
    folder = tmp_path / "artifacts"
    folder.mkdir()
    # A link planted at atomic_write's fixed temp name.
    (folder / "result.json.tmp").symlink_to(host)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        atomic_write(folder / "result.json", "{}")
    for name in ("tests.log", "runs.jsonl"):
        (folder / name).symlink_to(host)
        for append in (False, True):
            with pytest.raises(OSError, match="Too many levels of symbolic links"):
                open_log(folder / name, append=append)
    assert host.read_text() == SECRET
    assert not (folder / "result.json").exists()
