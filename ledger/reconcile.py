"""Reconcile a project's ledger with metered usage: every assignment's spend, to the cent.

The traffic index holds every flow with its `cost_usd`; the orchestrator posts each
assignment's spend as one transaction keyed by the assignment id. Reconciling sums the index
per assignment, converts it at the rate the ledger recorded (the price directive in force on
the posting's date), and compares it with the ledger's postings per key.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Literal

from ledger.book import QUANTUM, Ledger
from proxy.index import TrafficIndex

TOLERANCE = Decimal("0.005")
"""Half a cent of the primary currency: what rounding per posting may leave, and no more."""

Kind = Literal["match", "missing", "extra", "amount", "unattributed"]


@dataclass(frozen=True)
class Line:
    """One assignment (or the flows of none) compared; `kind` says how it stands."""

    key: str
    kind: Kind
    metered: Decimal
    """The index's cost, in the primary currency."""
    posted: Decimal
    """The ledger's expenses under this key, in the primary currency."""
    metered_usd: Decimal

    @property
    def difference(self) -> Decimal:
        return self.posted - self.metered

    def describe(self, currency: str) -> str:
        what = {
            "match": "matches",
            "missing": "metered but not posted",
            "extra": "posted but never metered",
            "amount": "amount differs",
            "unattributed": "metered with no assignment, cannot be posted",
        }[self.kind]
        return (
            f"{self.key}: {what}: ledger {self.posted:f} {currency}, "
            f"metered {self.metered:f} {currency} ({self.metered_usd:f} USD), "
            f"difference {self.difference:+f}"
        )


@dataclass(frozen=True)
class Reconciliation:
    project: str
    currency: str
    lines: list[Line]

    @property
    def mismatches(self) -> list[Line]:
        return [line for line in self.lines if line.kind != "match"]

    @property
    def ok(self) -> bool:
        return not self.mismatches


UNATTRIBUTED = "(no assignment)"


def reconcile(ledger: Ledger, index: TrafficIndex, project: str) -> Reconciliation:
    """Compare the index's spend per assignment of `project` with the ledger's keyed postings."""
    currency = ledger.currency()
    posted = ledger.keyed()
    metered: dict[str, Decimal] = defaultdict(Decimal)
    for flow in index.flows(project=project):
        metered[flow.assignment or UNATTRIBUTED] += flow.cost_usd
    today = dt.date.today()
    lines: list[Line] = []
    for key in sorted(set(metered) | set(posted)):
        usd = metered.get(key, Decimal(0))
        entry = posted.get(key)
        rate = ledger.fx_rate(entry.date if entry is not None else today)
        amount = (usd * rate).quantize(QUANTUM, rounding=ROUND_HALF_UP)
        booked = entry.amount if entry is not None else Decimal(0)
        kind: Kind
        if key == UNATTRIBUTED:
            kind = "unattributed" if usd else "match"
        elif entry is None:
            # An assignment whose calls cost nothing has nothing to post.
            kind = "missing" if amount else "match"
        elif key not in metered:
            kind = "extra"
        elif abs(booked - amount) > TOLERANCE:
            kind = "amount"
        else:
            kind = "match"
        lines.append(Line(key, kind, amount, booked, usd))
    return Reconciliation(project, currency, lines)
