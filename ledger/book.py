"""A project's beancount ledger: validated, atomic, serialized writes; reads through beancount.

Every write takes an exclusive `flock` on `ledger.beancount.lock`, re-reads the file, appends
directives, validates the whole new text with beancount, and replaces the file atomically
(temp file, fsync, rename, fsync of the directory). A refused or interrupted write leaves the
previous, valid file in place.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from beancount import loader
from beancount.core import data

from contracts.dataroot import DataRoot, atomic_write

BUDGET_ROOT = "Assets:Budget"
FUNDING_ACCOUNT = "Equity:Budget:Funding"
INFERENCE_ROOT = "Expenses:Inference"
PRICE_CURRENCY = "USD"
"""Provider prices and fx rates are quoted in USD (see `PriceCatalog`)."""
QUANTUM = Decimal("0.000001")
"""Ledger amounts keep 6 decimals: a local model's request costs a fraction of a cent."""
PURCHASES_ROOT = "Expenses:Purchases"
REVENUE_ROOT = "Income:Revenue"
RECEIPTS_ROOT = "Assets:Receipts"
"""Revenue lands here, not in the budget: granting it as budget is the operator's decision."""
KEY_META = "key"
FUNDING_META = "funding"
PAYMENT_META = "payment"
REVENUE_META = "revenue"

_CURRENCY = re.compile(r"^[A-Z]{3}$")  # as `contracts.config.Currency`
_META_KEY = re.compile(r"^[a-z][A-Za-z0-9_-]*$")
_RESERVED_META = {KEY_META, FUNDING_META, PAYMENT_META, REVENUE_META, "filename", "lineno"}


class LedgerError(Exception):
    """A ledger change was refused, or the ledger cannot be read; the file on disk is unchanged."""


@dataclass(frozen=True)
class InferenceItem:
    """Metered usage of one model on one machine, priced in USD."""

    provider: str
    model: str
    machine: str
    usd: Decimal
    tokens: int
    fx: Decimal
    """How much of the ledger's primary currency one USD buys (`PriceCatalog.fx[currency]`)."""

    def amount(self) -> Decimal:
        """The cost in the primary currency, quantized to 6 decimals."""
        return (self.usd * self.fx).quantize(QUANTUM, rounding=ROUND_HALF_UP)


def account_component(name: str) -> str:
    """A valid beancount account component: `tiny:thinking` → `Tiny-thinking`."""
    cleaned = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    if not cleaned:
        raise LedgerError(f"cannot make an account name from {name!r}: it has no letter or digit")
    return cleaned[0].upper() + cleaned[1:]


def budget_account(project: str) -> str:
    return f"{BUDGET_ROOT}:{account_component(project)}"


def inference_account(provider: str, model: str) -> str:
    return f"{INFERENCE_ROOT}:{account_component(provider)}:{account_component(model)}"


def purchase_account(item: str) -> str:
    return f"{PURCHASES_ROOT}:{account_component(item)}"


def revenue_account(source: str) -> str:
    return f"{REVENUE_ROOT}:{account_component(source)}"


@dataclass(frozen=True)
class KeyedPosting:
    """A transaction posted under a `key` (one assignment's inference), as the ledger holds it."""

    key: str
    date: dt.date
    amount: Decimal
    """Its expenses, in the primary currency."""
    usd: Decimal
    """The sum of its postings' `usd` metadata."""


@dataclass
class _Book:
    """What a write needs to know about the ledger as it is now."""

    entries: list[data.Directive] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.entries

    @property
    def currency(self) -> str | None:
        currencies = self.options.get("operating_currency") or []
        return currencies[0] if currencies else None

    def opens(self) -> dict[str, data.Open]:
        return {e.account: e for e in self.entries if isinstance(e, data.Open)}

    def budget(self) -> data.Open | None:
        found = [o for a, o in self.opens().items() if a.startswith(BUDGET_ROOT + ":")]
        return found[0] if found else None

    def transactions(self) -> Iterator[data.Transaction]:
        return (e for e in self.entries if isinstance(e, data.Transaction))

    def posted_keys(self) -> set[str]:
        return {t.meta[KEY_META] for t in self.transactions() if KEY_META in t.meta}

    def tagged(self, name: str) -> set[str]:
        return {str(t.meta[name]) for t in self.transactions() if name in t.meta}

    def funding(self, name: str) -> data.Transaction | None:
        found = [t for t in self.transactions() if t.meta.get(FUNDING_META) == name]
        return found[0] if found else None

    def latest_rate(self, currency: str, on: dt.date) -> Decimal | None:
        prices = [
            p
            for p in self.entries
            if isinstance(p, data.Price)
            and p.currency == PRICE_CURRENCY
            and p.amount.currency == currency
            and p.date <= on
        ]
        # Sorted by date and file order, as beancount does: the last one is in force.
        return prices[-1].amount.number if prices else None


