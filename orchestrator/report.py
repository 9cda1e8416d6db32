"""The trial report: per agent × model pair, what was solved, what it cost, and can we trust it.

`build` gathers one record per assignment from the state DB and the proxy's metering and hands
them to `summarize`, a pure function, so the numbers can be checked against fixed data. A run
counts as *scored* (the `n` of the success rate) once it was graded; cancelled runs and infra
failures say nothing about the agent and are left out of `n`, but their spend is not.
The report is one `contracts.reports.TrialReport`; every output takes it: `render` (Rich,
terminal) and `write_outputs` (JSON, CSV, Markdown, PNG charts).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, TypeVar

from rich.console import Console
from rich.table import Table

from contracts.reports import (
    ERROR_CAUSES,
    AgentRow,
    ArmRow,
    ArmStats,
    Comparison,
    Comparisons,
    CurvePoint,
    DeferredRun,
    InfraErrorRun,
    LearningCurve,
    LocalShare,
    ModelPairRow,
    ProviderErrorCount,
    ProviderRow,
    PurchaseRow,
    ReviewRun,
    RunRef,
    TamperedRun,
    TrialHead,
    TrialReport,
)
from orchestrator import stats

if TYPE_CHECKING:
    from orchestrator.platform import Platform
    from orchestrator.state import Assignment

GRADES = ("resolved", "partial", "unresolved")
INFRA_CAUSES = ("model_unreachable", "infra")
"""Causes of an `infra_error` ending: the platform failed, so the run says nothing of the agent."""
FORMATS = ("json", "csv", "md", "png")
PER_RESOLVED = Decimal("0.000001")
_K = TypeVar("_K")
_Row = TypeVar("_Row", bound=ArmStats)
_Run = TypeVar("_Run", bound=RunRef)


@dataclass(frozen=True)
class RunRecord:
    """One assignment as the report sees it."""

    assignment: str
    task: str
    agent: str
    model: str
    state: str
    status: str | None
    """Grade: resolved, partial or unresolved; None when never graded."""
    exit_cause: str | None
    wall_s: float | None
    not_before: str | None = None
    """A deferred assignment's restart time (ISO 8601 UTC): its machine allowance's reset."""
    tokens: int = 0
    local_tokens: int = 0
    """Part of `tokens` served by the local model plane (provider `local`), not a cloud API."""
    calls: int = 0
    cost_usd: Decimal = Decimal(0)
    confidence: float | None = None
    """The confidence gate's score (`result.confidence.score`); None when not scored."""
    accepted: bool | None = None
    """Whether the gate accepted the result; False: flagged for review; None: not scored."""
    failed_calls: int = 0
    """Calls through the proxy that the model plane or the proxy failed (5xx, no response)."""
    infra_detail: str | None = None
    """Why an `infra_error` ending was the platform's failure."""
    tampered_files: tuple[str, ...] = ()
    """Test files the agent changed (`result.grade.tampered_files`), restored before grading."""


def arm_name(agent: str, model: str) -> str:
    return f"{agent} × {model}"


class _Ref(TypedDict):
    assignment: str
    task: str
    agent: str
    model: str


def _ref(r: RunRecord) -> _Ref:
    """The fields of `RunRef`: which run a line under the table is about."""
    return {"assignment": r.assignment, "task": r.task, "agent": r.agent, "model": r.model}


def _about(run: RunRef) -> str:
    return f"{run.assignment} ({run.task}, {arm_name(run.agent, run.model)})"


def _success(resolved: int, n: int) -> tuple[float | None, tuple[float, float]]:
    """The success rate and its 95 % Wilson interval, rounded as the report shows them."""
    low, high = stats.wilson_interval(resolved, n)
    return (round(resolved / n, 4) if n else None), (round(low, 4), round(high, 4))


def _per_resolved(cost: Decimal, resolved: int) -> Decimal | None:
    return (cost / resolved).quantize(PER_RESOLVED) if resolved else None


# -- building ------------------------------------------------------------------------------


