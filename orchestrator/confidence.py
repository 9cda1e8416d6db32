"""The confidence gate: how far a graded result can be trusted, scored with DeepEval metrics.

Two `BaseMetric`s score an assignment: `TestScoreMetric` from its SWE-bench grade, and
`SolvesTaskMetric`, a GEval-style judge (criteria, evaluation steps, a 0-10 score with its
reason) run by our own model plane through `JudgeLLM`, a `DeepEvalBaseLLM` on the
OpenAI-compatible completions endpoint, called through the metering proxy with a machine
credential of the platform (machine `judge`), so its calls are metered and budgeted like an
agent's. The judge's answer is constrained by a GBNF grammar
(llama.cpp's `grammar` field), so even a small base model always answers with a parseable
score. Their weighted mean is the confidence; below the trial's threshold a result is not
accepted and is flagged for review. When the judge cannot be reached the tests decide alone.
The scheduler runs `assess_result` on its judge thread, off its tick (`scheduler.Judges`).

DeepEval reads its settings when imported: telemetry is switched off, no `.env` is read from
the working directory, and its state folders are pointed into the data root, before the import.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from typing import Any

import httpx

from contracts.config import Confidence, TrialConfig
from contracts.results import AssignmentResult, ConfidenceGate
from contracts.settings import Settings


def _quiet_deepeval() -> None:
    """Settings DeepEval must see before its first import: nothing leaves this machine, nothing
    is read from or written into the working directory."""
    state = str(Settings().data.resolve() / "deepeval")
    os.environ["DEEPEVAL_TELEMETRY_OPT_OUT"] = "1"
    os.environ["DEEPEVAL_UPDATE_WARNING_OPT_IN"] = "0"
    os.environ["DEEPEVAL_DISABLE_DOTENV"] = "1"
    os.environ["DEEPEVAL_DISABLE_LEGACY_KEYFILE"] = "1"
    os.environ.setdefault("DEEPEVAL_CACHE_FOLDER", state)
    os.environ.setdefault("DEEPEVAL_HOME", state)
    os.environ.setdefault("DEEPEVAL_RESULTS_FOLDER", state)


_quiet_deepeval()

from deepeval.metrics import BaseMetric  # noqa: E402
from deepeval.models import DeepEvalBaseLLM  # noqa: E402
from deepeval.test_case import LLMTestCase  # noqa: E402

SCORE_GRAMMAR = r"""root ::= score "/10 because " reason "\n"
score ::= "10" | [0-9]
reason ::= [^\n]+
"""
"""The judge's answer, whatever the model: `<0-10>/10 because <reason>`."""
_VERDICT = re.compile(r"^\s*(10|[0-9])/10 because (.*)", re.DOTALL)
TASK_CHARS = 1500
PATCH_CHARS = 2500
"""What of the task and of the patch the judge sees: the tiny model's context is 2048 tokens."""


class JudgeUnavailable(Exception):
    """The judge could not be asked or gave no usable answer; the message says why."""


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int


