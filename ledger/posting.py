"""Post metered usage to a project's ledger by the hour, exactly once; post worker VM-hours.

Usage is read from the traffic index in spool order. Every spool file
(`traffic-logs/<project>/<day>/flows.jsonl`, one per UTC day of the flows' start) has a
watermark in the ledger itself: the `spool-to` metadata of the latest usage transaction that
names it, an exclusive bound on the byte offsets of the flows already posted. A posting takes
the flows past the watermark, groups them by UTC hour of their start × machine × provider ×
model, and writes one transaction per group, with one expense leg per assignment in it; the
new watermark is written in those same transactions, in one atomic file replace, under the
ledger's lock. So a crash never double posts, a flow indexed late (past the watermark, however
old its hour) is posted by the next call, and a rebuilt index changes nothing (offsets are
facts of the spool, not of the index).

A flow indexed after its hour was posted lands in a second transaction for the same hour ×
machine × model, with its own offsets. A transaction is dated by its hour, or by the budget's
latest balance assertion when the hour is older (`hour` keeps the truth).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from contracts.dataroot import DataRoot
from contracts.results import SpecLabels
from ledger.book import (
    COMPUTE_META,
    PRICE_CURRENCY,
    QUANTUM,
    SPOOL_META,
    SPOOL_TO_META,
    Ledger,
    LedgerError,
    MetaAmount,
    inference_account,
    render_transaction,
    vm_account,
)
from traffic.stores import HOUR_S, MeteredFlows, SpooledFlow

AgentOf = Callable[[str | None, str | None], str | None]
"""(trial, assignment) → agent name, or None when unknown."""


@dataclass(frozen=True)
class Posted:
    """What one call posted: transactions written, flows they cover, their USD."""

    transactions: int
    flows: int
    usd: Decimal


def spooled(index: MeteredFlows, project: str) -> dict[str, list[SpooledFlow]]:
    """The project's stored flows per spool file, in spool order."""
    found: dict[str, list[SpooledFlow]] = defaultdict(list)
    for flow in index.spooled(project):
        found[flow.spool_file].append(flow)
    return dict(found)


def spool_day(spool: str) -> dt.date:
    """The day of a spool file key, `<project>/<YYYY-MM-DD>/flows.jsonl`."""
    return dt.date.fromisoformat(Path(spool).parent.name)


def agents_from_artifacts(root: DataRoot, project: str) -> AgentOf:
    """Agent names from each assignment's `spec.json` under worker-artifacts (cached)."""
    cache: dict[tuple[str, str], str | None] = {}

    def agent_of(trial: str | None, assignment: str | None) -> str | None:
        if trial is None or assignment is None:
            return None
        if (trial, assignment) not in cache:
            spec = root.assignment_dir(project, trial, assignment) / "spec.json"
            try:
                cache[(trial, assignment)] = SpecLabels.model_validate_json(spec.read_text()).agent
            except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
                cache[(trial, assignment)] = None
        return cache[(trial, assignment)]

    return agent_of


def post_usage(
    ledger: Ledger,
    index: MeteredFlows,
    project: str,
    *,
    until: float | None = None,
    agent_of: AgentOf | None = None,
) -> Posted:
    """Post the project's indexed usage past each spool file's watermark.

    `until` (a UNIX time) posts only closed hours: each spool file's flows up to the first one
    whose hour ends after `until`; None posts everything indexed (a flush).
    """
    flows_by_spool = spooled(index, project)
    agent_of = agent_of or (lambda _trial, _assignment: None)
    transactions = flows = 0
    usd = Decimal(0)
    with ledger.writing() as w:
        budget, currency = w.opened()
        for spool, spool_flows in sorted(flows_by_spool.items()):
            mark = w.watermark(spool, spool_day(spool))
            batch: list[SpooledFlow] = []
            for f in spool_flows:
                if f.spool_offset < mark:
                    continue
                if until is not None and f.hour.timestamp() + HOUR_S > until:
                    break  # the prefix stops at the first flow of an open hour
                batch.append(f)
            # Only LLM calls are expenses; other flows move the watermark with them.
            priced = [f for f in batch if f.provider and f.model]
            if not priced:
                continue
            groups: dict[tuple[dt.datetime, str, str, str], list[SpooledFlow]] = defaultdict(list)
            for f in priced:
                groups[(f.hour, f.machine or "unknown", f.provider or "", f.model or "")].append(f)
            span = {
                SPOOL_META: spool,
                "spool-from": mark,
                SPOOL_TO_META: batch[-1].spool_offset + 1,
            }
            for (hour, machine, provider, model), group in sorted(groups.items()):
                on = max(hour.date(), w.earliest(budget.account))
                rate = w.rate(on)
                account = inference_account(provider, model)
                w.open_account(account, budget.date, currency)
                legs = _legs(group, account, rate, agent_of)
                total = sum((leg[1] for leg in legs), Decimal(0))
                meta: dict[str, Any] = {
                    "hour": f"{hour:%Y-%m-%dT%H:00Z}",
                    "machine": machine,
                    **span,
                    "flows": len(group),
                    "first-flow": group[0].id,
                    "last-flow": group[-1].id,
                }
                narration = f"Usage {hour:%Y-%m-%d %H}h on {machine}: {provider} {model}"
                w.add(
                    render_transaction(
                        on, narration, meta, [*legs, (budget.account, -total, {})], currency
                    )
                )
                transactions += 1
                flows += len(group)
                usd += sum((f.cost_usd for f in group), Decimal(0))
    return Posted(transactions, flows, usd)