def build(platform: Platform, trial_id: str) -> TrialReport:
    """The report of one trial, from the state DB and the proxy's metering."""
    # Here, not at the top: `autovibe trial report` renders a report without the state DB.
    from orchestrator.state import Trial, stored_config

    with platform.store.session() as s:
        trial = s.get_one(Trial, trial_id)
        currency = stored_config(trial.config).budget.currency
        head = TrialHead(
            id=trial.id,
            name=trial.name,
            project=trial.project,
            status=trial.status,
            currency=currency,
            created_at=trial.created_at.isoformat() + "Z",
            finished_at=trial.finished_at.isoformat() + "Z" if trial.finished_at else None,
        )
        bare = [_record(a) for a in trial.assignments]
    platform.usage(trial=trial_id)  # one catch-up of the index, then plain reads
    records = []
    for r in bare:
        usage = platform.index.usage(assignment=r.assignment)
        records.append(
            replace(
                r,
                tokens=sum(u.total_tokens for u in usage),
                local_tokens=sum(u.total_tokens for u in usage if u.provider == "local"),
                calls=sum(u.calls for u in usage),
                cost_usd=sum((u.cost_usd for u in usage), start=Decimal(0)),
                failed_calls=platform.index.call_failures(r.assignment).failed,
            )
        )
    providers = [
        ProviderRow(
            provider=p.provider,
            calls=p.calls,
            failed=p.failed,
            errors=[
                ProviderErrorCount(status=e.status, error=e.upstream_error, calls=e.calls)
                for e in p.errors
            ],
        )
        for p in platform.index.provider_calls(trial=trial_id)
    ]
    return summarize(
        head,
        records,
        lambda usd: platform.in_currency(usd, currency),
        providers,
        purchases_of(platform, trial.project, trial_id),
    )


def purchases_of(platform: Platform, project: str, trial_id: str) -> list[PurchaseRow]:
    """The trial's purchases, each in its latest state, from the project's attempt log."""
    from ledger.payments import TRANSACTIONS_FILE, TransactionLog

    log = TransactionLog(platform.root.financial(project) / TRANSACTIONS_FILE)
    latest = {e["id"]: e for e in log.entries() if e.get("trial") == trial_id}
    return [
        PurchaseRow(
            id=e["id"],
            assignment=e.get("assignment"),
            machine=e.get("machine"),
            item=e["item"],
            amount=Decimal(e["amount"]),
            currency=e["currency"],
            status=e["status"],
            method=e.get("method"),
            justification=e["justification"],
            free_alternatives=list(e.get("free_alternatives_considered") or []),
        )
        for e in latest.values()
    ]


def _record(a: Assignment) -> RunRecord:
    """An assignment as the report sees it, before its metered usage is added."""
    ending = a.ending
    gate = ending.confidence
    return RunRecord(
        assignment=a.id,
        task=a.task_id,
        agent=a.agent,
        model=a.model,
        state=a.state,
        status=a.status,
        exit_cause=a.exit_cause,
        wall_s=ending.wall_s,
        confidence=gate.score if gate is not None else None,
        accepted=gate.accepted if gate is not None else None,
        not_before=a.not_before.isoformat() + "Z" if a.not_before else None,
        infra_detail=ending.infra_error,
        tampered_files=tuple(ending.grade.tampered_files) if ending.grade is not None else (),
    )


def summarize(
    head: TrialHead,
    records: Sequence[RunRecord],
    to_currency: Callable[[Decimal], Decimal],
    providers: Sequence[ProviderRow] = (),
    purchases: Sequence[PurchaseRow] = (),
) -> TrialReport:
    """Rows per agent × model pair, per agent and per model pair, and the pairwise tests;
    `providers` (calls and errors per provider, from the traffic store) and `purchases` (from
    the attempt log) as they are."""
    rows = [
        ArmRow(agent=agent, model=model, **dict(_stats(group, to_currency)))
        for (agent, model), group in _grouped(records, lambda r: (r.agent, r.model))
    ]
    by_agent = [
        AgentRow(agent=agent, **dict(_stats(group, to_currency)))
        for agent, group in _grouped(records, lambda r: r.agent)
    ]
    by_model = [
        ModelPairRow(model=model, **dict(_stats(group, to_currency)))
        for model, group in _grouped(records, lambda r: r.model)
    ]
    total_usd = sum((r.cost_usd for r in records), start=Decimal(0))
    return TrialReport(
        **dict(head),
        rows=rows,
        by_agent=by_agent,
        by_model=by_model,
        comparisons=Comparisons(
            agents=_compare(by_agent, lambda r: r.agent),
            model_pairs=_compare(by_model, lambda r: r.model),
            arms=_compare(rows, lambda r: arm_name(r.agent, r.model)),
        ),
        deferred=[
            DeferredRun(assignment=r.assignment, not_before=r.not_before)
            for r in records
            if r.state == "deferred"
        ],
        infra_errors=[
            InfraErrorRun(**_ref(r), cause=r.exit_cause, detail=r.infra_detail)
            for r in records
            if r.status == "infra_error"
        ],
        tests_tampered=[
            TamperedRun(**_ref(r), files=list(r.tampered_files))
            for r in records
            if r.tampered_files
        ],
        needs_review=[
            ReviewRun(**_ref(r), confidence=r.confidence) for r in records if r.accepted is False
        ],
        local_share=_local_share(records),
        providers=list(providers),
        purchases=list(purchases),
        alpha=stats.ALPHA,
        total_cost=to_currency(total_usd),
        total_cost_usd=total_usd,
    )