class JudgeLLM(DeepEvalBaseLLM):
    """A model of our model plane as DeepEval's judge: plain completions, answer shaped by a
    grammar; `tokens` counts what every call used."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        timeout_s: float = 60,
        max_tokens: int = 48,
        proxy: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.proxy = proxy
        """The metering proxy's URL with the judge's credential; None: the model is called
        directly (only a test of the judge itself does so)."""
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.tokens = 0
        super().__init__(model)

    def load_model(self, *args: Any, **kwargs: Any) -> JudgeLLM:
        return self

    def get_model_name(self, *args: Any, **kwargs: Any) -> str:
        return str(self.name)

    def complete(self, prompt: str, grammar: str | None = SCORE_GRAMMAR) -> Completion:
        """One greedy completion of `prompt`; raises JudgeUnavailable on any failure."""
        body: dict[str, Any] = {
            "model": self.name,
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
        }
        if grammar is not None:
            body["grammar"] = grammar
        url = f"{self.base_url}/completions"
        try:
            # Through the metering proxy named, never one from the environment.
            resp = httpx.post(
                url, json=body, timeout=self.timeout_s, trust_env=False, proxy=self.proxy
            )
        except httpx.HTTPError as exc:
            raise JudgeUnavailable(f"{url}: {type(exc).__name__}: {exc}") from exc
        if not resp.is_success:
            raise JudgeUnavailable(f"{url}: HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            data = resp.json()
            text = str(data["choices"][0]["text"])
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise JudgeUnavailable(f"{url}: not an OpenAI completion: {resp.text[:200]}") from exc
        done = Completion(
            text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        )
        self.tokens += done.prompt_tokens + done.completion_tokens
        return done

    def generate(self, prompt: str, schema: Any = None) -> str:
        return self.complete(prompt).text

    async def a_generate(self, prompt: str, schema: Any = None) -> str:
        return await asyncio.to_thread(self.generate, prompt)


# -- metrics ---------------------------------------------------------------------------------


def grade_score(grade: dict[str, Any] | None) -> tuple[float, str]:
    """Score in [0, 1] and reason from a grade (`workers.grading.GradeReport.to_json()`):
    resolved 1, partial the passing share of FAIL_TO_PASS if no PASS_TO_PASS test broke,
    otherwise 0; no grade (an infra failure) 0."""
    if not grade:
        return 0.0, "not graded (infrastructure failure)"
    from workers.grading import PASSING

    f2p: dict[str, str] = grade.get("fail_to_pass") or {}
    p2p: dict[str, str] = grade.get("pass_to_pass") or {}
    passed = sum(s in PASSING for s in f2p.values())
    broken = sorted(t for t, s in p2p.items() if s not in PASSING)
    status = grade.get("status")
    if status == "resolved":
        return 1.0, f"resolved: {passed}/{len(f2p)} FAIL_TO_PASS pass, PASS_TO_PASS kept"
    if status == "partial" and not broken and f2p:
        return passed / len(f2p), f"partial: {passed}/{len(f2p)} FAIL_TO_PASS pass"
    if broken:
        return 0.0, f"{status}: breaks PASS_TO_PASS {', '.join(broken[:3])}"
    return 0.0, f"{status}: {passed}/{len(f2p)} FAIL_TO_PASS pass"


class TestScoreMetric(BaseMetric):
    """The SWE-bench grade as a score; the grade is `test_case.metadata["grade"]`."""

    __test__ = False  # a metric, not a pytest test class

    def __init__(self, threshold: float = 1.0) -> None:
        self.threshold: float = threshold
        self.evaluation_model = None
        self.include_reason = True

    def measure(self, test_case: LLMTestCase, *args: Any, **kwargs: Any) -> float:
        score, reason = grade_score((test_case.metadata or {}).get("grade"))
        self.score, self.reason = score, reason
        self.success = score >= self.threshold
        return score

    async def a_measure(self, test_case: LLMTestCase, *args: Any, **kwargs: Any) -> float:
        return self.measure(test_case)

    def is_successful(self) -> bool:
        return bool(self.success)

    @property
    def __name__(self) -> str:
        return "Tests"


class SolvesTaskMetric(BaseMetric):
    """GEval-style: does the change (`actual_output`, a unified diff) solve the task (`input`)?
    The judge scores 0-10 against the criteria, step by step; the score is that over 10."""

    criteria = (
        "The change makes the repository do what the task asks, without breaking what already "
        "works and without special-casing tests."
    )
    evaluation_steps = (
        "Read the task and list what it asks for.",
        "Read the change and check that each requested behaviour is implemented.",
        "Lower the score for missing parts, unrelated edits, deleted tests or hard-coded answers.",
        "An empty change scores 0.",
    )

    def __init__(self, judge: JudgeLLM, threshold: float = 0.5) -> None:
        self.judge = judge
        self.model = judge
        self.threshold: float = threshold
        self.using_native_model = False
        self.evaluation_model = judge.get_model_name()
        self.include_reason = True

    def prompt(self, task: str, patch: str) -> str:
        steps = "\n".join(f"{i}. {s}" for i, s in enumerate(self.evaluation_steps, start=1))
        return (
            "A reviewer scores a change to a code repository from 0 (does not solve the task) "
            "to 10 (solves it completely).\n\n"
            f"Criteria: {self.criteria}\n\nEvaluation steps:\n{steps}\n\n"
            f"Task:\n{_clip(task, TASK_CHARS)}\n\n"
            f"Change (unified diff):\n{_clip(patch, PATCH_CHARS) or '(empty)'}\n\n"
            "Score: "
        )

    def measure(self, test_case: LLMTestCase, *args: Any, **kwargs: Any) -> float:
        patch = test_case.actual_output or ""
        if not patch.strip():
            # Nothing to judge: no model call, and no tokens spent on it.
            self.score, self.reason, self.success = 0.0, "empty change", False
            return 0.0
        done = self.judge.complete(self.prompt(test_case.input, patch))
        self._accrue_tokens(done.prompt_tokens, done.completion_tokens)
        match = _VERDICT.match(done.text)
        if match is None:
            raise JudgeUnavailable(f"unparseable verdict {done.text[:100]!r}")
        self.score = int(match.group(1)) / 10
        self.reason = match.group(2).strip()
        self.success = self.score >= self.threshold
        return self.score

    async def a_measure(self, test_case: LLMTestCase, *args: Any, **kwargs: Any) -> float:
        return await asyncio.to_thread(self.measure, test_case)

    def is_successful(self) -> bool:
        return bool(self.success)

    @property
    def __name__(self) -> str:
        return "Solves the task"


def _clip(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "\n[… cut]"


# -- the gate --------------------------------------------------------------------------------


def judge_model(config: TrialConfig) -> str:
    """The configured judge, else the normal model of the trial's first pair."""
    return config.confidence.judge or config.model_pairs[0].split(":")[0]


