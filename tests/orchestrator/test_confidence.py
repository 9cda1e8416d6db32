"""The confidence gate against the real llama.cpp server (tiny model) as its judge; and the
scheduler's judge thread against a stand-in judge that answers when the test lets it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from budget import ScopeState
from budget.scopes import JUDGE_MACHINE, machine_scope
from contracts.config import Confidence, TrialConfig
from contracts.reports import TrialHead
from contracts.results import RunnerResult
from contracts.settings import PROJECT_ROOT, Settings, free_port
from orchestrator import stack

# Through orchestrator.confidence: imported bare, DeepEval would write `.deepeval/` here and
# run with telemetry on.
from orchestrator.confidence import (
    SCORE_GRAMMAR,
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
from workers.spec import AssignmentSpec

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


@pytest.mark.model
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


def _result(platform: Platform, aid: str, grade: dict[str, Any], diff: str) -> RunnerResult:
    """What a runner leaves: its patch.diff in the assignment's folder, and its result."""
    patch = platform.root.assignment_dir("demo", "tg", aid) / "patch.diff"
    patch.parent.mkdir(parents=True, exist_ok=True)
    patch.write_text(diff)
    return RunnerResult.model_validate(
        {
            "assignment": aid,
            "wall_s": 1.0,
            "agent": {"exit_cause": "finished"},
            "grade": grade,
            "patch": str(patch),
        }
    )


@contextlib.contextmanager
def proxied(settings: Settings) -> Iterator[Platform]:
    """A platform on `settings` with its metering proxy running (`autovibe up --only proxy`):
    the scheduler's judge calls the model plane through it, as machine `judge`."""
    stack.up(settings, ["proxy"])
    try:
        yield Platform.from_settings(settings)
    finally:
        stack.down(settings, ["proxy"])


def judge_spend(platform: Platform, project: str) -> ScopeState:
    """The judge machine's budget scope: what its calls through the proxy were charged."""
    store = platform.counters()
    try:
        state = store.describe(machine_scope(project, JUDGE_MACHINE))
    finally:
        store.close()
    assert state is not None
    return state


@pytest.mark.model
def test_finish_scores_stores_and_flags(model: Settings, tmp_path: Path) -> None:
    settings = Settings(
        data=tmp_path / "data", configs=PROJECT_ROOT / "configs", model_port=model.model_port,
        proxy_port=free_port(),
    )  # fmt: skip
    with proxied(settings) as platform:
        _finish_scores_stores_and_flags(platform)


def _finish_scores_stores_and_flags(platform: Platform) -> None:
    trial_id, config = _trial(platform, PROJECT_ROOT / "examples" / "mathkit")
    platform.open_ledger(config, trial_id)  # as submission does
    assert judge_model(config) == "tiny"  # the normal model of the first pair
    scheduler = Scheduler(platform)
    scheduler.finish("tg-000", _result(platform, "tg-000", RESOLVED, PATCH).kept())
    scheduler.finish("tg-001", _result(platform, "tg-001", UNRESOLVED, "").kept())
    assert scheduler.judges.wait(2 * SLOW_S)  # scored on the scheduler's judge thread
    scheduler.stop()
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
    head = TrialHead(
        id=trial_id,
        name="gate",
        project="p",
        status="finished",
        currency="CAD",
        created_at="2025-03-01T10:00:00Z",
        finished_at=None,
    )
    report = summarize(head, records, lambda d: d)
    (row,) = report.rows
    assert (row.accepted, row.needs_review) == (1, 1)
    assert [r.assignment for r in report.needs_review] == ["tg-001"]


# -- the judge off the scheduler's tick ----------------------------------------------------


class HeldJudge:
    """Stand-in for the judge's OpenAI completions endpoint (the judge is an external LLM): it
    checks each request is the documented completion call with our grammar, and answers
    `8/10 because …` only once the test sets `release`."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.asked = threading.Event()
        self.requests: list[dict[str, Any]] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append(body)
                judge.asked.set()
                ok = self.path == "/v1/completions" and {
                    k: body.get(k) for k in ("model", "max_tokens", "temperature", "grammar")
                } == {"model": "tiny", "max_tokens": 48, "temperature": 0, "grammar": SCORE_GRAMMAR}
                judge.release.wait(60)
                answer: dict[str, Any] = {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": "tiny",
                    "choices": [
                        {
                            "text": "8/10 because it returns a + b\n",
                            "index": 0,
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 200, "completion_tokens": 9, "total_tokens": 209},
                }
                data = json.dumps(answer if ok else {"error": f"unexpected {self.path}"}).encode()
                self.send_response(200 if ok else 400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def held_judge() -> Iterator[HeldJudge]:
    judge = HeldJudge()
    try:
        yield judge
    finally:
        judge.close()


@pytest.fixture
def judged(held_judge: HeldJudge, tmp_path: Path) -> Iterator[Platform]:
    """A platform whose judge is `held_judge`, reached through the platform's proxy."""
    settings = Settings(
        data=tmp_path / "data", configs=PROJECT_ROOT / "configs", model_port=held_judge.port,
        proxy_port=free_port(),
    )  # fmt: skip
    with proxied(settings) as platform:
        yield platform