def _grouped(
    records: Iterable[RunRecord], key: Callable[[RunRecord], _K]
) -> list[tuple[_K, list[RunRecord]]]:
    groups: dict[_K, list[RunRecord]] = defaultdict(list)
    for r in records:
        groups[key(r)].append(r)
    return sorted(groups.items(), key=lambda kv: str(kv[0]))


def _stats(group: list[RunRecord], to_currency: Callable[[Decimal], Decimal]) -> ArmStats:
    resolved, partial, unresolved = (sum(r.status == g for r in group) for g in GRADES)
    n = resolved + partial + unresolved
    success_rate, success_ci95 = _success(resolved, n)
    wall = [float(r.wall_s) for r in group if r.wall_s is not None]
    cost_usd = sum((r.cost_usd for r in group), start=Decimal(0))
    cost = to_currency(cost_usd)
    p50, p90 = stats.percentile(wall, 50), stats.percentile(wall, 90)
    return ArmStats(
        assignments=len(group),
        n=n,
        resolved=resolved,
        partial=partial,
        unresolved=unresolved,
        pending=sum(r.state in ("queued", "deferred", "running") for r in group),
        deferred=sum(r.state == "deferred" for r in group),
        errors=sum(r.state in ("failed", "cancelled") and r.status not in GRADES for r in group),
        error_causes={c: sum(r.exit_cause == c for r in group) for c in ERROR_CAUSES},
        infra_errors=sum(r.status == "infra_error" for r in group),
        tests_tampered=sum(bool(r.tampered_files) for r in group),
        failed_calls=sum(r.failed_calls for r in group),
        accepted=sum(r.accepted is True for r in group),
        needs_review=sum(r.accepted is False for r in group),
        success_rate=success_rate,
        success_ci95=success_ci95,
        llm_calls=sum(r.calls for r in group),
        tokens=sum(r.tokens for r in group),
        **dict(_local_share(group)),
        cost=cost,
        cost_usd=cost_usd,
        cost_per_resolved=_per_resolved(cost, resolved),
        wall_s_median=round(statistics.median(wall), 2) if wall else None,
        wall_s_p50=None if p50 is None else round(p50, 2),
        wall_s_p90=None if p90 is None else round(p90, 2),
        wall_s_total=round(sum(wall), 2),
    )


def _local_share(group: Sequence[RunRecord]) -> LocalShare:
    """Tokens served by the local pair, and their share of all metered tokens (None: none)."""
    tokens, local = sum(r.tokens for r in group), sum(r.local_tokens for r in group)
    return LocalShare(local_tokens=local, local_share=round(local / tokens, 4) if tokens else None)


def _compare(rows: Sequence[_Row], name: Callable[[_Row], str]) -> list[Comparison]:
    return stats.compare_all([stats.Arm(name(r), r.resolved, r.n) for r in rows])


# -- learning curves -----------------------------------------------------------------------


def learning_curve(platform: Platform, project: str) -> LearningCurve:
    """Success and cost per success of a project's trials, oldest first."""
    from sqlalchemy import select

    from orchestrator.state import Trial

    with platform.store.session() as s:
        ids = list(
            s.scalars(select(Trial.id).where(Trial.project == project).order_by(Trial.created_at))
        )
    return curve_from_reports([build(platform, i) for i in ids], project)


