"""Profit and loss from the project ledgers: per project, per machine, per agent.

Expenses are postings under `Expenses`; each is attributed to the machine and the agent named
in its posting metadata, else in its transaction's (hourly usage names the machine on the
transaction and the agent on each assignment's leg, read from the assignment's `spec.json` when
it was posted; see `ledger.posting`). Revenue is `Income:Revenue:…` (beancount
keeps income negative; here it is shown positive). Profit is revenue minus expenses.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from beancount.core import data

from ledger.book import REVENUE_ROOT, Ledger, is_spend

NONE = "-"
"""Where a posting names no machine or agent (revenue, budget grants)."""


@dataclass(frozen=True)
class Row:
    project: str
    currency: str
    revenue: Decimal
    expenses: Decimal

    @property
    def profit(self) -> Decimal:
        return self.revenue - self.expenses


@dataclass(frozen=True)
class ProfitAndLoss:
    """Rows keyed by (project, machine or agent); `by_project` has one per project."""

    by_project: list[Row]
    by_machine: dict[tuple[str, str], Row]
    by_agent: dict[tuple[str, str], Row]


def profit_and_loss(ledgers: Iterable[tuple[str, Ledger]]) -> ProfitAndLoss:
    """P&L of each `(project, ledger)`, in each ledger's primary currency."""
    projects: list[Row] = []
    machines: dict[tuple[str, str], Row] = {}
    agents: dict[tuple[str, str], Row] = {}
    for project, ledger in ledgers:
        entries, options = ledger.load()
        currency = str(options["operating_currency"][0])
        revenue = Decimal(0)
        expenses = Decimal(0)
        by_machine: dict[str, list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
        by_agent: dict[str, list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
        for t in entries:
            if not isinstance(t, data.Transaction):
                continue
            for p in t.postings:
                if p.units is None or p.units.currency != currency or p.units.number is None:
                    continue
                machine = str((p.meta or {}).get("machine", t.meta.get("machine", NONE)))
                agent = str((p.meta or {}).get("agent", t.meta.get("agent", NONE)))
                number = Decimal(p.units.number)
                if is_spend(p.account):
                    slot, amount = 1, number
                    expenses += number
                elif p.account.startswith(REVENUE_ROOT + ":"):
                    slot, amount = 0, -number
                    revenue -= number
                else:
                    continue
                by_machine[machine][slot] += amount
                by_agent[agent][slot] += amount
        projects.append(Row(project, currency, revenue, expenses))
        for name, (rev, exp) in by_machine.items():
            machines[(project, name)] = Row(project, currency, rev, exp)
        for name, (rev, exp) in by_agent.items():
            agents[(project, name)] = Row(project, currency, rev, exp)
    return ProfitAndLoss(projects, dict(sorted(machines.items())), dict(sorted(agents.items())))
