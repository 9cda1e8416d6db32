"""A project's beancount ledger: validated, atomic, serialized writes; reads through beancount.

The ledger is a small head file, `ledger.beancount` (options, account openings, fx prices,
budget grants, balance assertions), that includes the journal: `journal/<YYYY-MM>.beancount`,
one segment per month in which transactions were *written* (a transaction's date is its own).
Usage, compute, payments and revenue go to the current segment; the head stays small.

Every write takes an exclusive `flock` on `ledger.beancount.lock`, parses only the head, and
validates the new text against the head alone (syntax, balance, opened accounts and their
dates, currencies; balance assertions by date, see `Writer`), so a posting costs the new text
and the head, not the whole ledger. Each changed file is replaced atomically (temp file, fsync,
rename, fsync of the directory), head first: a refused or interrupted write leaves valid files,
at worst with an account opened and not yet used.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import itertools
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from beancount import loader
from beancount.core import data
from beancount.parser import parser

from contracts.dataroot import DataRoot, atomic_write

BUDGET_ROOT = "Assets:Budget"
FUNDING_ACCOUNT = "Equity:Budget:Funding"
INFERENCE_ROOT = "Expenses:Inference"
PRICE_CURRENCY = "USD"
"""Provider prices and fx rates are quoted in USD (see `PriceCatalog`)."""
QUANTUM = Decimal("0.000001")
"""Ledger amounts keep 6 decimals: a local model's request costs a fraction of a cent."""
PURCHASES_ROOT = "Expenses:Purchases"
FEES_ROOT = "Expenses:Fees"
SANDBOX_ROOT = "Expenses:Sandbox"
"""Sandbox charges: recorded, never spend (`Ledger.spent` and the P&L leave them out)."""
SANDBOX_EQUITY = "Equity:Sandbox"
REVENUE_ROOT = "Income:Revenue"
RECEIPTS_ROOT = "Assets:Receipts"
"""Revenue lands here, not in the budget: granting it as budget is the operator's decision."""
COMPUTE_ROOT = "Expenses:Compute"
VM_ROOT = "Expenses:Compute:VM"
KEY_META = "key"
FUNDING_META = "funding"
PAYMENT_META = "payment"
REVENUE_META = "revenue"
COMPUTE_META = "compute"
SPOOL_META = "spool"
SPOOL_TO_META = "spool-to"
JOURNAL_DIR = "journal"
JOURNAL_INCLUDE = f'include "{JOURNAL_DIR}/*.beancount"'

_CURRENCY = re.compile(r"^[A-Z]{3}$")  # as `contracts.config.Currency`
_META_KEY = re.compile(r"^[a-z][A-Za-z0-9_-]*$")
_RESERVED_META = {
    KEY_META,
    FUNDING_META,
    PAYMENT_META,
    REVENUE_META,
    COMPUTE_META,
    SPOOL_META,
    SPOOL_TO_META,
    "filename",
    "lineno",
}
_BALANCE_LINE = re.compile(r"^\d{4}-\d{2}-\d{2} balance .*\n?", re.M)
_INCLUDE_LINE = re.compile(r"^include .*\n?", re.M)


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


def sandbox_account(item: str) -> str:
    return f"{SANDBOX_ROOT}:{account_component(item)}"


def fee_account_of(method: str) -> str:
    return f"{FEES_ROOT}:{account_component(method)}"


def is_spend(account: str) -> bool:
    """Whether a posting to `account` is money spent: an expense, not a sandbox one."""
    return account.startswith("Expenses:") and not (
        account == SANDBOX_ROOT or account.startswith(SANDBOX_ROOT + ":")
    )


def revenue_account(source: str) -> str:
    return f"{REVENUE_ROOT}:{account_component(source)}"


def ledger_projects(root: DataRoot) -> list[str]:
    """The projects that have a ledger under `financial/`."""
    return sorted(p.parent.name for p in (root.root / "financial").glob("*/ledger.beancount"))