def curve_from_reports(reports: Sequence[TrialReport], project: str) -> LearningCurve:
    """One point per trial, overall and per agent × model pair, ordered by creation time."""
    ordered = sorted(reports, key=lambda r: r.created_at)
    currencies = {r.currency for r in ordered}
    if len(currencies) > 1:
        raise ValueError(
            f"trials of {project} are priced in several currencies "
            f"({', '.join(sorted(currencies))}); their costs cannot share one curve"
        )
    points = []
    arms: dict[str, list[CurvePoint]] = defaultdict(list)
    for report in ordered:
        points.append(_point(report, report.rows))
        for row in report.rows:
            arms[arm_name(row.agent, row.model)].append(_point(report, [row]))
    return LearningCurve(
        project=project,
        currency=currencies.pop() if currencies else None,
        points=points,
        arms=dict(sorted(arms.items())),
    )


def _point(report: TrialReport, rows: Sequence[ArmRow]) -> CurvePoint:
    n = sum(r.n for r in rows)
    resolved = sum(r.resolved for r in rows)
    cost = sum((r.cost for r in rows), start=Decimal(0))
    success_rate, success_ci95 = _success(resolved, n)
    return CurvePoint(
        trial=report.id,
        name=report.name,
        created_at=report.created_at,
        n=n,
        resolved=resolved,
        success_rate=success_rate,
        success_ci95=success_ci95,
        cost=cost,
        cost_per_resolved=_per_resolved(cost, resolved),
    )


# -- outputs -------------------------------------------------------------------------------


def _rate(row: ArmStats) -> str:
    if row.success_rate is None:
        return "—"
    low, high = row.success_ci95
    return f"{row.resolved}/{row.n} = {row.success_rate:.0%} [{low:.0%}, {high:.0%}]"


def _money(value: Decimal | None) -> str:
    return f"{value:.6f}" if value is not None else "—"


def _wall(row: ArmStats) -> str:
    if row.wall_s_p50 is None or row.wall_s_p90 is None:
        return "—"
    return f"{row.wall_s_p50:g} / {row.wall_s_p90:g}"


def _causes(row: ArmStats) -> str:
    """Error causes and their counts; failed calls are named even where every run ended."""
    causes = [f"{c} {k}" for c, k in row.error_causes.items() if k]
    if row.failed_calls:
        causes.append(f"{row.failed_calls} failed calls")
    return ", ".join(causes) or "—"


def _runs_note(header: str, runs: Sequence[_Run], detail: Callable[[_Run], str]) -> list[str]:
    """`header`, then a line per run: which it is and its `detail`; nothing without runs."""
    return [header, *(f"  {_about(r)}: {detail(r)}" for r in runs)] if runs else []


def infra_note(report: TrialReport) -> list[str]:
    """Lines under the table: which runs the platform failed, left out of every rate."""
    errors = report.infra_errors
    header = (
        f"Infrastructure errors: {len(errors)} assignment(s) failed on the platform's side "
        "(after their retries); they are left out of the success rates, intervals and tests:"
    )
    return _runs_note(header, errors, lambda e: f"{e.cause}: {e.detail}")


def tamper_note(report: TrialReport) -> list[str]:
    """Lines under the table: which runs edited the tests that grade them (undone first)."""
    tampered = report.tests_tampered
    header = (
        f"Tests tampered with: {len(tampered)} assignment(s) changed the task's tests or "
        "their configuration; they were restored before grading (tests-tampered.diff):"
    )
    return _runs_note(header, tampered, lambda t: ", ".join(t.files))


def local_share_note(report: TrialReport) -> list[str]:
    """The line under the table: the tokens the local plane served, beside the target share."""
    share = report.local_share
    if share is None:
        return []
    return [
        f"Tokens served locally: {share.local_tokens} "
        f"({_share(share.local_share)} of all metered tokens; target {share.target:.0%})"
    ]


def provider_note(report: TrialReport) -> list[str]:
    """Lines under the table: each provider's calls and the errors among them, by status."""
    lines = []
    for p in report.providers:
        errors = ", ".join(
            f"{e.calls} × {'' if e.status is None else f'{e.status} '}{e.error}" for e in p.errors
        )
        lines.append(
            f"Provider {p.provider}: {p.calls} calls, {p.failed} fell short"
            + (f" ({errors})" if errors else "")
        )
    return lines


