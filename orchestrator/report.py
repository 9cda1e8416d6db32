"""The trial report: per agent × model pair, what was solved and what it cost."""

from __future__ import annotations

import statistics
from collections import defaultdict
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.platform import Platform
from orchestrator.state import Trial


def build(platform: Platform, trial_id: str) -> dict[str, Any]:
    """Rows per (agent, model pair) from the state DB and the proxy's metering."""
    with platform.store.session() as s:
        trial = s.get_one(Trial, trial_id)
        currency = trial.config["budget"]["currency"]
        assignments = [
            (a.id, a.agent, a.model, a.state, a.status, (a.result or {}).get("wall_s"))
            for a in trial.assignments
        ]
        head = {
            "id": trial.id,
            "name": trial.name,
            "project": trial.project,
            "status": trial.status,
            "currency": currency,
        }
    groups: dict[tuple[str, str], dict[str, Any]] = defaultdict(
        lambda: {
            "assignments": 0,
            "resolved": 0,
            "partial": 0,
            "unresolved": 0,
            "errors": 0,
            "tokens": 0,
            "calls": 0,
            "cost_usd": Decimal(0),
            "wall": [],
        }
    )
    for aid, agent, model, state, status, wall_s in assignments:
        g = groups[(agent, model)]
        g["assignments"] += 1
        if status in ("resolved", "partial", "unresolved"):
            g[status] += 1
        elif state in ("failed", "cancelled"):
            g["errors"] += 1
        if wall_s is not None:
            g["wall"].append(float(wall_s))
        for u in platform.usage(assignment=aid):
            g["tokens"] += u.total_tokens
            g["calls"] += u.calls
            g["cost_usd"] += u.cost_usd
    rows = []
    for (agent, model), g in sorted(groups.items()):
        cost = platform.in_currency(g["cost_usd"], currency)
        rows.append(
            {
                "agent": agent,
                "model": model,
                "assignments": g["assignments"],
                "resolved": g["resolved"],
                "partial": g["partial"],
                "unresolved": g["unresolved"],
                "errors": g["errors"],
                "success_rate": round(g["resolved"] / g["assignments"], 4),
                "llm_calls": g["calls"],
                "tokens": g["tokens"],
                "cost": str(cost),
                "cost_usd": str(g["cost_usd"]),
                "cost_per_resolved": str((cost / g["resolved"]).quantize(Decimal("0.000001")))
                if g["resolved"]
                else None,
                "wall_s_median": round(statistics.median(g["wall"]), 2) if g["wall"] else None,
                "wall_s_total": round(sum(g["wall"]), 2),
            }
        )
    total_usd = sum((Decimal(r["cost_usd"]) for r in rows), start=Decimal(0))
    return {
        **head,
        "rows": rows,
        "total_cost": str(platform.in_currency(total_usd, currency)),
        "total_cost_usd": str(total_usd),
    }


def render(report: dict[str, Any], console: Console) -> None:
    cur = report["currency"]
    table = Table(title=f"Trial {report['name']} ({report['id']}) — {report['status']}")
    for col in (
        "agent",
        "model pair",
        "runs",
        "resolved",
        "partial",
        "success",
        "LLM calls",
        "tokens",
        f"cost {cur}",
        f"{cur} / resolved",
        "wall s (median)",
    ):
        table.add_column(col, justify="left" if col in ("agent", "model pair") else "right")
    for r in report["rows"]:
        table.add_row(
            r["agent"],
            r["model"],
            str(r["assignments"]),
            str(r["resolved"]),
            str(r["partial"]),
            f"{r['success_rate']:.0%}",
            str(r["llm_calls"]),
            str(r["tokens"]),
            f"{Decimal(r['cost']):.6f}",
            f"{Decimal(r['cost_per_resolved']):.6f}" if r["cost_per_resolved"] else "—",
            str(r["wall_s_median"] if r["wall_s_median"] is not None else "—"),
        )
    console.print(table)
    console.print(
        f"Total metered spend: {Decimal(report['total_cost']):.6f} {cur} "
        f"({Decimal(report['total_cost_usd']):.6f} USD)"
    )