def _runner_wrote(platform: Platform, config: TrialConfig, aid: str) -> AssignmentSpec:
    """The spec.json a launched runner's folder holds (the scheduler follows it)."""
    task = config.tasks[0]
    spec = AssignmentSpec(
        assignment=aid,
        project="demo",
        trial="tg",
        machine="m1",
        task_id=task.id,
        repo=task.repo,
        prompt=task.prompt,
        test_command=task.test_command,
        fail_to_pass=task.fail_to_pass,
        pass_to_pass=task.pass_to_pass,
        timeout_s=task.timeout_s,
        agent="builtin",
        model="tiny",
        endpoint=platform.settings.model_url,
        env={},
        artifacts=platform.root.assignment_dir("demo", "tg", aid),
    )
    spec.artifacts.mkdir(parents=True, exist_ok=True)
    (spec.artifacts / "spec.json").write_text(spec.model_dump_json())
    return spec


def _state(platform: Platform) -> tuple[str, dict[str, tuple[str, Any]]]:
    with platform.store.session() as s:
        trial = s.get_one(Trial, "tg")
        return trial.status, {
            a.id: (a.state, (a.result or {}).get("confidence")) for a in trial.assignments
        }


def _kinds(platform: Platform) -> list[tuple[str, dict[str, Any]]]:
    return [(e.kind, e.data) for e in platform.store.events_after("tg", 0)]


def test_a_slow_judge_holds_up_no_collection(held_judge: HeldJudge, judged: Platform) -> None:
    platform = judged
    _, config = _trial(platform, PROJECT_ROOT / "examples" / "mathkit")
    platform.open_ledger(config, "tg")
    first, second = (_runner_wrote(platform, config, f"tg-00{i}") for i in range(2))
    first.result_path.write_text(_result(platform, "tg-000", RESOLVED, PATCH).model_dump_json())
    scheduler = Scheduler(platform)
    # The second runner is still at work: it holds its lock.
    with second.lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        scheduler.tick()
        status, seen = _state(platform)
        assert seen["tg-000"] == (
            "finished",
            {"pending": True, "score": None, "accepted": None, "threshold": 0.7},
        )
        assert held_judge.asked.wait(60), "the judge was never asked"
    # The judge holds its answer; meanwhile the second runner ends and is collected.
    second.result_path.write_text(_result(platform, "tg-001", UNRESOLVED, "").model_dump_json())
    started = time.monotonic()
    scheduler.tick()
    assert time.monotonic() - started < 10
    scheduler.tick()
    status, seen = _state(platform)
    assert not held_judge.release.is_set()
    assert seen["tg-001"][0] == "finished"
    assert seen["tg-000"][1]["pending"]
    assert status == "running"  # every assignment ended, not every score is in
    ended = [d for k, d in _kinds(platform) if k == "assignment_finished"]
    assert [(d["assignment"], d["confidence"]) for d in ended] == [
        ("tg-000", "pending"),
        ("tg-001", "pending"),
    ]

    held_judge.release.set()
    assert scheduler.judges.wait(60)
    scheduler.tick()
    scheduler.stop()
    status, seen = _state(platform)
    assert status == "finished"
    good, bad = seen["tg-000"][1], seen["tg-001"][1]
    assert (good["judge"], good["score"], good["accepted"]) == (0.8, 0.94, True)
    assert (good["judge_tokens"], good["reason"]) == (
        209,
        "judge 8/10: it returns a + b; tests: resolved: 1/1 FAIL_TO_PASS pass, PASS_TO_PASS kept",
    )
    assert (bad["score"], bad["accepted"]) == (0.0, False)  # an empty change: no judge call
    assert len(held_judge.requests) == 1 and TASK in held_judge.requests[0]["prompt"]
    kinds = _kinds(platform)
    assert [d["assignment"] for k, d in kinds if k == "needs_review"] == ["tg-001"]
    order = [k for k, _ in kinds if k in ("confidence_scored", "trial_finished")]
    assert order == ["confidence_scored", "confidence_scored", "trial_finished"]


@pytest.mark.parametrize("status", ["running", "cancelled"])
def test_scores_left_pending_are_scored_after_a_restart(
    held_judge: HeldJudge, judged: Platform, status: str
) -> None:
    platform = judged
    _, config = _trial(platform, PROJECT_ROOT / "examples" / "mathkit")
    platform.open_ledger(config, "tg")
    held_judge.release.set()
    before = Scheduler(platform)
    before.stop()  # as if stopped (or killed) with the endings recorded, the scores not yet
    before.finish("tg-000", _result(platform, "tg-000", RESOLVED, PATCH).kept())
    before.finish("tg-001", _result(platform, "tg-001", UNRESOLVED, "").kept())
    with platform.store.session() as s:
        s.get_one(Trial, "tg").status = status
    assert {gate["pending"] for _, gate in _state(platform)[1].values()} == {True}
    assert held_judge.requests == []

    after = Scheduler(Platform.from_settings(platform.settings))
    after.tick()
    assert after.judges.wait(60)
    after.tick()
    after.stop()
    trial_status, seen = _state(platform)
    assert trial_status == {"running": "finished", "cancelled": "cancelled"}[status]
    assert seen["tg-000"][1]["score"] == 0.94 and seen["tg-001"][1]["accepted"] is False
    assert len(held_judge.requests) == 1
    scored = [d["assignment"] for k, d in _kinds(platform) if k == "confidence_scored"]
    assert sorted(scored) == ["tg-000", "tg-001"]
    # The judge called through the proxy: its 200 + 9 tokens of `tiny` charged to its machine.
    spent = judge_spend(platform, "demo").spent
    assert spent > 0, spent