def purchase_note(report: TrialReport) -> list[str]:
    """Lines under the table: each purchase asked for, its outcome, why, and what free
    alternative its agent said it tried."""
    return [
        f"Purchase {p.id} ({p.machine or '-'}): {p.item}, {p.amount} {p.currency}, {p.status}"
        f"{f' by {p.method}' if p.method else ''}; why: {p.justification}; free alternatives: "
        f"{'; '.join(p.free_alternatives) or 'none stated'}"
        for p in report.purchases
    ]


def _gate(row: ArmStats) -> str:
    return f"{row.accepted} / {row.needs_review}"


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _p(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _comparison_cells(family: str, c: Comparison, *, significant: bool) -> list[str]:
    """A comparison's cells: its family, the two sides each with its resolved / scored count,
    the p-values, whether significant (Markdown's table only) and the verdict."""
    cells = [family.replace("_", " "), f"{c.a} ({c.a_resolved}/{c.a_n})"]
    cells += [f"{c.b} ({c.b_resolved}/{c.b_n})", _p(c.p_value), _p(c.p_adjusted)]
    if significant:
        cells.append("yes" if c.significant else "no")
    return [*cells, c.verdict]


def _row_cells(r: ArmRow, *, calls: bool) -> list[str]:
    """A row's cells; LLM calls in the terminal's table only (`calls`)."""
    cells = [r.agent, r.model, str(r.assignments), str(r.resolved), str(r.partial), _rate(r)]
    if calls:
        cells.append(str(r.llm_calls))
    cost = [_money(r.cost), _money(r.cost_per_resolved)]
    return [*cells, str(r.tokens), _share(r.local_share), *cost, _wall(r), _causes(r), _gate(r)]


def render(report: TrialReport, console: Console) -> None:
    cur = report.currency
    table = Table(title=f"Trial {report.name} ({report.id}) — {report.status}")
    for col in (
        "agent",
        "model pair",
        "runs",
        "resolved",
        "partial",
        "success [95% CI]",
        "LLM calls",
        "tokens",
        "local",
        f"cost {cur}",
        f"{cur} / resolved",
        "wall s p50 / p90",
        "errors",
        "accepted / review",
    ):
        table.add_column(
            col, justify="left" if col in ("agent", "model pair", "errors") else "right"
        )
    for r in report.rows:
        table.add_row(*_row_cells(r, calls=True))
    console.print(table)
    for line in local_share_note(report):
        console.print(line, markup=False, highlight=False)
    console.print(
        f"Total metered spend: {report.total_cost:.6f} {cur} ({report.total_cost_usd:.6f} USD)"
    )
    for line in [*infra_note(report), *tamper_note(report)]:
        console.print(line, style="bold red", markup=False, highlight=False)
    for line in [*provider_note(report), *purchase_note(report)]:
        console.print(line, markup=False, highlight=False)
    for d in report.deferred:
        console.print(
            f"Deferred: {d.assignment} (its machine's daily allowance is spent) "
            f"until {d.not_before}"
        )
    for flagged in report.needs_review:
        console.print(
            f"Needs review: {_about(flagged)}: confidence {flagged.confidence} is below the "
            "threshold"
        )
    comparisons = [(family, c) for family, cs in report.comparisons.families() for c in cs]
    if comparisons:
        ctable = Table(title="Pairwise success rates (Fisher's exact test, Holm-adjusted)")
        for col in ("between", "a", "b", "p", "p adj", "verdict"):
            ctable.add_column(col, justify="right" if col.startswith("p") else "left")
        for family, c in comparisons:
            ctable.add_row(*_comparison_cells(family, c, significant=False))
        console.print(ctable)


CSV_COLUMNS = (
    "agent",
    "model",
    "assignments",
    "n",
    "resolved",
    "partial",
    "unresolved",
    "pending",
    "success_rate",
    "success_ci95_low",
    "success_ci95_high",
    "llm_calls",
    "tokens",
    "cost",
    "currency",
    "cost_usd",
    "cost_per_resolved",
    "wall_s_p50",
    "wall_s_p90",
    "wall_s_total",
    "infra_errors",
    "tests_tampered",
    "failed_calls",
    *(f"errors_{c}" for c in ERROR_CAUSES),
    "accepted",
    "needs_review",
)


def to_csv(report: TrialReport) -> str:
    """One line per agent × model pair; empty cells where a value does not exist."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in report.rows:
        low, high = r.success_ci95
        flat = {k: v for k, v in r.to_json().items() if k in CSV_COLUMNS}
        flat |= {"currency": report.currency, "success_ci95_low": low, "success_ci95_high": high}
        flat |= {f"errors_{c}": k for c, k in r.error_causes.items()}
        writer.writerow({k: "" if v is None else v for k, v in flat.items()})
    return out.getvalue()


def to_markdown(report: TrialReport, charts: Sequence[Path] = ()) -> str:
    """The report as a Markdown page; `charts` are linked by file name (written beside it)."""
    cur = report.currency
    lines = [
        f"# Trial {report.name} ({report.id})",
        "",
        f"Project **{report.project}**, status **{report.status}**, "
        f"total metered spend **{report.total_cost:.6f} {cur}** "
        f"({report.total_cost_usd:.6f} USD).",
        "",
        f"| agent | model pair | runs | resolved | partial | success [95% CI] | tokens | local "
        f"| cost {cur} | {cur} / resolved | wall s p50 / p90 | errors | accepted / review |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|",
    ]
    for r in report.rows:
        lines.append(_md_row(_row_cells(r, calls=False)))
    lines += [
        "",
        *(_md_escape(line) for line in local_share_note(report)),
        *([""] if report.local_share is not None else []),
        "Success counts graded runs only (cancelled runs and infra failures are left out); "
        "the interval is Wilson's at 95 %.",
        "",
        *(
            _md_escape(line if i == 0 else f"- {line.strip()}")
            for i, line in enumerate(infra_note(report))
        ),
        "",
        *(
            _md_escape(line if i == 0 else f"- {line.strip()}")
            for i, line in enumerate(tamper_note(report))
        ),
        "",
        *(f"- {_md_escape(line)}" for line in provider_note(report)),
        *([""] if report.providers else []),
        *(f"- {_md_escape(line)}" for line in purchase_note(report)),
        *([""] if report.purchases else []),
        "## Pairwise comparisons",
        "",
    ]
    comparisons = [(f, c) for f, cs in report.comparisons.families() for c in cs]
    if comparisons:
        lines += [
            "Fisher's exact test on success rates, two-sided; p-values Holm-adjusted within "
            f"each family; significant when the adjusted p < {report.alpha}.",
            "",
            "| between | a | b | p | p adj | significant | verdict |",
            "|---|---|---|--:|--:|---|---|",
        ]
        for family, c in comparisons:
            lines.append(_md_row(_comparison_cells(family, c, significant=True)))
    else:
        lines.append("Only one agent and one model pair: nothing to compare.")
    for chart in charts:
        lines += ["", f"![{chart.stem}]({chart.name})"]
    return "\n".join(lines) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_md_escape(c) for c in cells) + " |"


def write_outputs(
    report: TrialReport,
    dest_dir: Path,
    formats: Iterable[str] = FORMATS,
    curve: LearningCurve | None = None,
) -> dict[str, list[Path]]:
    """Write the report in each format into `dest_dir`; returns the files per format.

    `png` writes the cost-per-resolved chart, and the learning curve when `curve` is given.
    """
    wanted = list(dict.fromkeys(formats))
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown:
        raise ValueError(
            f"unknown report format {', '.join(unknown)}; allowed: {', '.join(FORMATS)}"
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    stem = f"report-{report.id}"
    written: dict[str, list[Path]] = {}
    if "png" in wanted:
        from orchestrator import charts  # matplotlib is slow to import; only when asked

        pngs = [charts.cost_chart(report, dest_dir / f"{stem}-cost.png")]
        if curve is not None:
            pngs.append(charts.learning_curve_chart(curve, dest_dir / f"{stem}-curve.png"))
        written["png"] = pngs
    if "json" in wanted:
        path = dest_dir / f"{stem}.json"
        data = report.to_json()
        if curve is not None:
            data |= {"learning_curve": curve.to_json()}
        path.write_text(json.dumps(data, indent=2) + "\n")
        written["json"] = [path]
    if "csv" in wanted:
        path = dest_dir / f"{stem}.csv"
        path.write_text(to_csv(report))
        written["csv"] = [path]
    if "md" in wanted:
        path = dest_dir / f"{stem}.md"
        path.write_text(to_markdown(report, written.get("png", [])))
        written["md"] = [path]
    return written