class Ledger:
    """The beancount ledger of one project, at `financial/<project>/ledger.beancount`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    @classmethod
    def of(cls, root: DataRoot, project: str) -> Ledger:
        return cls(root.ledger(project))

    # -- writes ------------------------------------------------------------------------------

    def open(
        self,
        project: str,
        budget_amount: Decimal,
        currency: str,
        fx: Mapping[str, Decimal],
        on: dt.date,
        *,
        funding: str = "initial",
    ) -> bool:
        """Create the ledger or add what it lacks: accounts, newer fx prices, the `funding` grant.

        A funding grant is recorded once per `funding` name; granting more budget needs a new
        name (a trial, a period). Returns whether the file changed.
        """
        if budget_amount < 0:
            raise LedgerError(f"budget amount must be ≥ 0, got {budget_amount}")
        bad_currencies = [c for c in [currency, *fx] if not _CURRENCY.match(c)]
        if bad_currencies:
            raise LedgerError(f"currencies are three capital letters (CAD), got {bad_currencies}")
        bad_rates = {c: r for c, r in fx.items() if r <= 0}
        if bad_rates:
            raise LedgerError(f"fx rates must be > 0, got {bad_rates}")
        budget = budget_account(project)

        def build(book: _Book) -> str:
            parts: list[str] = []
            if book.empty:
                parts.append(
                    f"; Ledger of project {project}, written by autovibe (ledger.book.Ledger).\n"
                    f'option "title" {_quote(project)}\n'
                    f'option "operating_currency" "{currency}"\n'
                )
            elif book.currency != currency:
                raise LedgerError(
                    f"{self.path}: primary currency is {book.currency}, not {currency}; "
                    "a ledger keeps the currency it was opened with"
                )
            existing = book.budget()
            if existing is not None and existing.account != budget:
                raise LedgerError(f"{self.path} is the ledger of {existing.account}, not {budget}")
            opened = existing.date if existing is not None else on
            opens = book.opens()
            parts += [
                _open(opened, a, currency) for a in (budget, FUNDING_ACCOUNT) if a not in opens
            ]
            for quote, rate in sorted(fx.items()):
                if quote != PRICE_CURRENCY and book.latest_rate(quote, on) != rate:
                    parts.append(f"{on} price {PRICE_CURRENCY} {rate:f} {quote}\n")
            granted = book.funding(funding)
            if granted is None:
                parts.append(
                    _transaction(
                        on,
                        f"Budget of {project}: {funding}",
                        {FUNDING_META: funding},
                        [(budget, budget_amount, {}), (FUNDING_ACCOUNT, -budget_amount, {})],
                        currency,
                    )
                )
            else:
                recorded = _sum_postings([granted], budget, currency)
                if recorded != budget_amount:
                    raise LedgerError(
                        f"{self.path}: funding {funding!r} is recorded as {recorded} {currency} "
                        f"on {granted.date}, not {budget_amount}; "
                        "add budget under a new funding name"
                    )
            return _join(parts)

        return self._write(build)

    def post_inference(
        self,
        *,
        key: str,
        on: dt.date,
        narration: str,
        items: list[InferenceItem],
        meta: Mapping[str, str],
    ) -> bool:
        """Post one transaction of inference expenses keyed by `key`; False if already posted."""
        if not items:
            raise LedgerError(f"posting {key!r} has no items")
        for item in items:
            if item.usd < 0 or item.tokens < 0 or item.fx <= 0:
                raise LedgerError(f"posting {key!r}: usd and tokens must be ≥ 0, fx > 0: {item}")
        for name in meta:
            if not _META_KEY.match(name) or name in _RESERVED_META:
                raise LedgerError(
                    f"posting {key!r}: metadata key {name!r} must match {_META_KEY.pattern} "
                    f"and not be one of {sorted(_RESERVED_META)}"
                )

        def build(book: _Book) -> str:
            if key in book.posted_keys():
                return ""
            budget, currency = book.budget(), book.currency
            if budget is None or currency is None:
                raise LedgerError(f"{self.path} is not opened yet; call Ledger.open first")
            opens = book.opens()
            accounts = sorted({inference_account(i.provider, i.model) for i in items})
            parts = [_open(budget.date, a, currency) for a in accounts if a not in opens]
            postings: list[tuple[str, Decimal, Mapping[str, Any]]] = [
                (
                    inference_account(i.provider, i.model),
                    i.amount(),
                    {
                        "provider": i.provider,
                        "model": i.model,
                        "machine": i.machine,
                        "usd": _Amount(i.usd, PRICE_CURRENCY),
                        "tokens": i.tokens,
                    },
                )
                for i in items
            ]
            total = sum((p[1] for p in postings), Decimal(0))
            postings.append((budget.account, -total, {}))
            parts.append(_transaction(on, narration, {KEY_META: key, **meta}, postings, currency))
            return _join(parts)

        return self._write(build)

    def post_payment(
        self,
        *,
        payment: str,
        on: dt.date,
        item: str,
        amount: Decimal,
        paid: tuple[Decimal, str],
        narration: str,
        meta: Mapping[str, str],
        posting_meta: Mapping[str, str],
    ) -> bool:
        """Post a purchase, `Expenses:Purchases:<Item>` against the budget; False if posted.

        `amount` is in the primary currency, `paid` is what the method charged (number,
        currency); `posting_meta` goes on the expense posting (machine, method, receipt).
        """
        if amount < 0:
            raise LedgerError(f"payment {payment!r}: amount must be ≥ 0, got {amount}")
        _check_meta(payment, [*meta, *posting_meta])

        def build(book: _Book) -> str:
            if payment in book.tagged(PAYMENT_META):
                return ""
            budget, currency = book.budget(), book.currency
            if budget is None or currency is None:
                raise LedgerError(f"{self.path} is not opened yet; call Ledger.open first")
            account = purchase_account(item)
            parts = [] if account in book.opens() else [_open(budget.date, account, currency)]
            number = amount.quantize(QUANTUM, rounding=ROUND_HALF_UP)
            expense_meta = {**posting_meta, "paid": _Amount(paid[0], paid[1])}
            postings: list[tuple[str, Decimal, Mapping[str, Any]]] = [
                (account, number, expense_meta),
                (budget.account, -number, {}),
            ]
            parts.append(
                _transaction(on, narration, {PAYMENT_META: payment, **meta}, postings, currency)
            )
            return _join(parts)

        return self._write(build)

    def post_revenue(
        self,
        *,
        revenue: str,
        on: dt.date,
        source: str,
        amount: Decimal,
        received: tuple[Decimal, str],
        narration: str,
        meta: Mapping[str, str],
    ) -> bool:
        """Post income, `Income:Revenue:<Source>` into `Assets:Receipts:<Project>`; False if posted.

        `amount` is in the primary currency, `received` is what came in (number, currency).
        """
        if amount <= 0:
            raise LedgerError(f"revenue {revenue!r}: amount must be > 0, got {amount}")
        _check_meta(revenue, list(meta))

        def build(book: _Book) -> str:
            if revenue in book.tagged(REVENUE_META):
                return ""
            budget, currency = book.budget(), book.currency
            if budget is None or currency is None:
                raise LedgerError(f"{self.path} is not opened yet; call Ledger.open first")
            project = budget.account.removeprefix(BUDGET_ROOT + ":")
            income, receipts = revenue_account(source), f"{RECEIPTS_ROOT}:{project}"
            opens = book.opens()
            opened = min(budget.date, on)  # income may predate the budget's first grant
            parts = [_open(opened, a, currency) for a in (receipts, income) if a not in opens]
            number = amount.quantize(QUANTUM, rounding=ROUND_HALF_UP)
            postings: list[tuple[str, Decimal, Mapping[str, Any]]] = [
                (receipts, number, {}),
                (income, -number, {"received": _Amount(received[0], received[1])}),
            ]
            parts.append(
                _transaction(on, narration, {REVENUE_META: revenue, **meta}, postings, currency)
            )
            return _join(parts)

        return self._write(build)

    # -- reads -------------------------------------------------------------------------------

    def load(self) -> tuple[list[data.Directive], dict[str, Any]]:
        """The ledger's entries and options, through `beancount.loader.load_file`."""
        if not self.path.exists():
            raise LedgerError(f"no ledger at {self.path}; Ledger.open creates it")
        entries, errors, options = loader.load_file(str(self.path))
        if errors:
            raise LedgerError(_describe(errors, self.path, "does not pass bean-check"))
        return entries, options

    def currency(self) -> str:
        _, options = self.load()
        return str(options["operating_currency"][0])

    def spent(self) -> Decimal:
        """Total expenses, in the primary currency."""
        entries, options = self.load()
        return _sum_postings(entries, "Expenses", options["operating_currency"][0])

    def remaining(self) -> Decimal:
        """Budget left: the balance of `Assets:Budget:<Project>`, in the primary currency."""
        entries, options = self.load()
        return _sum_postings(entries, BUDGET_ROOT, options["operating_currency"][0])

    def postings_by_key(self) -> dict[str, Decimal]:
        """Expenses of every keyed transaction, in the primary currency."""
        entries, options = self.load()
        currency = options["operating_currency"][0]
        return {
            t.meta[KEY_META]: _sum_postings([t], "Expenses", currency)
            for t in entries
            if isinstance(t, data.Transaction) and KEY_META in t.meta
        }

    def keyed(self) -> dict[str, KeyedPosting]:
        """Every keyed (inference) transaction: its date, expenses and metered USD."""
        entries, options = self.load()
        currency = options["operating_currency"][0]
        found: dict[str, KeyedPosting] = {}
        for t in entries:
            if isinstance(t, data.Transaction) and KEY_META in t.meta:
                usd = sum(
                    (
                        Decimal(str(p.meta["usd"].number))
                        for p in t.postings
                        if p.meta and isinstance(p.meta.get("usd"), data.Amount)
                    ),
                    Decimal(0),
                )
                key = str(t.meta[KEY_META])
                found[key] = KeyedPosting(
                    key, t.date, _sum_postings([t], "Expenses", currency), usd
                )
        return found

    def fx_rate(self, on: dt.date) -> Decimal:
        """Primary currency per USD in force on `on` (the latest price directive), 1 for USD."""
        entries, options = self.load()
        currency = options["operating_currency"][0]
        if currency == PRICE_CURRENCY:
            return Decimal(1)
        rate = _Book(entries, options).latest_rate(currency, on)
        if rate is None:
            raise LedgerError(f"{self.path} has no price of {PRICE_CURRENCY} in {currency} by {on}")
        return rate

    # -- the one way to change the file ------------------------------------------------------

    def _write(self, build: Callable[[_Book], str]) -> bool:
        DataRoot.ensure(self.path.parent)
        lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
            book = _Book()
            if text:
                entries, errors, options = loader.load_string(text)
                if errors:
                    raise LedgerError(_describe(errors, self.path, "does not pass bean-check"))
                book = _Book(entries, options)
            addition = build(book)
            if not addition:
                return False
            if text and not text.endswith("\n"):
                text += "\n"
            new_text = f"{text}\n{addition}" if text else addition
            _, errors, _ = loader.load_string(new_text)
            if errors:
                raise LedgerError(_describe(errors, self.path, "would not pass bean-check"))
            self._replace(new_text)
            return True
        finally:
            os.close(lock_fd)  # releases the flock

    def _replace(self, text: str) -> None:
        # Only the lock holder writes, so atomic_write's fixed temp name is safe here.
        atomic_write(self.path, text)


