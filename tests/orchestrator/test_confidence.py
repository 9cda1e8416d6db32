"""The confidence gate against the real llama.cpp server (tiny model) as its judge."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from contracts.config import Confidence, TrialConfig
from contracts.settings import PROJECT_ROOT, Settings, free_port
from orchestrator import stack

# Through orchestrator.confidence: imported bare, DeepEval would write `.deepeval/` here and
# run with telemetry on.
from orchestrator.confidence import (
    JudgeLLM,
    LLMTestCase,
    SolvesTaskMetric,
    TestScoreMetric,
    assess,
    grade_score,
    judge_model,
)
from orchestrator.platform import Platform
from orchestrator.report import RunRecord, summarize
from orchestrator.scheduler import Scheduler
from orchestrator.state import Assignment, Event, Trial

TASK = "Implement add(a, b) in mathkit/basic.py: it returns the sum of a and b."
PATCH = (
    "diff --git a/mathkit/basic.py b/mathkit/basic.py\n"
    "--- a/mathkit/basic.py\n+++ b/mathkit/basic.py\n"
    "@@ -1,3 +1,3 @@\n def add(a, b):\n-    raise NotImplementedError\n+    return a + b\n"
)
RESOLVED = {
    "status": "resolved",
    "fail_to_pass": {"tests/test_basic.py::test_add": "PASSED"},
    "pass_to_pass": {"tests/test_basic.py::test_subtract": "PASSED"},
}
SLOW_S = 300
"""Judge timeout in these tests: warm, the tiny model answers in 1-2 s, but on a shared,
oversubscribed CI machine one call has taken a minute."""
UNRESOLVED = {
    "status": "unresolved",
    "fail_to_pass": {"tests/test_basic.py::test_add": "FAILED"},
    "pass_to_pass": {"tests/test_basic.py::test_subtract": "PASSED"},
}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """The platform's own llama.cpp server (`autovibe up --only model`) on free ports."""
    settings = Settings(
        data=tmp_path_factory.mktemp("judge-data"),
        configs=PROJECT_ROOT / "configs",
        model_port=free_port(),
        api_port=free_port(),
        proxy_port=free_port(),
    )
    stack.up(settings, ["model"])
    try:
        # The first request loads the model: not what a warm judge costs.
        JudgeLLM(settings.model_url, "tiny", timeout_s=300, max_tokens=1).complete("Hi", None)
        yield settings
    finally:
        stack.down(settings)


def test_grade_scores() -> None:
    assert grade_score(RESOLVED)[0] == 1.0
    assert grade_score(UNRESOLVED)[0] == 0.0
    assert grade_score(None) == (0.0, "not graded (infrastructure failure)")
    partial = {
        "status": "partial",
        "fail_to_pass": {"a": "PASSED", "b": "FAILED", "c": "XFAIL", "d": "MISSING"},
        "pass_to_pass": {"e": "PASSED"},
    }
    assert grade_score(partial) == (0.5, "partial: 2/4 FAIL_TO_PASS pass")
    broken = {**partial, "pass_to_pass": {"e": "FAILED"}}
    assert grade_score(broken) == (0.0, "partial: breaks PASS_TO_PASS e")
    metric = TestScoreMetric()
    assert metric.measure(LLMTestCase(input="t", metadata={"grade": RESOLVED})) == 1.0
    assert metric.is_successful()


def test_the_local_judge_scores_a_change(model: Settings) -> None:
    judge = JudgeLLM(model.model_url, "tiny", timeout_s=SLOW_S)
    metric = SolvesTaskMetric(judge)
    score = metric.measure(LLMTestCase(input=TASK, actual_output=PATCH))
    assert 0.0 <= score <= 1.0
    assert score * 10 == int(score * 10)  # the grammar allows whole 0-10 scores only
    assert metric.reason
    assert metric.evaluation_model == "tiny"
    assert metric.input_tokens and metric.input_tokens > 100
    assert metric.output_tokens and metric.output_tokens > 0
    assert judge.tokens == metric.input_tokens + metric.output_tokens
    # Nothing to judge: no call.
    empty = SolvesTaskMetric(judge)
    assert empty.measure(LLMTestCase(input=TASK, actual_output="")) == 0.0
    assert judge.tokens == metric.input_tokens + metric.output_tokens


def test_gate_flags_what_the_weights_put_below_the_threshold() -> None:
    # No call reaches this judge: an empty change and a weight of 0 are settled without it.
    judge = JudgeLLM(f"http://127.0.0.1:{free_port()}/v1", "tiny")
    gate = Confidence()  # tests 0.7 / judge 0.3, threshold 0.7
    # An empty change is judged 0 without asking the model.
    unresolved = assess(TASK, "", UNRESOLVED, gate, judge)
    assert (unresolved["tests"], unresolved["judge"], unresolved["score"]) == (0.0, 0.0, 0.0)
    assert unresolved["accepted"] is False and unresolved["threshold"] == 0.7
    # Weights that trust only the tests decide alone; the judge is not even asked.
    only_tests = Confidence(weights={"tests": 1.0, "judge": 0.0}, threshold=1.0)
    scored = assess(TASK, PATCH, RESOLVED, only_tests, judge)
    assert (scored["score"], scored["accepted"], scored["judge_tokens"]) == (1.0, True, 0)
    assert judge.tokens == 0
    # Only the judge weighs, and it is out of reach: nothing vouches for the result.
    down = JudgeLLM(f"http://127.0.0.1:{free_port()}/v1", "tiny", timeout_s=5)
    only_judge = Confidence(weights={"judge": 1.0})
    assert assess(TASK, PATCH, RESOLVED, only_judge, down)["accepted"] is False


