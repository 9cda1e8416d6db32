"""An assignment's ending as a typed record: what a runner writes, what the orchestrator keeps.

A runner writes a `RunnerResult` as `result.json` (`workers.runner`): a run that ended (its
agent outcome, its grade, where its patch and report are) or its own failure (`infra_error`).
The scheduler reads it back as untrusted (`workers.result.read_result`) and keeps it in the
state DB as an `AssignmentResult`: the same fields plus those only the orchestrator sets (the
spend, the confidence gate, a deferral, a cancel, why an ending was the platform's fault).
Every reader (scheduler, report, API, export, bandit) takes the model, never the dict.
Stored rows of older versions still read: every field the orchestrator adds has a default.

Beside it in the assignment's folder: the runner's `report.json` (`SwebenchReport`), and the
`spec.json` the orchestrator wrote, which other planes read as `SpecLabels`.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

ExitCause = Literal["finished", "timeout", "crashed", "budget_exhausted", "model_unreachable"]
"""How an agent's run ended. `model_unreachable`: the model plane failed the agent (5xx, no
connection, credential refused), an infrastructure failure the scheduler retries and never
scores as the agent's."""

GradeStatus = Literal["resolved", "partial", "unresolved"]

Ending = Literal["finished", "infra_error", "cancelled", "deferred"]

InfraCause = Literal["model_unreachable", "infra"]
"""Why an ending was the platform's failure: the model plane failed the agent's calls, or the
runner died, could not start or failed outside the agent."""


class AgentResult(BaseModel):
    """`AgentOutcome.to_json()`: what the orchestrator reads of it is typed, the rest is kept."""

    model_config = ConfigDict(extra="allow")
    exit_cause: ExitCause
    exit_code: int | None = None
    detail: str = ""


class GradeResult(BaseModel):
    """`GradeReport.to_json()`: what the orchestrator reads of it is typed, the rest is kept."""

    model_config = ConfigDict(extra="allow")
    status: GradeStatus
    fail_to_pass: dict[str, str] = {}
    pass_to_pass: dict[str, str] = {}
    tests_tampered: bool = False
    tampered_files: list[str] = []
    """Test files the agent changed, added or removed (restored before grading)."""

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


class ConfidenceGate(BaseModel):
    """`result.confidence`: the judge's verdict (`orchestrator.confidence.assess`), or its
    placeholder while the judge has not scored the ending yet (`pending`)."""

    model_config = ConfigDict(extra="allow")
    pending: bool = False
    score: float | None = None
    accepted: bool | None = None
    """False: below the threshold, flagged for review; None: not scored yet."""
    threshold: float | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


class _RunFields(BaseModel):
    """What a runner knows of its run; both models below carry these fields."""

    assignment: str = ""
    started: float | None = None
    finished: float | None = None
    wall_s: float | None = None
    agent: AgentResult | None = None
    grade: GradeResult | None = None
    patch: str | None = None
    """Where the runner wrote the patch; informative only: readers take the data root's
    `patch.diff` of the assignment, never a path from this record."""
    report: str | None = None
    """Where the runner wrote the SWE-bench report (`report.json`)."""
    phases: dict[str, float] = {}
    """When each step of the run ended, epoch seconds: `workspace` (copied, baseline taken),
    `agent_start` (sandbox set up, agent about to start), `agent_end` (its group gone),
    `patch` (patch taken, tests restored), `graded` (tests run); `bench.harness` reads them."""
    infra_error: str | None = None


class RunnerResult(_RunFields):
    """One runner's `result.json`: `agent` and `grade`, or `infra_error`; nothing else."""

    model_config = ConfigDict(extra="forbid")
    assignment: str

    @model_validator(mode="after")
    def _one_shape(self) -> RunnerResult:
        if self.infra_error is None and (self.agent is None or self.grade is None):
            raise ValueError("a result needs `agent` and `grade`, or `infra_error`")
        return self

    def to_json(self) -> dict[str, Any]:
        """The fields the runner wrote, as `result.json` holds them."""
        return self.model_dump(mode="json", exclude_unset=True)

    def kept(self) -> AssignmentResult:
        """This ending as the orchestrator keeps it."""
        return AssignmentResult.model_validate(self.to_json())


class AssignmentResult(_RunFields):
    """An assignment's ending as the state DB keeps it (`Assignment.ending`)."""

    # Kept, not refused: a stored row of a later version still reads and round-trips.
    model_config = ConfigDict(extra="allow")
    infra_cause: InfraCause | None = None
    cancelled: bool = False
    """Cancelled by the operator: the orchestrator's own decision, never a runner's."""
    cost: Decimal | None = None
    """The assignment's metered spend in `currency`, posted once when it ended."""
    currency: str | None = None
    confidence: ConfidenceGate | None = None
    deferred_until: str | None = None
    """A deferred ending's restart time (ISO 8601 UTC): its machine allowance's reset."""

    @classmethod
    def infra(cls, assignment: str, detail: str) -> AssignmentResult:
        """An ending the runner never wrote: it could not start, died, or left no readable
        control file."""
        return cls(assignment=assignment, infra_error=detail)

    @classmethod
    def stored(cls, data: dict[str, Any] | None) -> AssignmentResult:
        """A state DB row's `result` (None: no ending yet, read as an empty record)."""
        return cls.model_validate(data or {})

    @property
    def kind(self) -> Ending:
        if self.cancelled:
            return "cancelled"
        if self.infra_error is not None:
            return "infra_error"
        if self.deferred_until is not None:
            return "deferred"
        return "finished"

    @property
    def confidence_pending(self) -> bool:
        """Whether this ending waits for the judge's score."""
        return self.confidence is not None and self.confidence.pending

    def to_json(self) -> dict[str, Any]:
        """The fields that were set, as the state DB stores them."""
        return self.model_dump(mode="json", exclude_unset=True)


class TestLists(BaseModel):
    """SWE-bench's lists of one family of tests: SKIPPED and MISSING tests are failures."""

    __test__ = False  # not a pytest test class
    success: list[str]
    failure: list[str]


class TestsStatus(BaseModel):
    """SWE-bench's `tests_status`, named as SWE-bench names it."""

    __test__ = False
    FAIL_TO_PASS: TestLists
    PASS_TO_PASS: TestLists


class SwebenchReport(BaseModel):
    """An assignment's `report.json`, shaped like SWE-bench's per-instance report: written by
    the runner on every ending but a cancel (`workers.grading.swebench_report`)."""

    instance_id: str
    assignment: str
    patch_exists: bool
    patch_successfully_applied: bool
    """False: the run never reached its tests (an infra failure)."""
    resolved: bool
    status: GradeStatus | Literal["error"]
    """The grade; `error` when the run never reached its tests."""
    tests_status: TestsStatus
    tests_timed_out: bool
    # Reports written before tampering was detected still read.
    tests_tampered: bool = False
    tampered_files: list[str] = []
    infra_failure: bool
    infra_error: str | None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class SpecLabels(BaseModel):
    """What planes other than the workers read of an assignment's `spec.json` (written by the
    orchestrator as `workers.spec.AssignmentSpec`): who ran what, where. Any may be missing
    from a folder another tool made; the reader says what stands in."""

    project: str | None = None
    trial: str | None = None
    assignment: str | None = None
    task_id: str | None = None
    agent: str | None = None
    model: str | None = None
