"""The trial report as a typed record: what `orchestrator.report.build` makes, once, and every
output takes (the terminal table, CSV, Markdown, the charts, the JSON file and the API).

Its JSON is the report's documented shape (`GET /v1/trials/{id}/report`, `report-<id>.json`):
money as decimal strings, rates rounded to four places, one row per agent × model pair, per
agent and per model pair. A report from an older server still reads: the fields added since
have defaults.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal, get_args

from pydantic import BaseModel

ErrorCause = Literal[
    "timeout", "budget_exhausted", "crashed", "model_unreachable", "infra", "cancelled"
]
"""`Assignment.exit_cause` values that are not a normal ending (`finished`)."""
ERROR_CAUSES: tuple[ErrorCause, ...] = get_args(ErrorCause)


class _Json(BaseModel):
    def to_json(self) -> dict[str, Any]:
        """The record as JSON: decimals as strings, tuples as lists."""
        return self.model_dump(mode="json")


class LocalShare(_Json):
    """Tokens served by the local model plane (provider `local`), not a cloud API."""

    local_tokens: int = 0
    local_share: float | None = None
    """Their share of all metered tokens; None when nothing was metered."""
    target: float = 0.85
    """The share local-first routing aims at (the seed's 85 %)."""


class ArmStats(_Json):
    """What a group of assignments did: counts, success with its interval, spend, time."""

    assignments: int
    n: int
    """Scored runs (graded): the denominator of the success rate."""
    resolved: int
    partial: int
    unresolved: int
    pending: int
    """Queued, deferred or running."""
    deferred: int
    errors: int
    """Failed or cancelled without a grade."""
    error_causes: dict[ErrorCause, int]
    infra_errors: int = 0
    tests_tampered: int = 0
    failed_calls: int = 0
    """Calls through the proxy that the model plane or the proxy failed (5xx, no response)."""
    accepted: int = 0
    """Accepted by the confidence gate."""
    needs_review: int = 0
    """Flagged by the confidence gate for a person to look at."""
    success_rate: float | None
    """resolved / n; None when nothing was scored."""
    success_ci95: tuple[float, float]
    """Wilson's 95 % interval of the success rate; (0, 1) when nothing was scored."""
    llm_calls: int
    tokens: int
    local_tokens: int = 0
    local_share: float | None = None
    cost: Decimal
    """Metered spend in the trial's currency."""
    cost_usd: Decimal
    cost_per_resolved: Decimal | None
    """In the trial's currency; None when nothing was resolved."""
    wall_s_median: float | None
    wall_s_p50: float | None
    wall_s_p90: float | None
    wall_s_total: float


# The name comes first in the JSON: pydantic lays out the fields of the last base first.
class _Agent(BaseModel):
    agent: str


class _ModelPair(BaseModel):
    model: str


class _Arm(_ModelPair, _Agent):
    pass


class ArmRow(ArmStats, _Arm):
    """One agent × model pair."""


class AgentRow(ArmStats, _Agent):
    """One agent, over every model pair."""


class ModelPairRow(ArmStats, _ModelPair):
    """One model pair, over every agent."""


class Comparison(_Json):
    """Two arms' success rates compared by Fisher's exact test (`orchestrator.stats`)."""

    a: str
    b: str
    a_resolved: int
    a_n: int
    b_resolved: int
    b_n: int
    difference: float | None
    """Success rate of a minus that of b; None when either side has no scored run."""
    test: str
    p_value: float | None
    p_adjusted: float | None
    """Holm-adjusted within the family of comparisons it was made in."""
    significant: bool
    """True only when the adjusted p-value is below the report's `alpha`."""
    verdict: str
    """What to tell a person, including why a difference cannot be significant."""


class Comparisons(_Json):
    """One family of pairwise tests per grouping, each Holm-adjusted on its own."""

    agents: list[Comparison] = []
    model_pairs: list[Comparison] = []
    arms: list[Comparison] = []

    def families(self) -> list[tuple[str, list[Comparison]]]:
        """(family name, its comparisons), in the report's order."""
        return [("agents", self.agents), ("model_pairs", self.model_pairs), ("arms", self.arms)]


class DeferredRun(BaseModel):
    assignment: str
    not_before: str | None
    """Its restart time (ISO 8601 UTC): its machine allowance's reset."""


class RunRef(BaseModel):
    """Which assignment a line under the table is about."""

    assignment: str
    task: str
    agent: str
    model: str


class InfraErrorRun(RunRef):
    """A run the platform failed: left out of every rate."""

    cause: str | None
    detail: str | None


class TamperedRun(RunRef):
    """A run that edited the tests that grade it (restored before grading)."""

    files: list[str]


class ReviewRun(RunRef):
    """A run the confidence gate flagged for review."""

    confidence: float | None


class ProviderErrorCount(BaseModel):
    """Calls to a provider whose answer fell short the same way."""

    status: int | None
    """The HTTP status; None when no answer came."""
    error: str
    """The capture record's `upstream_error`: the error the provider named
    (`rate_limit_error`, `overloaded_error`, `rate_limit_exceeded`, `server_error`, …),
    `http_<status>`, `stream_cut` or `no_response`."""
    calls: int


class ProviderRow(BaseModel):
    """One provider's calls in the trial (the model plane is `local`) and its errors."""

    provider: str
    calls: int
    """Every call to it the proxy saw, its own refusals included."""
    failed: int
    """Calls whose answer fell short: an error status, an error event, a cut stream, none."""
    errors: list[ProviderErrorCount] = []


class PurchaseRow(BaseModel):
    """A purchase an assignment of the trial asked for, in its latest state, with the reason it
    gave and the free alternatives it said it considered."""

    id: str
    assignment: str | None
    machine: str | None
    item: str
    amount: Decimal
    currency: str
    status: str
    """completed, failed, refused or pending_approval."""
    method: str | None = None
    justification: str
    free_alternatives: list[str] = []


class TrialHead(_Json):
    """The trial the report is about."""

    id: str
    name: str
    project: str
    status: str
    currency: str
    created_at: str
    """ISO 8601 UTC."""
    finished_at: str | None


class TrialReport(TrialHead):
    """Per agent × model pair, what was solved, what it cost, and can we trust it."""

    rows: list[ArmRow]
    by_agent: list[AgentRow]
    by_model: list[ModelPairRow]
    comparisons: Comparisons
    deferred: list[DeferredRun] = []
    infra_errors: list[InfraErrorRun] = []
    tests_tampered: list[TamperedRun] = []
    needs_review: list[ReviewRun] = []
    local_share: LocalShare | None = None
    providers: list[ProviderRow] = []
    """Calls per provider with its errors counted by status and kind (429, 529, 5xx, cut)."""
    purchases: list[PurchaseRow] = []
    """What the trial's agents asked to buy (ledger.payments' attempt log), with their reasons."""
    alpha: float
    """Significance level of every comparison."""
    total_cost: Decimal
    total_cost_usd: Decimal


class CurvePoint(_Json):
    """One trial's success and cost per success, overall or of one agent × model pair."""

    trial: str
    name: str
    created_at: str
    n: int
    resolved: int
    success_rate: float | None
    success_ci95: tuple[float, float]
    cost: Decimal
    cost_per_resolved: Decimal | None


class LearningCurve(_Json):
    """A project's trials, oldest first: overall, and per agent × model pair."""

    project: str
    currency: str | None
    """None when the project has no trial."""
    points: list[CurvePoint]
    arms: dict[str, list[CurvePoint]]