def assess(
    task: str,
    patch: str,
    grade: dict[str, Any] | None,
    gate: Confidence,
    judge: JudgeLLM | None,
) -> dict[str, Any]:
    """`result.confidence`: the combined score, its parts, and whether it is accepted.
    Never raises for the judge: unreachable or unparseable, it is left out (`judge: null`)."""
    case = LLMTestCase(input=task, actual_output=patch, metadata={"grade": grade})
    tests = TestScoreMetric()
    tests.measure(case)
    judged: float | None = None
    tokens = 0
    if judge is None:
        said = "judge unavailable: none configured"
    elif grade is None:
        said = "judge not asked: nothing was graded"
    elif not gate.weights.get("judge"):
        said = "judge not asked: its weight is 0"
    else:
        metric = SolvesTaskMetric(judge)
        try:
            judged = metric.measure(case)
            said = f"judge {judged * 10:.0f}/10: {metric.reason}"
        except JudgeUnavailable as exc:
            said = f"judge unavailable: {exc}"
        tokens = (metric.input_tokens or 0) + (metric.output_tokens or 0)
    reason = f"{said}; tests: {tests.reason}"
    w_tests = gate.weights.get("tests", 0.0)
    w_judge = gate.weights.get("judge", 0.0) if judged is not None else 0.0
    if w_tests + w_judge > 0:
        score = (w_tests * (tests.score or 0.0) + w_judge * (judged or 0.0)) / (w_tests + w_judge)
    else:  # only the judge weighs, and it could not be asked: nothing vouches for the result
        score = 0.0
    score = round(score, 4)
    return {
        "score": score,
        "tests": tests.score,
        "judge": judged,
        "reason": reason,
        "judge_model": judge.get_model_name() if judge is not None else None,
        "judge_tokens": tokens,
        "accepted": score >= gate.threshold,
        "threshold": gate.threshold,
    }


def assess_result(
    config: TrialConfig,
    task_id: str,
    result: AssignmentResult,
    patch: str,
    endpoint: str,
    proxy: str | None = None,
) -> ConfidenceGate:
    """`assess` for an assignment's ending and its `patch` (`workers.result.read_patch`),
    judged by the trial's judge at `endpoint`, called through `proxy`."""
    task = next(t for t in config.tasks if t.id == task_id)
    judge = JudgeLLM(
        endpoint, judge_model(config), timeout_s=config.confidence.timeout_s, proxy=proxy
    )
    grade = result.grade.to_json() if result.grade is not None else None
    return ConfidenceGate.model_validate(
        assess(task.prompt, patch, grade, config.confidence, judge)
    )