def test_judge_down_leaves_the_tests_to_decide() -> None:
    judge = JudgeLLM(f"http://127.0.0.1:{free_port()}/v1", "tiny", timeout_s=5)
    scored = assess(TASK, PATCH, RESOLVED, Confidence(), judge)
    assert scored["judge"] is None
    assert scored["reason"].startswith("judge unavailable: ")
    assert (scored["score"], scored["accepted"], scored["judge_tokens"]) == (1.0, True, 0)
    assert assess(TASK, PATCH, UNRESOLVED, Confidence(), judge)["accepted"] is False


# -- in the scheduler's finish path, and in the report -------------------------------------


def _trial(platform: Platform, repo: Path) -> tuple[str, TrialConfig]:
    config = TrialConfig.model_validate(
        {
            "name": "gate",
            "project": "demo",
            "budget": {"amount": "1"},
            "agents": ["builtin"],
            "model_pairs": ["tiny:thinking"],
            "confidence": {"timeout_s": SLOW_S},
            "tasks": [
                {
                    "id": "mathkit",
                    "repo": str(repo),
                    "prompt": TASK,
                    "test_command": "python -m pytest -q",
                    "fail_to_pass": ["tests/test_basic.py::test_add"],
                }
            ],
        }
    )
    with platform.store.session() as s:
        s.add(
            Trial(
                id="tg",
                name="gate",
                project="demo",
                status="running",
                config=config.model_dump(mode="json"),
            )
        )
        for i in range(2):
            s.add(
                Assignment(
                    id=f"tg-{i:03d}",
                    trial_id="tg",
                    index=i,
                    task_id="mathkit",
                    agent="builtin",
                    model="tiny",
                    state="running",
                    machine="m1",
                )
            )
    return "tg", config


def _result(tmp: Path, aid: str, grade: dict[str, Any], diff: str) -> dict[str, Any]:
    patch = tmp / f"{aid}.diff"
    patch.write_text(diff)
    return {
        "assignment": aid,
        "wall_s": 1.0,
        "agent": {"exit_cause": "finished"},
        "grade": grade,
        "patch": str(patch),
    }


def test_finish_scores_stores_and_flags(model: Settings, tmp_path: Path) -> None:
    platform = Platform.from_settings(
        Settings(
            data=tmp_path / "data", configs=PROJECT_ROOT / "configs", model_port=model.model_port
        )
    )
    trial_id, config = _trial(platform, PROJECT_ROOT / "examples" / "mathkit")
    platform.open_ledger(config, trial_id)  # as submission does
    assert judge_model(config) == "tiny"  # the normal model of the first pair
    scheduler = Scheduler(platform)
    scheduler.finish("tg-000", _result(tmp_path, "tg-000", RESOLVED, PATCH))
    scheduler.finish("tg-001", _result(tmp_path, "tg-001", UNRESOLVED, ""))
    with platform.store.session() as s:
        good, bad = (s.get_one(Assignment, f"tg-00{i}").result or {} for i in range(2))
        events = [
            (e.kind, e.data) for e in s.scalars(select(Event).where(Event.trial_id == trial_id))
        ]
    assert set(good["confidence"]) == {
        "score",
        "tests",
        "judge",
        "reason",
        "judge_model",
        "judge_tokens",
        "accepted",
        "threshold",
    }
    gate = good["confidence"]
    assert gate["judge"] is not None and 0 <= gate["judge"] <= 1
    assert gate["score"] == pytest.approx(0.7 + 0.3 * gate["judge"], abs=1e-4)
    assert gate["accepted"] is True and gate["judge_tokens"] > 0
    assert gate["judge_model"] == "tiny" and gate["reason"].startswith("judge ")
    assert bad["confidence"]["accepted"] is False
    flagged = [d for k, d in events if k == "needs_review"]
    assert [d["assignment"] for d in flagged] == ["tg-001"]
    assert flagged[0]["threshold"] == 0.7

    records = [
        RunRecord(
            "tg-000",
            "mathkit",
            "builtin",
            "tiny",
            "finished",
            "resolved",
            "finished",
            1.0,
            confidence=good["confidence"]["score"],
            accepted=True,
        ),
        RunRecord(
            "tg-001",
            "mathkit",
            "builtin",
            "tiny",
            "finished",
            "unresolved",
            "finished",
            1.0,
            confidence=bad["confidence"]["score"],
            accepted=False,
        ),
    ]
    report = summarize({"id": trial_id, "name": "gate", "currency": "CAD"}, records, lambda d: d)
    (row,) = report["rows"]
    assert (row["accepted"], row["needs_review"]) == (1, 1)
    assert [r["assignment"] for r in report["needs_review"]] == ["tg-001"]