def _legs(
    group: Iterable[SpooledFlow], account: str, rate: Decimal, agent_of: AgentOf
) -> list[tuple[str, Decimal, Mapping[str, Any]]]:
    """One expense leg per assignment (or none) of a group, with its USD, tokens and agent."""
    by_assignment: dict[tuple[str | None, str | None], list[SpooledFlow]] = defaultdict(list)
    for f in group:
        by_assignment[(f.trial, f.assignment)].append(f)
    legs: list[tuple[str, Decimal, Mapping[str, Any]]] = []
    for (trial, assignment), flows in sorted(by_assignment.items(), key=lambda kv: str(kv[0])):
        usd = sum((f.cost_usd for f in flows), Decimal(0))
        meta: dict[str, Any] = {}
        if assignment is not None:
            meta["assignment"] = assignment
        if trial is not None:
            meta["trial"] = trial
        agent = agent_of(trial, assignment)
        if agent is not None:
            meta["agent"] = agent
        meta |= {
            "usd": MetaAmount(usd, PRICE_CURRENCY),
            "tokens": sum(f.tokens for f in flows),
            "flows": len(flows),
        }
        legs.append((account, (usd * rate).quantize(QUANTUM, rounding=ROUND_HALF_UP), meta))
    return legs


def post_vm_hours(
    ledger: Ledger,
    *,
    assignment: str,
    trial: str,
    agent: str,
    machine: str,
    driver: str,
    seconds: float,
    usd_per_hour: Decimal,
    on: dt.date,
) -> bool:
    """Post an assignment's worker VM time to `Expenses:Compute:VM:<machine>`, once.

    Nothing is posted when it costs nothing (the local driver's default price is 0).
    """
    if seconds < 0 or usd_per_hour < 0:
        raise LedgerError(f"VM time of {assignment}: seconds and price must be ≥ 0")
    usd = (usd_per_hour * Decimal(str(round(seconds, 3))) / HOUR_S).quantize(
        Decimal("0.000000001"), rounding=ROUND_HALF_UP
    )
    if usd == 0:
        return False
    with ledger.writing() as w:
        if w.has_meta(COMPUTE_META, assignment):
            return False
        budget, currency = w.opened()
        when = max(on, w.earliest(budget.account))
        account = vm_account(machine)
        w.open_account(account, budget.date, currency)
        amount = (usd * w.rate(when)).quantize(QUANTUM, rounding=ROUND_HALF_UP)
        leg = {
            "assignment": assignment,
            "trial": trial,
            "agent": agent,
            "machine": machine,
            "driver": driver,
            "seconds": Decimal(str(round(seconds, 3))),
            "usd": MetaAmount(usd, PRICE_CURRENCY),
            "vm-hour": MetaAmount(usd_per_hour, PRICE_CURRENCY),
        }
        w.add(
            render_transaction(
                when,
                f"VM time of {assignment} on {machine} ({driver})",
                {COMPUTE_META: assignment},
                [(account, amount, leg), (budget.account, -amount, {})],
                currency,
            )
        )
    return w.changed
