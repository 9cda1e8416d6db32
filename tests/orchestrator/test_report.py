"""The trial report against fixed trial data: statistics, rows, comparisons, learning curves.

`summarize` is checked on fixed records; `build` and `learning_curve` on a real state DB and a
real traffic index (spool → SQLite) in a temporary data root.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from traffic_harness import llm_call

from contracts.dataroot import DataRoot
from contracts.reports import ArmRow, LocalShare, TrialHead, TrialReport
from contracts.settings import PROJECT_ROOT, Settings
from orchestrator import stats
from orchestrator.platform import Platform
from orchestrator.report import (
    RunRecord,
    build,
    curve_from_reports,
    learning_curve,
    render,
    summarize,
    to_markdown,
)
from orchestrator.state import Assignment, Trial
from traffic.spool import Spool

CAD = Decimal("1.38")
HEAD = TrialHead(
    id="t1",
    name="fixed",
    project="demo",
    status="finished",
    currency="CAD",
    created_at="2025-03-01T10:00:00Z",
    finished_at="2025-03-01T11:00:00Z",
)


def to_cad(usd: Decimal) -> Decimal:
    return (usd * CAD).quantize(Decimal("0.000001"))


def run(
    i: int,
    agent: str,
    model: str,
    status: str | None,
    cause: str | None = "finished",
    *,
    state: str = "finished",
    wall: float | None = 10.0,
    usd: str = "0.01",
) -> RunRecord:
    return RunRecord(
        assignment=f"a{i:03d}",
        task=f"task{i % 3}",
        agent=agent,
        model=model,
        state=state,
        status=status,
        exit_cause=cause,
        wall_s=wall,
        tokens=100,
        calls=2,
        cost_usd=Decimal(usd),
    )


def fixed_records() -> list[RunRecord]:
    """builtin × tiny: 2/6 resolved; builtin × tiny:thinking: 6/6, plus an infra failure and a
    cancel; other × tiny: 0/3."""
    walls = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    statuses = ["resolved", "resolved", "partial", "unresolved", "unresolved", "unresolved"]
    causes = ["finished", "finished", "finished", "timeout", "crashed", "budget_exhausted"]
    records = [
        run(i, "builtin", "tiny", s, c, wall=w)
        for i, (s, c, w) in enumerate(zip(statuses, causes, walls, strict=True))
    ]
    records += [run(10 + i, "builtin", "tiny:thinking", "resolved", usd="0.02") for i in range(6)]
    records += [
        run(20, "builtin", "tiny:thinking", None, "infra", state="failed", wall=None, usd="0"),
        run(21, "builtin", "tiny:thinking", None, "cancelled", state="cancelled", wall=None),
    ]
    records += [run(30 + i, "other", "tiny", "unresolved", "crashed") for i in range(3)]
    return records


def row(report: TrialReport, agent: str, model: str) -> ArmRow:
    (match,) = [r for r in report.rows if (r.agent, r.model) == (agent, model)]
    return match


# -- statistics -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        (2, 6, 0.0968, 0.7000),  # the textbook example
        (0, 6, 0.0, 0.3903),
        (6, 6, 0.6097, 1.0),
        (50, 100, 0.4038, 0.5962),
        (0, 0, 0.0, 1.0),  # no data: nothing is known
    ],
)
def test_wilson_interval_matches_known_values(
    successes: int, n: int, low: float, high: float
) -> None:
    lo, hi = stats.wilson_interval(successes, n)
    assert (round(lo, 4), round(hi, 4)) == (low, high)


def test_wilson_interval_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        stats.wilson_interval(7, 6)


def test_percentiles_interpolate_between_ranks() -> None:
    values = [60.0, 10.0, 30.0, 20.0, 50.0, 40.0]
    assert stats.percentile(values, 50) == 35.0
    assert stats.percentile(values, 90) == pytest.approx(55.0)
    assert stats.percentile([7.0], 90) == 7.0
    assert stats.percentile([], 50) is None


def test_holm_adjustment() -> None:
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([]) == []


def test_fisher_comparison_is_honest_about_small_samples() -> None:
    # 33 % against 100 % looks decisive, but with six runs a side it is not significant:
    # hypergeometric tails 15/495 + 15/495.
    a, b = stats.Arm("a", 2, 6), stats.Arm("b", 6, 6)
    (c,) = stats.compare_all([a, b])
    assert c.test == "fisher_exact"
    assert c.p_value == pytest.approx(30 / 495, abs=1e-6)
    assert c.significant is False
    assert c.verdict == "not significant at 0.05"
    assert c.difference == pytest.approx(-0.6667)

    # Three runs a side can never be significant, whatever happens.
    (tiny,) = stats.compare_all([stats.Arm("x", 0, 3), stats.Arm("y", 3, 3)])
    assert tiny.p_value == pytest.approx(0.1)
    assert not tiny.significant
    assert tiny.verdict.startswith("not significant: too few runs (3 vs 3)")

    # Ten a side, all against none: p = 2 / C(20, 10).
    (big,) = stats.compare_all([stats.Arm("x", 0, 10), stats.Arm("y", 10, 10)])
    assert big.p_value == pytest.approx(2 / 184756, rel=1e-3)
    assert big.significant is True
    assert big.verdict == "significant at 0.05: y resolves more"

    (empty,) = stats.compare_all([stats.Arm("x", 0, 0), stats.Arm("y", 1, 2)])
    assert (empty.p_value, empty.significant, empty.difference) == (None, False, None)


# -- the report of one trial ----------------------------------------------------------------


def test_summarize_fixed_trial() -> None:
    report = summarize(HEAD, fixed_records(), to_cad)
    assert [(r.agent, r.model) for r in report.rows] == [
        ("builtin", "tiny"),
        ("builtin", "tiny:thinking"),
        ("other", "tiny"),
    ]
    plain = row(report, "builtin", "tiny")
    assert (plain.assignments, plain.n, plain.resolved, plain.partial, plain.unresolved) == (
        6,
        6,
        2,
        1,
        3,
    )
    assert plain.success_rate == 0.3333
    assert plain.success_ci95 == (0.0968, 0.7)
    assert plain.error_causes == {
        "timeout": 1,
        "budget_exhausted": 1,
        "crashed": 1,
        "model_unreachable": 0,
        "infra": 0,
        "cancelled": 0,
    }
    assert (plain.llm_calls, plain.tokens) == (12, 600)
    # Money is a decimal string in the JSON, to the last digit the currency's rate gives.
    wire = plain.to_json()
    assert (wire["cost_usd"], wire["cost"], wire["cost_per_resolved"]) == (
        "0.06",
        "0.082800",
        "0.041400",
    )
    assert list(wire)[:3] == ["agent", "model", "assignments"]
    assert wire["success_ci95"] == [0.0968, 0.7]
    assert (plain.wall_s_median, plain.wall_s_p50, plain.wall_s_p90) == (35, 35, 55)
    assert plain.wall_s_total == 210

    # The infra failure and the cancel are not scored, but what they spent is counted.
    thinking = row(report, "builtin", "tiny:thinking")
    assert (thinking.assignments, thinking.n, thinking.resolved) == (8, 6, 6)
    assert (thinking.errors, thinking.success_rate) == (2, 1.0)
    assert thinking.error_causes["infra"] == thinking.error_causes["cancelled"] == 1
    assert thinking.cost_usd == Decimal("0.13")
    assert thinking.cost_per_resolved == (to_cad(Decimal("0.13")) / 6).quantize(Decimal("0.000001"))
    assert row(report, "other", "tiny").cost_per_resolved is None

    assert (report.to_json()["total_cost_usd"], report.to_json()["total_cost"]) == (
        "0.22",
        "0.303600",
    )
    assert [a.agent for a in report.by_agent] == ["builtin", "other"]
    assert [(m.model, m.resolved, m.n) for m in report.by_model] == [
        ("tiny", 2, 9),
        ("tiny:thinking", 6, 6),
    ]


def test_pairwise_comparisons_of_agents_pairs_and_arms() -> None:
    report = summarize(HEAD, fixed_records(), to_cad)
    comparisons = report.comparisons
    (agents,) = comparisons.agents
    assert (agents.a, agents.a_resolved, agents.a_n) == ("builtin", 8, 12)
    assert (agents.b, agents.b_resolved, agents.b_n) == ("other", 0, 3)
    assert agents.significant is False
    (pairs,) = comparisons.model_pairs
    # 2/9 against 6/6 is significant even at these sizes: tails (36 + 9) / C(15, 8).
    assert pairs.p_value == pytest.approx(45 / 6435, abs=1e-6)
    assert pairs.significant is True
    assert pairs.verdict == "significant at 0.05: tiny:thinking resolves more"
    arms = comparisons.arms
    assert len(arms) == 3
    first = arms[0]
    assert (first.a, first.b) == ("builtin × tiny", "builtin × tiny:thinking")
    assert first.p_value == pytest.approx(30 / 495, abs=1e-6)
    # Holm over three comparisons: 6/6 against 0/3 (p = 1 / C(9, 3)) ranks first, this second.
    assert arms[2].p_value == pytest.approx(1 / 84, abs=1e-6)
    assert first.p_adjusted == pytest.approx(2 * 30 / 495, abs=1e-6)
    assert first.significant is False


def test_render_shows_intervals_errors_and_verdicts() -> None:
    console = Console(record=True, width=220)
    render(summarize(HEAD, fixed_records(), to_cad), console)
    text = console.export_text()
    assert "2/6 = 33% [10%, 70%]" in text
    assert "timeout 1, budget_exhausted 1, crashed 1" in text
    assert "35 / 55" in text
    assert "Fisher's exact test" in text
    assert "not significant at 0.05" in text
    assert "Total metered spend: 0.303600 CAD (0.220000 USD)" in text


def test_infra_errors_are_counted_apart_and_named_under_the_table() -> None:
    """An `infra_error` ending says nothing of the agent: out of n and the interval, counted
    with its cause, and listed under the table; failed calls show even where runs ended."""
    records = [
        run(1, "builtin", "tiny", "resolved"),
        replace(run(2, "builtin", "tiny", "unresolved"), failed_calls=1),
        replace(
            run(3, "builtin", "tiny", "infra_error", "model_unreachable", state="failed"),
            failed_calls=4,
            infra_detail="its last model call failed (HTTP 502)",
        ),
        replace(run(4, "other", "tiny", "unresolved"), failed_calls=2),
    ]
    report = summarize(HEAD, records, to_cad)
    builtin = row(report, "builtin", "tiny")
    assert (builtin.assignments, builtin.n, builtin.resolved) == (3, 2, 1)
    assert builtin.success_rate == 0.5
    assert builtin.success_ci95 == tuple(round(x, 4) for x in stats.wilson_interval(1, 2)), (
        "the interval must leave the infra error out"
    )
    assert (builtin.infra_errors, builtin.errors, builtin.failed_calls) == (1, 1, 5)
    assert builtin.error_causes["model_unreachable"] == 1
    assert report.to_json()["infra_errors"] == [
        {
            "assignment": "a003",
            "task": "task0",
            "agent": "builtin",
            "model": "tiny",
            "cause": "model_unreachable",
            "detail": "its last model call failed (HTTP 502)",
        }
    ]
    console = Console(record=True, width=220)
    render(report, console)
    text = console.export_text()
    assert "model_unreachable 1, 5 failed calls" in text
    # No error ending, yet calls failed: the column says so instead of "—".
    assert "2 failed calls" in text
    assert "Infrastructure errors: 1 assignment(s)" in text
    assert "a003 (task0, builtin × tiny): model_unreachable: its last model call failed" in text
    markdown = to_markdown(report)
    assert "left out of the success rates" in markdown
    assert "- a003 (task0, builtin × tiny)" in markdown


def test_tampered_tests_are_counted_and_named_under_the_table() -> None:
    """A run whose agent edited the task's tests is graded on the restored tests; the report
    counts it per agent x pair and names it with its files under the table."""
    files = ("tests/conftest.py", "tests/test_basic.py")
    records = [
        replace(run(1, "builtin", "tiny", "resolved"), tampered_files=files),
        run(2, "builtin", "tiny", "unresolved"),
    ]
    report = summarize(HEAD, records, to_cad)
    assert row(report, "builtin", "tiny").tests_tampered == 1
    assert report.to_json()["tests_tampered"] == [
        {
            "assignment": "a001",
            "task": "task1",
            "agent": "builtin",
            "model": "tiny",
            "files": list(files),
        }
    ]
    console = Console(record=True, width=220)
    render(report, console)
    text = console.export_text()
    assert "Tests tampered with: 1 assignment(s)" in text
    assert "a001 (task1, builtin × tiny): tests/conftest.py, tests/test_basic.py" in text
    assert "- a001 (task1, builtin × tiny): tests/conftest.py" in to_markdown(report)


def test_a_trial_with_nothing_graded_yet() -> None:
    records = [run(1, "builtin", "tiny", None, None, state="queued", wall=None, usd="0")]
    report = summarize(HEAD, records, to_cad)
    (only,) = report.rows
    assert (only.n, only.pending, only.success_rate) == (0, 1, None)
    assert only.success_ci95 == (0.0, 1.0)
    assert only.wall_s_p50 is None
    console = Console(record=True, width=220)
    render(report, console)
    assert "builtin" in console.export_text()


# -- from the state DB and the traffic index -------------------------------------------------


@pytest.fixture
def platform(tmp_path: Path) -> Platform:
    return Platform.from_settings(
        Settings(data=tmp_path / "data", configs=PROJECT_ROOT / "configs")
    )


def add_trial(
    platform: Platform,
    config: dict[str, Any],
    name: str,
    created: dt.datetime,
    outcomes: list[tuple[str, str, str | None, str, str]],
) -> str:
    """A finished trial: one assignment per (agent, model, status, exit cause, cost USD),
    each with one metered call in the spool."""
    trial_id = f"tr{uuid.uuid4().hex[:10]}"
    spool = Spool(DataRoot.at(platform.settings.data))
    with platform.store.session() as s:
        s.add(
            Trial(
                id=trial_id,
                name=name,
                project="demo",
                status="finished",
                config={**config, "name": name},
                created_at=created,
                finished_at=created + dt.timedelta(hours=1),
            )
        )
        for index, (agent, model, status, cause, usd) in enumerate(outcomes):
            aid = f"{trial_id}-{index:03d}"
            s.add(
                Assignment(
                    id=aid,
                    trial_id=trial_id,
                    index=index,
                    task_id="mathkit",
                    agent=agent,
                    model=model,
                    state="finished" if status else "failed",
                    status=status,
                    exit_cause=cause,
                    result={"wall_s": 10.0 * (index + 1)},
                )
            )
            spool.append(llm_call(trial_id, aid, model, usd))
    spool.close()
    return trial_id


def test_build_reads_the_state_db_and_the_metering(
    platform: Platform, demo_trial: dict[str, Any]
) -> None:
    trial_id = add_trial(
        platform,
        demo_trial,
        "report-db",
        dt.datetime(2025, 3, 1, 10),
        [
            ("builtin", "tiny", "resolved", "finished", "0.001"),
            ("builtin", "tiny", "unresolved", "timeout", "0.002"),
            ("builtin", "tiny:thinking", None, "infra", "0.0005"),
        ],
    )
    report = build(platform, trial_id)
    assert (report.id, report.currency, report.created_at) == (
        trial_id,
        "CAD",
        "2025-03-01T10:00:00Z",
    )
    plain = row(report, "builtin", "tiny")
    assert (plain.n, plain.resolved, plain.llm_calls, plain.tokens) == (2, 1, 2, 100)
    wire = plain.to_json()
    assert wire["cost_usd"] == "0.003"
    assert wire["cost"] == "0.004140"  # 1.38 CAD per USD in configs/prices.yaml
    assert wire["cost_per_resolved"] == "0.004140"
    assert plain.error_causes["timeout"] == 1
    assert (plain.wall_s_p50, plain.wall_s_p90) == (15.0, 19.0)
    broken = row(report, "builtin", "tiny:thinking")
    assert (broken.n, broken.errors, broken.error_causes["infra"]) == (0, 1, 1)
    assert report.to_json()["total_cost_usd"] == "0.0035"


def test_learning_curve_over_a_projects_trials(
    platform: Platform, demo_trial: dict[str, Any]
) -> None:
    outcomes_late = [
        ("builtin", "tiny", "resolved", "finished", "0.001"),
        ("builtin", "tiny", "resolved", "finished", "0.001"),
    ]
    outcomes_early = [
        ("builtin", "tiny", "unresolved", "crashed", "0.003"),
        ("builtin", "tiny", "resolved", "finished", "0.003"),
    ]
    late = add_trial(platform, demo_trial, "curve-2", dt.datetime(2025, 3, 2), outcomes_late)
    early = add_trial(platform, demo_trial, "curve-1", dt.datetime(2025, 3, 1), outcomes_early)
    curve = learning_curve(platform, "demo")
    assert curve.currency == "CAD"
    assert [p.trial for p in curve.points] == [early, late]
    assert [p.success_rate for p in curve.points] == [0.5, 1.0]
    assert [p["cost_per_resolved"] for p in curve.to_json()["points"]] == ["0.008280", "0.001380"]
    assert list(curve.arms) == ["builtin × tiny"]
    assert learning_curve(platform, "nobody").points == []


def test_learning_curve_refuses_mixed_currencies() -> None:
    cad = summarize(HEAD, fixed_records(), to_cad)
    usd = summarize(
        HEAD.model_copy(update={"id": "t2", "currency": "USD"}), fixed_records(), to_cad
    )
    with pytest.raises(ValueError, match=r"several currencies \(CAD, USD\)"):
        curve_from_reports([cad, usd], "demo")


# -- local share of tokens (local-first routing) ----------------------------------------------


def test_local_share_per_arm_and_overall_on_fixed_data() -> None:
    records = [
        replace(run(1, "builtin", "tiny", "resolved"), tokens=100, local_tokens=100),
        replace(run(2, "builtin", "tiny", "unresolved"), tokens=300, local_tokens=200),
        replace(run(3, "aider", "tiny", "resolved"), tokens=400, local_tokens=0),
        replace(run(4, "aider", "tiny:thinking", None, state="queued"), tokens=0),
    ]
    report = summarize(HEAD, records, to_cad)
    assert (
        row(report, "builtin", "tiny").local_tokens,
        row(report, "builtin", "tiny").local_share,
    ) == (300, 0.75)
    assert row(report, "aider", "tiny").local_share == 0.0
    assert row(report, "aider", "tiny:thinking").local_share is None  # no tokens yet
    assert report.local_share == LocalShare(local_tokens=300, local_share=0.375)
    console = Console(record=True, width=240)
    render(report, console)
    text = console.export_text()
    assert "75.0%" in text
    note = "Tokens served locally: 300 (37.5% of all metered tokens; target 85%)"
    assert note in text
    markdown = to_markdown(report).splitlines()
    assert note in markdown  # a paragraph of its own under the table, as on the console
    assert "| tokens | local |" in next(line for line in markdown if line.startswith("| agent"))
    builtin = next(line for line in markdown if line.startswith("| builtin | tiny |"))
    assert "| 400 | 75.0% |" in builtin


def test_build_counts_local_tokens_by_provider(
    platform: Platform, demo_trial: dict[str, Any]
) -> None:
    trial_id = add_trial(
        platform,
        demo_trial,
        "report-local",
        dt.datetime(2025, 3, 1, 10),
        [("builtin", "tiny", "resolved", "finished", "0.001")],
    )
    spool = Spool(DataRoot.at(platform.settings.data))
    spool.append(
        llm_call(
            trial_id,
            f"{trial_id}-000",
            "gpt-4o-mini",
            "0.0001",
            url="https://api.openai.com/v1/chat/completions",
            provider="openai",
            tokens=(100, 50),
        )
    )
    spool.close()
    report = build(platform, trial_id)
    arm = row(report, "builtin", "tiny")
    assert (arm.tokens, arm.local_tokens, arm.local_share) == (200, 50, 0.25)
    assert report.local_share == LocalShare(local_tokens=50, local_share=0.25)


def test_build_counts_provider_errors_per_provider_by_status(
    platform: Platform, demo_trial: dict[str, Any]
) -> None:
    """The trial's calls per provider, and those whose answer fell short as the capture
    record's `upstream_error` names them (429, 529 overloaded, a cut stream), in every output."""
    trial_id = add_trial(
        platform,
        demo_trial,
        "report-providers",
        dt.datetime(2025, 3, 1, 10),
        [("claude-code", "anthropic/claude-sonnet-4-5", "resolved", "finished", "0.001")],
    )
    aid = f"{trial_id}-000"
    anthropic = llm_call(
        trial_id, aid, "claude-sonnet-4-5", "0.001",
        url="https://api.anthropic.com/v1/messages", provider="anthropic",
    )  # fmt: skip
    failed = {"usage": None, "cost_usd": Decimal(0)}
    spool = Spool(DataRoot.at(platform.settings.data))
    for update in (
        {"status": 429, "upstream_error": "rate_limit_error", **failed},
        {"status": 529, "upstream_error": "overloaded_error", **failed},
        {"status": 529, "upstream_error": "overloaded_error", **failed},
        {"status": 200, "upstream_error": "stream_cut", "error": "peer closed connection"},
    ):
        spool.append(anthropic.model_copy(update={"id": uuid.uuid4().hex, **update}))
    spool.close()
    report = build(platform, trial_id)
    assert [p.model_dump() for p in report.providers] == [
        {"provider": "anthropic", "calls": 4, "failed": 4, "errors": [
            {"status": 200, "error": "stream_cut", "calls": 1},
            {"status": 429, "error": "rate_limit_error", "calls": 1},
            {"status": 529, "error": "overloaded_error", "calls": 2},
        ]},
        {"provider": "local", "calls": 1, "failed": 0, "errors": []},
    ]  # fmt: skip
    line = (
        "Provider anthropic: 4 calls, 4 fell short "
        "(1 × 200 stream_cut, 1 × 429 rate_limit_error, 2 × 529 overloaded_error)"
    )
    console = Console(record=True, width=220)
    render(report, console)
    assert line in console.export_text()
    assert f"- {line}" in to_markdown(report)
    assert report.to_json()["providers"][1] == {
        "provider": "local", "calls": 1, "failed": 0, "errors": [],
    }  # fmt: skip