def vm_account(machine: str) -> str:
    return f"{VM_ROOT}:{account_component(machine)}"


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

    def asserted(self, account: str) -> dt.date | None:
        """The date of the latest balance assertion on `account`, if any."""
        dates = [
            e.date for e in self.entries if isinstance(e, data.Balance) and e.account == account
        ]
        return max(dates) if dates else None

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
        self.journal_dir = self.path.parent / JOURNAL_DIR

    @classmethod
    def of(cls, root: DataRoot, project: str) -> Ledger:
        return cls(root.ledger(project))

    def segments(self) -> list[Path]:
        """The journal segments, oldest first (`journal/<YYYY-MM>.beancount`)."""
        return sorted(self.journal_dir.glob("*.beancount"))

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

        with self.writing() as w:
            book = w.head
            if book.empty:
                w.add_to_head(
                    f"; Ledger of project {project}, written by autovibe (ledger.book.Ledger).\n"
                    f'option "title" {_quote(project)}\n'
                    f'option "operating_currency" "{currency}"\n'
                    f"{JOURNAL_INCLUDE}\n"
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
            for account in (budget, FUNDING_ACCOUNT):
                w.open_account(account, opened, currency)
            for quote, rate in sorted(fx.items()):
                if quote != PRICE_CURRENCY and book.latest_rate(quote, on) != rate:
                    w.add_to_head(f"{on} price {PRICE_CURRENCY} {rate:f} {quote}\n")
            granted = book.funding(funding)
            if granted is None:
                w.add_to_head(
                    render_transaction(
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
        return w.changed

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
        _check_meta(f"posting {key}", meta)

        with self.writing() as w:
            if w.has_meta(KEY_META, key):
                return False
            budget, currency = w.opened()
            postings: list[tuple[str, Decimal, Mapping[str, Any]]] = []
            for i in items:
                account = inference_account(i.provider, i.model)
                w.open_account(account, budget.date, currency)
                item_meta = {
                    "provider": i.provider,
                    "model": i.model,
                    "machine": i.machine,
                    "usd": MetaAmount(i.usd, PRICE_CURRENCY),
                    "tokens": i.tokens,
                }
                postings.append((account, i.amount(), item_meta))
            total = sum((p[1] for p in postings), Decimal(0))
            postings.append((budget.account, -total, {}))
            w.add(render_transaction(on, narration, {KEY_META: key, **meta}, postings, currency))
        return w.changed

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
        fee: tuple[Decimal, tuple[Decimal, str], str] | None = None,
        sandbox: bool = False,
    ) -> bool:
        """Post a purchase, `Expenses:Purchases:<Item>` against the budget; False if posted.

        `amount` is in the primary currency, `paid` is what the method charged (number,
        currency); `posting_meta` goes on the expense posting (machine, method, receipt).
        `fee`: (primary amount, (number, coin) paid, method), posted as its own leg
        `Expenses:Fees:<Method>`. A `sandbox` charge moved no money: it is posted to
        `Expenses:Sandbox:<Item>` against `Equity:Sandbox`, outside spend and the budget.
        """
        if amount < 0:
            raise LedgerError(f"payment {payment!r}: amount must be ≥ 0, got {amount}")
        account = sandbox_account(item) if sandbox else purchase_account(item)
        legs = [(account, amount, paid)]
        if fee is not None and fee[0] and not sandbox:
            legs.append((fee_account_of(fee[2]), fee[0], fee[1]))
        against = SANDBOX_EQUITY if sandbox else None
        return self._post_legs(payment, on, narration, meta, posting_meta, legs, against)

    def post_fee(
        self,
        *,
        payment: str,
        on: dt.date,
        method: str,
        amount: Decimal,
        paid: tuple[Decimal, str],
        narration: str,
        posting_meta: Mapping[str, str],
    ) -> bool:
        """Post a fee alone (a failed attempt that still paid its gas), `Expenses:Fees:<Method>`
        against the budget, marked `payment: <id>/<attempt>`; False if posted."""
        if amount < 0:
            raise LedgerError(f"fee of {payment!r}: amount must be ≥ 0, got {amount}")
        legs = [(fee_account_of(method), amount, paid)]
        return self._post_legs(payment, on, narration, {}, posting_meta, legs, None)

    def _post_legs(
        self,
        payment: str,
        on: dt.date,
        narration: str,
        meta: Mapping[str, str],
        posting_meta: Mapping[str, str],
        legs: list[tuple[str, Decimal, tuple[Decimal, str]]],
        against: str | None,
    ) -> bool:
        """One transaction marked `payment`: each leg (account, primary amount, what was paid)
        an expense, against `against` (the budget asset when None); False if posted."""
        _check_meta(payment, [*meta, *posting_meta])
        with self.writing() as w:
            if w.has_meta(PAYMENT_META, payment):
                return False
            budget, currency = w.opened()
            postings: list[tuple[str, Decimal, Mapping[str, Any]]] = []
            for account, amount, paid in legs:
                w.open_account(account, budget.date, currency)
                number = amount.quantize(QUANTUM, rounding=ROUND_HALF_UP)
                postings.append((account, number, {**posting_meta, "paid": MetaAmount(*paid)}))
            if against is not None:
                w.open_account(against, budget.date, currency)
            total = sum((number for _, number, _ in postings), Decimal(0))
            postings.append((against or budget.account, -total, {}))
            w.add(
                render_transaction(
                    on, narration, {PAYMENT_META: payment, **meta}, postings, currency
                )
            )
        return w.changed

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

        with self.writing() as w:
            if w.has_meta(REVENUE_META, revenue):
                return False
            budget, currency = w.opened()
            project = budget.account.removeprefix(BUDGET_ROOT + ":")
            income, receipts = revenue_account(source), f"{RECEIPTS_ROOT}:{project}"
            opened = min(budget.date, on)  # income may predate the budget's first grant
            for account in (receipts, income):
                w.open_account(account, opened, currency)
            number = amount.quantize(QUANTUM, rounding=ROUND_HALF_UP)
            postings: list[tuple[str, Decimal, Mapping[str, Any]]] = [
                (receipts, number, {}),
                (income, -number, {"received": MetaAmount(received[0], received[1])}),
            ]
            w.add(
                render_transaction(
                    on, narration, {REVENUE_META: revenue, **meta}, postings, currency
                )
            )
        return w.changed

    def assert_budget(self, on: dt.date) -> bool:
        """Write a balance assertion for the budget at the start of `on`; False if one exists.

        Reads the whole ledger (the balance is the sum of every posting before `on`), so it is
        meant for a daily close, not for every posting. From then on, postings to the budget
        must be dated `on` or later (`Writer.earliest`).
        """
        with self.writing() as w:
            budget, currency = w.opened()
            latest = w.head.asserted(budget.account)
            if latest is not None and latest >= on:
                return False
            entries, errors, _ = loader.load_file(str(self.path))
            if errors:
                raise LedgerError(_describe(errors, self.path, "does not pass bean-check"))
            before = [e for e in entries if e.date < on]
            balance = _sum_postings(before, budget.account, currency)
            w.add_to_head(f"{on} balance {budget.account}  {balance:f} {currency}\n")
        return w.changed

    @contextmanager
    def writing(self, now: dt.datetime | None = None) -> Iterator[Writer]:
        """Hold the ledger's lock; what is added to the `Writer` is validated and written at the
        end of the block (nothing is, if the block raises)."""
        DataRoot.ensure(self.path.parent)
        lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
            writer = Writer(self, text, now or dt.datetime.now(dt.UTC))
            yield writer
            writer.commit()
        finally:
            os.close(lock_fd)  # releases the flock

    # -- reads -------------------------------------------------------------------------------

    def load(self) -> tuple[list[data.Directive], dict[str, Any]]:
        """The ledger's entries and options, through `beancount.loader.load_file`."""
        if not self.path.exists():
            raise LedgerError(f"no ledger at {self.path}; Ledger.open creates it")
        entries, errors, options = loader.load_file(str(self.path))
        if errors:
            raise LedgerError(_describe(errors, self.path, "does not pass bean-check"))
        return entries, options

    def text(self) -> str:
        """The head and every journal segment, oldest first: the whole ledger as text."""
        parts = [self.path.read_text(encoding="utf-8")] if self.path.exists() else []
        parts += [p.read_text(encoding="utf-8") for p in self.segments()]
        return "\n".join(parts)

    def currency(self) -> str:
        _, options = self.load()
        return str(options["operating_currency"][0])

    def spent(self) -> Decimal:
        """Total expenses, in the primary currency; sandbox charges are not spend."""
        entries, options = self.load()
        currency = options["operating_currency"][0]
        return _sum_postings(entries, "Expenses", currency) - _sum_postings(
            entries, SANDBOX_ROOT, currency
        )

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


class Writer:
    """One serialized change: directives for the head and for the current journal segment.

    Validation reads the head only. The new text is loaded by beancount together with the head
    (balance assertions and includes left out), which checks syntax, that every transaction
    balances, that its accounts are open on its date, and their currency constraints. A balance
    assertion is checked by date: no addition may post to an asserted account before the
    assertion's date (`earliest` says the first date allowed). Journal segments are never
    parsed by a write: idempotency markers and usage watermarks are found as exact metadata
    lines, which is unambiguous because strings never hold a raw newline (`_quote`).
    """

    def __init__(self, ledger: Ledger, head_text: str, now: dt.datetime):
        self.ledger = ledger
        self.head_text = head_text
        self.head = _Book()
        if head_text:
            entries, errors, options = parser.parse_string(head_text, str(ledger.path))
            if errors:
                raise LedgerError(_describe(errors, ledger.path, "does not pass bean-check"))
            self.head = _Book(sorted(entries, key=data.entry_sortkey), options)
        self.segment = ledger.journal_dir / f"{now.astimezone(dt.UTC):%Y-%m}.beancount"
        self.changed = False
        self._head_parts: list[str] = []
        self._journal_parts: list[str] = []
        self._opening: set[str] = set()
        self._texts: dict[Path, str] = {}

    # -- what the ledger holds ---------------------------------------------------------------

    def opened(self) -> tuple[data.Open, str]:
        """The budget account's opening and the primary currency; refused before `open`."""
        budget, currency = self.head.budget(), self.head.currency
        if budget is None or currency is None:
            raise LedgerError(f"{self.ledger.path} is not opened yet; call Ledger.open first")
        return budget, currency

    def earliest(self, account: str) -> dt.date:
        """The first date a posting to `account` may carry: its opening, or its latest balance
        assertion (an earlier posting would break that assertion)."""
        opens = self.head.opens()
        dates = [d for d in (self.head.asserted(account),) if d is not None]
        if account in opens:
            dates.append(opens[account].date)
        if not dates:
            raise LedgerError(f"{self.ledger.path}: account {account} is not open")
        return max(dates)

    def rate(self, on: dt.date) -> Decimal:
        """Primary currency per USD in force on `on` (1 for a USD ledger)."""
        _, currency = self.opened()
        if currency == PRICE_CURRENCY:
            return Decimal(1)
        rate = self.head.latest_rate(currency, on)
        if rate is None:
            raise LedgerError(
                f"{self.ledger.path} has no price of {PRICE_CURRENCY} in {currency} by {on}"
            )
        return rate

    def has_meta(self, name: str, value: str) -> bool:
        """Whether a transaction carries `name: value` (in the head, the journal, or this write)."""
        line = f"\n  {name}: {_value(value)}\n"
        texts = [self.head_text, *self._journal_parts, *self._head_parts]
        texts += [self._text(p) for p in self.ledger.segments()]
        # A metadata line follows its transaction's header: it never starts a text.
        return any(line in t for t in texts)

    def watermark(self, spool: str, day: dt.date) -> int:
        """The `spool-to` of the latest usage posting from spool file `spool`, else 0.

        Watermarks only grow and are written to the segment of the month they were written
        in, so the newest segment that names `spool` holds its watermark; a spool file of
        `day` cannot be named before the month before `day` (a margin for clock skew).
        """
        needle = f"\n  {SPOOL_META}: {_quote(spool)}\n"
        oldest = f"{(day.replace(day=1) - dt.timedelta(days=1)):%Y-%m}"
        segments = [p for p in reversed(self.ledger.segments()) if p.stem >= oldest]
        texts = itertools.chain(reversed(self._journal_parts), map(self._text, segments))
        for text in texts:  # newest first, read only as far as needed
            at = text.rfind(needle)
            if at >= 0:
                end = text.find("\n\n", at + 1)
                found = _SPOOL_TO.search(text, at, end if end >= 0 else len(text))
                if found is None:
                    raise LedgerError(f"{self.ledger.path}: posting from {spool} has no spool-to")
                return int(found.group(1))
        return 0

    # -- additions -----------------------------------------------------------------------------

    def open_account(self, account: str, on: dt.date, currency: str) -> None:
        """Open `account` in the head unless it is open already."""
        if account not in self.head.opens() and account not in self._opening:
            self._opening.add(account)
            self.add_to_head(_open(on, account, currency))

    def add_to_head(self, text: str) -> None:
        self._head_parts.append(text)

    def add(self, text: str) -> None:
        """A transaction for the current journal segment."""
        self._journal_parts.append(text)

    # -- writing -------------------------------------------------------------------------------

    def commit(self) -> None:
        head_add, journal_add = _join(self._head_parts), _join(self._journal_parts)
        if not head_add and not journal_add:
            return
        path = self.ledger.path
        head = self.head_text
        if head and not head.endswith("\n"):
            head += "\n"
        new_head = f"{head}\n{head_add}" if head and head_add else head + head_add
        if JOURNAL_INCLUDE not in new_head.splitlines():
            new_head += f"\n{JOURNAL_INCLUDE}\n"
        self._validate(head_add, journal_add)
        if new_head != self.head_text:
            if not self.ledger.segments():
                # The include names a glob, which must match a file before the head uses it.
                DataRoot.ensure(self.ledger.journal_dir)
                atomic_write(self.segment, "")
            atomic_write(path, new_head)
        if journal_add:
            DataRoot.ensure(self.ledger.journal_dir)
            old = self._text(self.segment)
            atomic_write(self.segment, f"{old}\n{journal_add}" if old else journal_add)
        self.changed = True

    def _validate(self, head_add: str, journal_add: str) -> None:
        old = _INCLUDE_LINE.sub("", _BALANCE_LINE.sub("", self.head_text))
        added = _INCLUDE_LINE.sub("", _BALANCE_LINE.sub("", f"{head_add}\n{journal_add}"))
        _, errors, _ = loader.load_string(f"{old}\n{added}")
        if errors:
            # Line numbers count the head without its includes and assertions: an error there
            # is the head's own (hand-edited), reported against the file without a number.
            old_lines = old.count("\n") + 1
            if all((e.source or {}).get("lineno", 0) <= old_lines for e in errors):
                raise LedgerError(
                    _describe(errors, self.ledger.path, "does not pass bean-check", lines=False)
                )
            raise LedgerError(
                _describe(errors, self.ledger.path, "would not pass bean-check", lines=False)
            )
        entries, _, _ = parser.parse_string(added)
        for entry in entries:
            if not isinstance(entry, data.Transaction):
                continue
            for posting in entry.postings:
                asserted = self.head.asserted(posting.account)
                if asserted is not None and entry.date < asserted:
                    raise LedgerError(
                        f"{self.ledger.path}: a posting to {posting.account} dated "
                        f"{entry.date} would break its balance assertion of {asserted}; "
                        f"post on {asserted} or later"
                    )

    def _text(self, path: Path) -> str:
        if path not in self._texts:
            self._texts[path] = path.read_text(encoding="utf-8") if path.exists() else ""
        return self._texts[path]


# -- rendering -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaAmount:
    """An amount written as metadata (`usd: 0.0123 USD`), not as a posting."""

    number: Decimal
    currency: str


def _quote(value: str) -> str:
    """A beancount string on one line: beancount reads `\\n` and `\\r` back as the characters."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r") + '"'


def _value(value: Any) -> str:
    if isinstance(value, MetaAmount):
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


def render_transaction(
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


_SPOOL_TO = re.compile(rf"\n  {SPOOL_TO_META}: (\d+)\n")


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


def _describe(errors: Iterable[Any], path: Path, what: str, *, lines: bool = True) -> str:
    out = [f"{path} {what}:"]
    for err in errors:
        source = err.source or {}
        line = source.get("lineno") if lines else None
        out.append(f"  {path}:{line}: {err.message}" if line else f"  {path}: {err.message}")
    return "\n".join(out)
