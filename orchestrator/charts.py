"""PNG charts of a trial report and of a project's learning curve (matplotlib, Agg canvas).

Figures are built with `matplotlib.figure.Figure` on an Agg canvas, never through pyplot, so
no global backend or figure registry is touched and a server thread can draw safely.
"""

from __future__ import annotations

import math
from decimal import Decimal
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from contracts.reports import CurvePoint, LearningCurve, TrialReport
from orchestrator.report import arm_name

DPI = 120
UNSOLVED_COLOUR = "#b0b0b0"
BAR_COLOUR = "#3b75af"


def cost_chart(report: TrialReport, path: Path) -> Path:
    """Cost per resolved task per arm, beside its success rate with the 95 % Wilson interval."""
    rows = sorted(
        report.rows,
        # Cheapest success on top; arms that resolved nothing at the bottom.
        key=lambda r: (
            r.cost_per_resolved is None,
            r.cost_per_resolved or 0,
            arm_name(r.agent, r.model),
        ),
        reverse=True,
    )
    labels = [arm_name(r.agent, r.model) for r in rows]
    y = list(range(len(rows)))
    fig = Figure(figsize=(11, 1.6 + 0.55 * max(len(rows), 1)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    cost_ax, rate_ax = fig.subplots(1, 2, sharey=True, width_ratios=[3, 2])
    cur = report.currency

    values = [float(r.cost_per_resolved) if r.cost_per_resolved else 0.0 for r in rows]
    top = max(values, default=0.0) or 1.0
    cost_ax.barh(y, values, color=BAR_COLOUR, height=0.6)
    for yi, r, v in zip(y, rows, values, strict=True):
        if r.cost_per_resolved is None:
            text, colour = f"nothing resolved (spent {float(r.cost):.4g} {cur})", "#666666"
        else:
            text, colour = f"{v:.4g} {cur}", "black"
        cost_ax.text(v + top * 0.01, yi, text, va="center", fontsize=9, color=colour)
    cost_ax.set_xlim(0, top * 1.45)
    cost_ax.set_yticks(y, labels)
    cost_ax.set_xlabel(f"cost per resolved task ({cur})")
    cost_ax.set_title("Cost per resolved task (lower is better)", fontsize=11)
    cost_ax.grid(axis="x", alpha=0.3)

    for yi, r in zip(y, rows, strict=True):
        low, high = r.success_ci95
        rate = r.success_rate
        colour = BAR_COLOUR if r.resolved else UNSOLVED_COLOUR
        rate_ax.plot([low, high], [yi, yi], color=colour, linewidth=2)
        rate_ax.plot([low, high], [yi, yi], "|", color=colour, markersize=12)
        if rate is not None:
            rate_ax.plot([rate], [yi], "o", color=colour, markersize=7)
        rate_ax.text(
            1.02, yi, f"{r.resolved}/{r.n}", va="center", fontsize=9,
            transform=rate_ax.get_yaxis_transform(),
        )  # fmt: skip
    rate_ax.set_xlim(0, 1)
    rate_ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    rate_ax.set_xlabel("success rate, 95 % Wilson interval")
    rate_ax.set_title("Resolved / graded runs", fontsize=11)
    rate_ax.grid(axis="x", alpha=0.3)
    rate_ax.set_ylim(-0.7, len(rows) - 0.3)

    fig.suptitle(f"Trial {report.name} ({report.id})", fontsize=13)
    fig.savefig(path, format="png")
    return path


def learning_curve_chart(curve: LearningCurve, path: Path) -> Path:
    """Success rate (with its Wilson band) and cost per success, trial after trial."""
    points = curve.points
    x = list(range(len(points)))
    ticks = [f"{p.name}\n{p.created_at[:10]}" for p in points]
    fig = Figure(figsize=(10, 7), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    rate_ax, cost_ax = fig.subplots(2, 1, sharex=True)

    order = {p.trial: i for i, p in enumerate(points)}
    # Only the overall rate gets its interval band: one band per arm would bury the lines.
    lows = [p.success_ci95[0] for p in points]
    highs = [p.success_ci95[1] for p in points]
    if len(points) > 1:
        rate_ax.fill_between(
            x, lows, highs, color="black", alpha=0.1, label="all runs, 95 % Wilson interval"
        )
    else:  # a band of one point is invisible
        rate_ax.vlines(
            x, lows, highs, color="black", alpha=0.3, linewidth=6,
            label="all runs, 95 % Wilson interval",
        )  # fmt: skip
    series: list[tuple[str, list[CurvePoint], str | None, float]]
    series = [("all runs", points, "black", 2.5)]
    series += [(name, arm, None, 1.5) for name, arm in curve.arms.items()]
    for label, pts, colour, width in series:
        xs = [order[p.trial] for p in pts]
        (line,) = rate_ax.plot(
            xs, [_nan(p.success_rate) for p in pts], "o-", label=label, color=colour,
            linewidth=width,
        )  # fmt: skip
        cost_ax.plot(
            xs, [_nan(p.cost_per_resolved) for p in pts], "o-", label=label,
            color=line.get_color(), linewidth=width,
        )  # fmt: skip
    _style(rate_ax, "success rate")
    rate_ax.set_title("Resolved / graded runs per trial", fontsize=11)
    rate_ax.set_ylim(0, 1)
    rate_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    rate_ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1))
    _style(cost_ax, f"{curve.currency} per resolved task")
    cost_ax.set_title("Cost per resolved task (no point where nothing was resolved)", fontsize=11)
    costs = [
        float(p.cost_per_resolved)
        for pts in (points, *curve.arms.values())
        for p in pts
        if p.cost_per_resolved is not None
    ]
    cost_ax.set_ylim(0, max(costs, default=1.0) * 1.12 or 1.0)
    cost_ax.set_xticks(x, ticks, fontsize=9)
    cost_ax.set_xlim(-0.3, max(len(points) - 0.7, 0.3))
    fig.suptitle(f"Learning curve of project {curve.project}", fontsize=13)
    fig.savefig(path, format="png")
    return path


def _style(ax: Axes, ylabel: str) -> None:
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _nan(value: float | Decimal | None) -> float:
    return math.nan if value is None else float(value)