# -- rendering -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Amount:
    number: Decimal
    currency: str


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _value(value: Any) -> str:
    if isinstance(value, _Amount):
        return f"{value.number:f} {value.currency}"
    if isinstance(value, Decimal):
        return f"{value:f}"
    if isinstance(value, int):
        return str(value)
    return _quote(str(value))


def _join(directives: list[str]) -> str:
    """One-line directives stay together; a blank line sets off every multi-line one."""
    out = ""
    for i, text in enumerate(directives):
        if i and (text.count("\n") > 1 or directives[i - 1].count("\n") > 1):
            out += "\n"
        out += text
    return out


def _open(on: dt.date, account: str, currency: str) -> str:
    return f"{on} open {account} {currency}\n"


def _transaction(
    on: dt.date,
    narration: str,
    meta: Mapping[str, Any],
    postings: Iterable[tuple[str, Decimal, Mapping[str, Any]]],
    currency: str,
) -> str:
    lines = [f"{on} * {_quote(narration)}"]
    lines += [f"  {k}: {_value(v)}" for k, v in meta.items()]
    for account, number, posting_meta in postings:
        lines.append(f"  {account}  {number:f} {currency}")
        lines += [f"    {k}: {_value(v)}" for k, v in posting_meta.items()]
    return "\n".join(lines) + "\n"


def _check_meta(what: str, names: Iterable[str]) -> None:
    for name in names:
        if not _META_KEY.match(name) or name in _RESERVED_META:
            raise LedgerError(
                f"{what!r}: metadata key {name!r} must match {_META_KEY.pattern} "
                f"and not be one of {sorted(_RESERVED_META)}"
            )


def _sum_postings(entries: Iterable[data.Directive], account: str, currency: str) -> Decimal:
    """Sum of the postings in `currency` to `account` or any account under it."""
    total = Decimal(0)
    for entry in entries:
        if not isinstance(entry, data.Transaction):
            continue
        for p in entry.postings:
            under = p.account == account or p.account.startswith(account + ":")
            if under and p.units is not None and p.units.currency == currency:
                total += p.units.number or 0
    return total


def _describe(errors: Iterable[Any], path: Path, what: str) -> str:
    lines = [f"{path} {what}:"]
    for err in errors:
        source = err.source or {}
        line = source.get("lineno")
        lines.append(f"  {path}:{line}: {err.message}" if line else f"  {path}: {err.message}")
    return "\n".join(lines)
