"""Reconcile a project's ledger with metered usage: every assignment's spend, to the cent.

The traffic index holds every flow with its `cost_usd`; usage is posted hourly (`ledger.posting`)
with one expense leg per assignment, each carrying its metered `usd`. Reconciling sums the index
per assignment and compares it with the ledger's legs: the USD exactly, and the amount in the
primary currency within half a cent of each leg's USD at the rate in force on its date. Flows
past their spool file's watermark are not posted yet (their hour is still open): they are
reported as pending, not as a difference. Transactions keyed by assignment (`key` metadata,
`Ledger.post_inference`) count for that assignment.

Payments are reconciled with the attempt log (`financial/<project>/transactions.json`): every
completed payment must be one transaction marked with its id, booking its price and fee
(`amount_primary` + `fee_primary`; a sandbox charge its price alone, under Expenses:Sandbox),
every failed attempt that spent a fee one transaction `<id>/<attempt>` of that fee, and the
ledger may hold no payment the log does not know.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

from beancount.core import data

from ledger.book import (
    INFERENCE_ROOT,
    KEY_META,
    PAYMENT_META,
    QUANTUM,
    SPOOL_META,
    SPOOL_TO_META,
    Ledger,
    LedgerError,
    _Book,
)
from ledger.posting import spooled
from traffic.stores import MeteredFlows

TOLERANCE = Decimal("0.005")
"""Half a cent of the primary currency: what rounding per posting may leave, and no more."""

USD_NOISE = Decimal("1e-12")
"""Summing 28-digit decimals (a local model's per-token prices do not terminate) in another
order rounds differently far below a cent; USD differences under this are that, not money."""

Kind = Literal["match", "pending", "missing", "extra", "amount"]


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
    pending_usd: Decimal = Decimal(0)
    """Metered but not posted yet: past the watermark of its spool file (an open hour)."""

    @property
    def difference(self) -> Decimal:
        return self.posted - self.metered

    def describe(self, currency: str) -> str:
        what = {
            "match": "matches",
            "pending": "matches what is posted; the rest waits for its hour to close",
            "missing": "metered but not posted",
            "extra": "posted but never metered",
            "amount": "amount differs",
        }[self.kind]
        pending = f", {self.pending_usd:f} USD pending" if self.pending_usd else ""
        return (
            f"{self.key}: {what}: ledger {self.posted:f} {currency}, "
            f"metered {self.metered:f} {currency} ({self.metered_usd:f} USD{pending}), "
            f"difference {self.difference:+f}"
        )


@dataclass(frozen=True)
class PaymentLine:
    """One payment (or a failed attempt's fee) of the attempt log compared with the ledger."""

    key: str
    kind: Literal["match", "missing", "extra", "amount"]
    logged: Decimal
    """What the attempt log says was paid, fee included, in the primary currency."""
    posted: Decimal

    def describe(self, currency: str) -> str:
        what = {
            "match": "matches",
            "missing": "in the attempt log but not posted",
            "extra": "posted but not in the attempt log",
            "amount": "amount differs",
        }[self.kind]
        return (
            f"{self.key}: {what}: ledger {self.posted:f} {currency}, "
            f"attempt log {self.logged:f} {currency}"
        )


@dataclass(frozen=True)
class Reconciliation:
    project: str
    currency: str
    lines: list[Line]
    payments: list[PaymentLine] = field(default_factory=list)

    @property
    def mismatches(self) -> list[Line | PaymentLine]:
        usage = [line for line in self.lines if line.kind not in ("match", "pending")]
        return [*usage, *(p for p in self.payments if p.kind != "match")]

    @property
    def ok(self) -> bool:
        return not self.mismatches


def reconcile_payments(
    entries: Iterable[data.Directive], attempts: Sequence[Mapping[str, Any]]
) -> list[PaymentLine]:
    """The ledger's payment transactions against the attempt log's completed payments and
    the fees of its failed attempts."""
    logged: dict[str, Decimal] = {}
    for a in attempts:
        fee = Decimal(a.get("fee_primary") or 0)
        if a["status"] == "completed":
            price = Decimal(a["amount_primary"])
            logged[a["id"]] = price + fee if a.get("charged", True) else price
        elif a["status"] == "failed" and fee:
            logged[f"{a['id']}/{a.get('attempt', 1)}"] = fee
    posted: dict[str, Decimal] = {}
    for t in entries:
        if isinstance(t, data.Transaction) and PAYMENT_META in t.meta:
            posted[str(t.meta[PAYMENT_META])] = sum(
                (
                    Decimal(p.units.number or 0)
                    for p in t.postings
                    if p.account.startswith("Expenses:") and p.units is not None
                ),
                Decimal(0),
            )
    lines = []
    for key in sorted(set(logged) | set(posted)):
        kind: Literal["match", "missing", "extra", "amount"]
        if key not in posted:
            kind = "missing"
        elif key not in logged:
            kind = "extra"
        else:
            kind = "match" if abs(posted[key] - logged[key]) <= TOLERANCE else "amount"
        zero = Decimal(0)
        lines.append(PaymentLine(key, kind, logged.get(key, zero), posted.get(key, zero)))
    return lines


UNATTRIBUTED = "(no assignment)"


@dataclass
class _Side:
    usd: Decimal = Decimal(0)
    amount: Decimal = Decimal(0)
    expected: Decimal = Decimal(0)
    """Each leg's USD at the rate of its date, rounded as the leg was."""


def reconcile(
    ledger: Ledger,
    index: MeteredFlows,
    project: str,
    attempts: Sequence[Mapping[str, Any]] = (),
) -> Reconciliation:
    """Compare the index's spend per assignment of `project` with the ledger's inference legs,
    and the ledger's payments with the attempt log's `attempts`."""
    entries, options = ledger.load()
    currency = str(options["operating_currency"][0])
    book = _Book(entries, options)

    def rate(on: dt.date) -> Decimal:
        if currency == "USD":
            return Decimal(1)
        found = book.latest_rate(currency, on)
        if found is None:
            raise LedgerError(f"{ledger.path} has no price of USD in {currency} by {on}")
        return found

    posted: dict[str, _Side] = defaultdict(_Side)
    marks: dict[str, int] = {}
    for t in entries:
        if not isinstance(t, data.Transaction):
            continue
        if SPOOL_META in t.meta:
            spool = str(t.meta[SPOOL_META])
            marks[spool] = max(marks.get(spool, 0), int(t.meta[SPOOL_TO_META]))
        for p in t.postings:
            usd = (p.meta or {}).get("usd")
            if not p.account.startswith(INFERENCE_ROOT + ":") or not isinstance(usd, data.Amount):
                continue
            key = str((p.meta or {}).get("assignment") or t.meta.get(KEY_META) or UNATTRIBUTED)
            number = Decimal(usd.number or 0)
            side = posted[key]
            side.usd += number
            side.amount += Decimal(p.units.number or 0) if p.units else Decimal(0)
            side.expected += (number * rate(t.date)).quantize(QUANTUM, rounding=ROUND_HALF_UP)

    metered: dict[str, Decimal] = defaultdict(Decimal)
    pending: dict[str, Decimal] = defaultdict(Decimal)
    for spool, flows in spooled(index, project).items():
        for f in flows:
            key = f.assignment or UNATTRIBUTED
            metered[key] += f.cost_usd
            if f.spool_offset >= marks.get(spool, 0):
                pending[key] += f.cost_usd

    today = rate(dt.date.today())
    lines: list[Line] = []
    for key in sorted(set(metered) | set(posted)):
        side = posted.get(key, _Side())
        usd, waiting = metered.get(key, Decimal(0)), pending.get(key, Decimal(0))
        unposted = usd - waiting - side.usd
        amount = side.expected + (unposted * today).quantize(QUANTUM, rounding=ROUND_HALF_UP)
        kind: Kind
        if key not in metered:
            kind = "extra" if side.usd or side.amount else "match"
        elif unposted > USD_NOISE:
            kind = "missing" if not side.usd else "amount"
        elif unposted < -USD_NOISE or abs(side.amount - side.expected) > TOLERANCE:
            kind = "amount"
        else:
            kind = "pending" if waiting else "match"
        lines.append(Line(key, kind, amount, side.amount, usd, waiting))
    return Reconciliation(project, currency, lines, reconcile_payments(entries, attempts))
