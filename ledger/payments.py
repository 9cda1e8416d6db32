"""The payment broker: agents ask to buy, policy decides, a method adapter pays, all is written.

Policy (configs/payments.yaml): a request must list the free alternatives it considered; it
must fit the project budget and the machine's daily allowance (the budget counters the proxy
charges); above the approval threshold, counted on the sum of what the machine bought and asked
for today (so a purchase split in parts waits too), it waits for the operator. The methods
tried are those that can pay its destination (a wallet address: crypto; a checkout URL: card),
in preference order (card, then the preferred crypto, then `crypto_order`), the next one when
one fails; each try is an attempt of its own.

A purchase is reserved on the budget counters before the attempt (its amount and the method's
`max_fee`) and settled after it with what it cost, like a model call: the price and the fee
when it was paid, the fee alone when a failed attempt still spent one (gas), nothing else.
Sandbox charges move no money: they are settled at zero and booked apart.

Every attempt (refused, pending, completed, failed) is appended to
`financial/<project>/transactions.json`, a JSON array rewritten atomically under a lock (temp
file, fsync, rename), so a crash leaves the previous array whole and no attempt is lost once
`submit` returns. A payment's state is its latest entry; approving a pending payment appends
the outcome under the same id. When money moves, one ledger transaction is posted:
`Expenses:Purchases:<Item>` and the fee as its own leg `Expenses:Fees:<Method>`, against the
project's budget asset; a failed attempt that spent a fee posts the fee alone. A sandbox charge
is posted to `Expenses:Sandbox:<Item>` against `Equity:Sandbox`, never counted as spend.

The fields that lead to card or wallet data (`SENSITIVE_FIELDS`: where the money goes, the
method's receipt and its evidence: transaction hash, final URL, screenshot) are kept encrypted
at rest with the configured field cipher (Vault transit or the embedded key,
`secretstore.fields`) and decrypted only to charge or for `--reveal`; item, amounts, currencies,
fees, the masked destination, status and justification stay readable for auditing. Files
written before this are read as they are. The ledger names the payment id, never the receipt.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets as random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from budget import (
    CounterError,
    CounterStore,
    CounterStoreUnavailable,
    Refused,
    UnknownScope,
    machine_scope,
    project_scope,
)
from contracts.dataroot import DataRoot, atomic_write
from contracts.secrets import FieldCipher, SecretStore, SecretStoreError, is_sealed, mask
from ledger.book import QUANTUM, Ledger, LedgerError
from ledger.methods import Charge, Fee, PaymentFailed, get_method, mask_address

log = logging.getLogger(__name__)

PAYMENTS_FILE = "payments.yaml"
"""The broker's policy, in the configs folder."""
TRANSACTIONS_FILE = "transactions.json"
RECEIPTS_DIR = "receipts"
"""Under `financial/<project>/`: what card methods keep as receipts (masked screenshots)."""
FIELD_CONTEXT = "payments"
"""Field-cipher context (Vault transit key `autovibe-payments`)."""
SENSITIVE_FIELDS = ("pay_to", "receipt", "evidence")
"""Entry fields kept encrypted at rest."""
PROJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SEALED = "[encrypted]"
"""How an encrypted field is shown without `--reveal`."""

Status = Literal["refused", "pending_approval", "completed", "failed"]
Reason = Literal[
    "no_free_alternative",
    "unknown_currency",
    "no_ledger",
    "no_budget_scope",
    "project_budget",
    "machine_allowance",
    "counters_unavailable",
    "no_method",
    "method_failed",
    "fields_unavailable",
    "outcome_unknown",
]
ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
COUNTED = ("completed", "pending_approval")
"""Statuses whose amount counts toward the day's approval sum."""


class PaymentError(Exception):
    """A broker operation cannot be done as asked (unknown id, not pending, bad policy)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodConfig(_Strict):
    name: str
    kind: Literal["card", "crypto"]
    adapter: str
    """An adapter in `ledger.methods.ADAPTERS`."""
    asset: str | None = None
    """For crypto: the coin or token paid with (USDC, BTC, …)."""
    secret: str | None = None
    """Secret-store path the adapter reads when it charges; never read before."""
    max_fee: Decimal = Field(default=Decimal(0), ge=0)
    """The most a fee may cost, in the primary currency: reserved with the price."""
    settings: dict[str, Any] = Field(default_factory=dict)
    """The adapter's own settings (crypto: rpc_url, token, decimals; card: merchants)."""

    def pays(self, pay_to: str | None) -> bool:
        """Whether this method can pay `pay_to`: a wallet for crypto, a URL for a card."""
        if pay_to is None:
            return True
        if self.kind == "crypto":
            return ADDRESS.fullmatch(pay_to) is not None
        return pay_to.startswith(("https://", "http://"))


class PaymentPolicy(_Strict):
    require_free_alternatives: bool = True
    approval_threshold: Decimal = Field(ge=0)
    """In the project's primary currency; a payment above it waits for the operator."""
    preferred_crypto: str | None = None
    crypto_order: list[str] = Field(default_factory=list)
    """The crypto assets tried after the preferred one, in order; others come last."""
    asset_rates: dict[str, Decimal] = Field(default_factory=dict)
    """Units of each crypto asset (and gas coin) per USD, beside the prices' fx rates."""
    methods: list[MethodConfig] = Field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> PaymentPolicy:
        try:
            return cls.model_validate(yaml.safe_load(path.read_text()) or {})
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            raise PaymentError(f"{path}: not a valid payment policy: {exc}") from exc

    def preferred_methods(self) -> list[MethodConfig]:
        """Card first, then the preferred crypto, then other crypto; file order within each."""

        order = [a for a in [self.preferred_crypto, *self.crypto_order] if a is not None]

        def rank(m: MethodConfig) -> int:
            if m.kind == "card":
                return 0
            return 1 + (order.index(m.asset) if m.asset in order else len(order))

        return sorted(self.methods, key=rank)

    def methods_for(self, pay_to: str | None) -> list[MethodConfig]:
        """The methods that can pay `pay_to`, in preference order."""
        return [m for m in self.preferred_methods() if m.pays(pay_to)]


class PaymentRequest(_Strict):
    """What an agent asks to buy (the body of `POST /v1/payments`)."""

    item: str = Field(min_length=1, max_length=80)
    amount: Decimal = Field(gt=0)
    currency: str = Field(pattern=r"^[A-Z]{3,5}$")
    justification: str = Field(min_length=1)
    free_alternatives_considered: list[str]
    """The free alternatives tried, or why there is none; the policy can require one."""
    pay_to: str | None = Field(default=None, min_length=1, max_length=2000)
    """Where the money goes (wallet address, merchant account, checkout URL); encrypted at rest."""


class RevenueEvent(_Strict):
    """Income for a project (the body of `POST /v1/revenue`, a row of a revenue CSV)."""

    source: str = Field(min_length=1, max_length=80)
    amount: Decimal = Field(gt=0)
    currency: str = Field(pattern=r"^[A-Z]{3,5}$")
    date: dt.date | None = None
    """When it was received; today when absent."""
    description: str = ""
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    """Idempotency key; recording the same id twice posts once."""


@dataclass(frozen=True)
class Requester:
    project: str
    machine: str | None = None
    agent: str | None = None
    trial: str | None = None
    assignment: str | None = None
    """Known when a worker asks with its machine credential; the trial report lists these."""


def masked(entry: dict[str, Any]) -> dict[str, Any]:
    """`entry` as shown without `--reveal`: encrypted fields as `[encrypted]`, older plain ones
    masked."""
    hidden = {
        k: SEALED if is_sealed(entry[k]) else mask(str(entry[k]))
        for k in SENSITIVE_FIELDS
        if entry.get(k) is not None
    }
    return {**entry, **hidden}


def convert(amount: Decimal, currency: str, to: str, fx: Mapping[str, Decimal]) -> Decimal:
    """`amount` of `currency` in `to`, through USD at the configured rates (USD → X)."""
    if currency == to:
        return amount
    missing = [c for c in (currency, to) if c != "USD" and c not in fx]
    if missing:
        raise KeyError(f"no exchange rate for {', '.join(missing)}; known: {', '.join(sorted(fx))}")
    usd = amount if currency == "USD" else amount / fx[currency]
    out = usd if to == "USD" else usd * fx[to]
    return out.quantize(QUANTUM, rounding=ROUND_HALF_UP)


class TransactionLog:
    """`financial/<project>/transactions.json`: every payment attempt, in order.

    `entries` and `latest` give entries as stored, sensitive fields encrypted; `reveal` decrypts
    one. `fields` makes the cipher, only once a sensitive value is written or revealed.
    """

    def __init__(self, path: Path, fields: Callable[[], FieldCipher] | None = None):
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")
        self._fields = fields

    @contextmanager
    def _locked(self, path: Path | None = None) -> Iterator[None]:
        DataRoot.ensure(self.path.parent)
        fd = os.open(path or self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def deciding(self) -> contextlib.AbstractContextManager[None]:
        """Held while a purchase is decided and paid (threads and processes alike); apart
        from the append lock, which recording an attempt takes inside it."""
        return self._locked(self.path.with_name(self.path.name + ".decide.lock"))

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        loaded: list[dict[str, Any]] = json.loads(self.path.read_text(encoding="utf-8"))
        return loaded

    def append(self, entry: dict[str, Any]) -> None:
        """Add `entry` with its sensitive fields encrypted (those that are not already)."""
        sealed = self._seal(entry)
        with self._locked():
            text = json.dumps([*self.entries(), sealed], indent=2, ensure_ascii=False) + "\n"
            atomic_write(self.path, text)

    def reveal(self, entry: dict[str, Any]) -> dict[str, Any]:
        """`entry` with its encrypted fields decrypted; plain ones (older files) as they are."""
        sealed = [k for k in SENSITIVE_FIELDS if is_sealed(entry.get(k))]
        if not sealed:
            return dict(entry)
        cipher = self._cipher()
        return {**entry, **{k: cipher.decrypt(FIELD_CONTEXT, entry[k]) for k in sealed}}

    def _seal(self, entry: dict[str, Any]) -> dict[str, Any]:
        plain = [
            k for k in SENSITIVE_FIELDS if entry.get(k) is not None and not is_sealed(entry[k])
        ]
        if not plain:
            return entry
        cipher = self._cipher()
        return {**entry, **{k: cipher.encrypt(FIELD_CONTEXT, str(entry[k])) for k in plain}}

    def _cipher(self) -> FieldCipher:
        if self._fields is None:
            raise PaymentError(f"{self.path}: sensitive payment fields need a field cipher")
        return self._fields()

    def latest(self, payment_id: str) -> dict[str, Any] | None:
        found = [e for e in self.entries() if e["id"] == payment_id]
        return found[-1] if found else None


class Broker:
    """Decides and executes payment requests for the projects under one data root."""

    def __init__(
        self,
        root: DataRoot,
        policy: PaymentPolicy,
        *,
        counters: Callable[[], CounterStore],
        fx: Mapping[str, Decimal],
        secrets: Callable[[], SecretStore] | None = None,
        fields: Callable[[], FieldCipher] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        """`fields` makes the field cipher; by default the one of `$AUTOVIBE_SECRET_STORE`."""
        self.root, self.policy, self.fx = root, policy, fx
        self.rates: Mapping[str, Decimal] = {**fx, **policy.asset_rates}
        """fx rates and the policy's crypto asset rates, all per USD."""
        self._counters, self._secrets, self._clock = counters, secrets, clock
        self._fields = fields or (lambda: _cipher_from_env(root))
        self._cipher: FieldCipher | None = None

    def log(self, project: str) -> TransactionLog:
        return TransactionLog(self.root.financial(project) / TRANSACTIONS_FILE, self.cipher)

    def cipher(self) -> FieldCipher:
        """The field cipher, made once (a Vault login) and only when a field needs it."""
        if self._cipher is None:
            self._cipher = self._fields()
        return self._cipher

    def submit(self, request: PaymentRequest, who: Requester) -> dict[str, Any]:
        """Decide a request; refuse, hold for approval, or pay. Returns the recorded entry."""
        entry: dict[str, Any] = {
            "id": "pay_" + random.token_hex(6),
            "project": who.project,
            "machine": who.machine,
            "agent": who.agent,
            "trial": who.trial,
            "assignment": who.assignment,
            **request.model_dump(mode="json"),
        }
        if request.pay_to is not None:  # encrypted from the start; decrypted only to charge
            entry["destination"] = masked_destination(request.pay_to)
            try:
                entry["pay_to"] = self.cipher().encrypt(FIELD_CONTEXT, request.pay_to)
            except SecretStoreError as exc:
                entry["pay_to"] = None
                return self._record(entry, "refused", "fields_unavailable", str(exc))
        if self.policy.require_free_alternatives and not [
            a for a in request.free_alternatives_considered if a.strip()
        ]:
            return self._record(
                entry,
                "refused",
                "no_free_alternative",
                "say which free alternative you tried, or why there is none",
            )
        ledger = Ledger.of(self.root, who.project)
        try:
            primary = ledger.currency()
        except LedgerError as exc:
            return self._record(entry, "refused", "no_ledger", str(exc))
        try:
            amount = convert(request.amount, request.currency, primary, self.rates)
        except KeyError as exc:
            return self._record(entry, "refused", "unknown_currency", str(exc.args[0]))
        entry.update(amount_primary=f"{amount:f}", primary_currency=primary)
        methods = self.policy.methods_for(request.pay_to)
        if not methods:
            kinds = "no payment method is configured"
            if self.policy.methods:
                kinds = f"no configured method pays {_destination_kind(request.pay_to)}"
            return self._record(entry, "refused", "no_method", kinds)
        entry["method"] = methods[0].name
        refusal = self._check_budget(who, amount + methods[0].max_fee, primary)
        if refusal is not None:
            return self._record(entry, "refused", *refusal)
        # One purchase of a project decided and paid at a time: two parts of a split purchase
        # sent at once must not both see the day's sum without the other.
        with self.log(who.project).deciding():
            day = dt.datetime.fromtimestamp(self._clock(), dt.UTC).date()
            today = self._today_sum(who, day)
            if today + amount > self.policy.approval_threshold:
                already = f" ({today:f} already today)" if today else ""
                return self._record(
                    entry,
                    "pending_approval",
                    None,
                    f"{today + amount:f} {primary} for {who.machine or 'the operator'} today"
                    f"{already} is above the approval threshold "
                    f"{self.policy.approval_threshold:f}",
                )
            return self._execute(entry)

    def approve(self, project: str, payment_id: str, by: str = "operator") -> dict[str, Any]:
        """Execute a payment that waits for approval; PaymentError when it does not wait."""
        log = self.log(project)
        with log.deciding():  # two approvals of one payment at once: the second finds it paid
            latest = log.latest(payment_id)
            if latest is None:
                raise PaymentError(f"no payment {payment_id!r} in project {project!r}")
            if latest["status"] != "pending_approval":
                raise PaymentError(
                    f"payment {payment_id!r} is {latest['status']}, not pending_approval"
                )
            skip = {"at", "status", "reason", "detail"}
            entry = {k: v for k, v in latest.items() if k not in skip}
            entry["approved_by"] = by
            return self._execute(entry)

    def find(self, payment_id: str) -> tuple[str, dict[str, Any]]:
        """The project and latest entry of `payment_id`, searched in every project."""
        for log_path in sorted((self.root.root / "financial").glob(f"*/{TRANSACTIONS_FILE}")):
            latest = TransactionLog(log_path).latest(payment_id)
            if latest is not None:
                return log_path.parent.name, latest
        raise PaymentError(f"no payment {payment_id!r} in {self.root.root / 'financial'}")

    def history(
        self, payment_id: str | None = None, *, project: str | None = None, reveal: bool = False
    ) -> list[dict[str, Any]]:
        """Every recorded entry (of `payment_id`, of `project`, when given), oldest first per
        project; sensitive fields masked, or decrypted with `reveal`."""
        if project is not None and not PROJECT_NAME.fullmatch(project):
            raise PaymentError(f"invalid project name {project!r}")
        out = []
        pattern = f"{project or '*'}/{TRANSACTIONS_FILE}"
        for log_path in sorted((self.root.root / "financial").glob(pattern)):
            log = TransactionLog(log_path, self.cipher)
            for entry in log.entries():
                if payment_id is None or entry["id"] == payment_id:
                    out.append(log.reveal(entry) if reveal else masked(entry))
        return out

    # -- steps -------------------------------------------------------------------------------

    def _scopes(self, who: Requester) -> list[str]:
        scopes = [project_scope(who.project)]
        if who.machine:
            scopes.append(machine_scope(who.project, who.machine))
        return scopes

    def _check_budget(
        self, who: Requester, amount: Decimal, currency: str
    ) -> tuple[Reason, str] | None:
        try:
            store = self._counters()
        except CounterError as exc:
            return "counters_unavailable", str(exc)
        try:
            for scope in self._scopes(who):
                left = store.remaining(scope, self._clock())
                if amount > left:
                    return _scope_reason(scope), f"{scope} has {left:f} {currency} left"
        except UnknownScope as exc:
            return "no_budget_scope", str(exc)
        except CounterError as exc:
            return "counters_unavailable", str(exc)
        finally:
            store.close()
        return None

    def _today_sum(self, who: Requester, day: dt.date) -> Decimal:
        """What `who`'s machine (the operator's requests, without one) bought or asked to buy
        on `day`, in the primary currency: each payment's latest state, completed or pending."""
        latest: dict[str, dict[str, Any]] = {}
        for e in self.log(who.project).entries():
            latest[e["id"]] = e
        total = Decimal(0)
        for e in latest.values():
            if e.get("machine") != who.machine or e["status"] not in COUNTED:
                continue
            if dt.datetime.fromisoformat(e["at"]).date() == day and e.get("amount_primary"):
                total += Decimal(e["amount_primary"])
        return total

    def _execute(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Try each method that can pay the destination, the first named in `entry` first;
        every try is recorded, the first success ends it."""
        project = entry["project"]
        try:
            pay_to = self.log(project).reveal({"pay_to": entry.get("pay_to")})["pay_to"]
        except SecretStoreError as exc:
            return self._record(entry, "refused", "fields_unavailable", str(exc))
        methods = self.policy.methods_for(pay_to)
        methods.sort(key=lambda m: m.name != entry["method"])
        if not methods:
            return self._record(entry, "refused", "no_method", f"{entry['method']} is gone")
        recorded: dict[str, Any] = {}
        for attempt, method in enumerate(methods, start=1):
            recorded = self._attempt({**entry, "method": method.name}, method, pay_to, attempt)
            if recorded["status"] != "failed" or recorded["reason"] == "outcome_unknown":
                break
        return recorded

    def _attempt(
        self, entry: dict[str, Any], method: MethodConfig, pay_to: str | None, attempt: int
    ) -> dict[str, Any]:
        """One try with one method: reserve, charge, settle, record, post."""
        project, amount = entry["project"], Decimal(entry["amount_primary"])
        primary = entry["primary_currency"]
        who = Requester(project, entry.get("machine"), entry.get("agent"))
        entry = {**entry, "attempt": attempt}
        try:
            paid_in = method.asset if method.kind == "crypto" and method.asset else None
            price = Decimal(entry["amount"])
            if paid_in is not None and paid_in != entry["currency"]:
                price = convert(price, entry["currency"], paid_in, self.rates)
        except KeyError as exc:
            return self._record(entry, "failed", "unknown_currency", str(exc.args[0]))
        charge = Charge(
            entry["id"],
            entry["item"],
            price,
            paid_in or entry["currency"],
            pay_to,
            self.root.financial(project) / RECEIPTS_DIR,
        )
        reservation = f"payment:{entry['id']}:{attempt}"
        try:
            store = self._counters()
        except CounterError as exc:
            return self._record(entry, "refused", "counters_unavailable", str(exc))
        try:
            try:
                held = store.reserve(
                    reservation, self._scopes(who), amount + method.max_fee, self._clock()
                )
            except UnknownScope as exc:
                return self._record(entry, "refused", "no_budget_scope", str(exc))
            except CounterStoreUnavailable as exc:
                return self._record(entry, "refused", "counters_unavailable", str(exc))
            if isinstance(held, Refused):
                return self._record(
                    entry,
                    "refused",
                    _scope_reason(held.scope),
                    f"{held.scope} has {held.left:f} {held.currency} left",
                )
            try:
                secrets = self._secrets() if method.secret and self._secrets else None
                receipt = get_method(method.adapter, method.settings).charge(
                    charge, secrets, method.secret
                )
            except (PaymentFailed, ValueError, SecretStoreError) as exc:
                fee = exc.fee if isinstance(exc, PaymentFailed) else None
                fee_primary = self._fee_primary(fee, primary)
                store.settle(reservation, fee_primary, "payment failed", self._clock())
                if isinstance(exc, PaymentFailed) and exc.evidence:
                    entry["evidence"] = json.dumps(exc.evidence)
                failed = self._record(
                    {**entry, **_fee_fields(fee, fee_primary)}, "failed", "method_failed", str(exc)
                )
                if fee_primary:
                    self._post_fee(entry, method, fee, fee_primary)
                return failed
            except Exception as exc:
                # A method that broke in a way it did not report: whether money moved is not
                # known. The attempt is recorded, the reservation kept whole (settled at what
                # was reserved) and no other method is tried: the operator looks first.
                log.exception("payment %s: %s failed unexpectedly", entry["id"], method.name)
                held_amount = amount + method.max_fee
                store.settle(reservation, held_amount, "payment outcome unknown", self._clock())
                return self._record(
                    entry,
                    "failed",
                    "outcome_unknown",
                    f"{type(exc).__name__}: {exc}; whether money moved is not known: "
                    f"{held_amount:f} {primary} kept on the budget, nothing posted",
                )
            fee_primary = self._fee_primary(receipt.fee, primary)
            cost = amount + fee_primary if receipt.charged else Decimal(0)
            store.settle(reservation, cost, "payment", self._clock())
        finally:
            store.close()
        entry.update(
            receipt=receipt.receipt_id,
            charged=receipt.charged,
            destination=receipt.destination or entry.get("destination"),
            **_fee_fields(receipt.fee, fee_primary),
        )
        if receipt.evidence:
            entry["evidence"] = json.dumps(dict(receipt.evidence))
        recorded = self._record(entry, "completed", None, None)
        posting_meta = {"method": method.name}  # the receipt stays encrypted in the log
        if who.machine:
            posting_meta["machine"] = who.machine
        fee = receipt.fee
        Ledger.of(self.root, project).post_payment(
            payment=entry["id"],
            on=dt.date.fromtimestamp(self._clock()),
            item=entry["item"],
            amount=amount,
            paid=(charge.amount, charge.currency),
            narration=f"Purchase: {entry['item']}",
            meta={"agent": who.agent} if who.agent else {},
            posting_meta=posting_meta,
            fee=(fee_primary, (fee.amount, fee.currency), method.name) if fee else None,
            sandbox=not receipt.charged,
        )
        return recorded

    def _fee_primary(self, fee: Fee | None, primary: str) -> Decimal:
        """A fee in the primary currency. A coin without a rate is an error in the policy, but
        the money has moved by now: the attempt is recorded with the fee in its coin only, the
        fee left out of the books, and the error logged."""
        if fee is None or not fee.amount:
            return Decimal(0)
        try:
            return convert(fee.amount, fee.currency, primary, self.rates)
        except KeyError as exc:
            log.error("payments.yaml asset_rates: %s; fee of %s %s not posted",
                      exc.args[0], fee.amount, fee.currency)  # fmt: skip
            return Decimal(0)

    def _post_fee(
        self, entry: dict[str, Any], method: MethodConfig, fee: Fee | None, primary: Decimal
    ) -> None:
        """A failed attempt's fee, posted alone (gas of a reverted transfer)."""
        assert fee is not None
        posting_meta = {"method": method.name}
        if entry.get("machine"):
            posting_meta["machine"] = entry["machine"]
        Ledger.of(self.root, entry["project"]).post_fee(
            payment=f"{entry['id']}/{entry['attempt']}",
            on=dt.date.fromtimestamp(self._clock()),
            method=method.name,
            amount=primary,
            paid=(fee.amount, fee.currency),
            narration=f"Fee of a failed payment: {entry['item']}",
            posting_meta=posting_meta,
        )

    def _record(
        self, entry: dict[str, Any], status: Status, reason: Reason | None, detail: str | None
    ) -> dict[str, Any]:
        stamped = {
            **entry,
            "at": dt.datetime.fromtimestamp(self._clock(), dt.UTC).isoformat(),
            "status": status,
            "reason": reason,
            "detail": detail,
        }
        try:
            self.log(entry["project"]).append(stamped)
        except SecretStoreError as exc:
            # Never lose an attempt: keep it, without the values that could not be encrypted.
            lost = [k for k in SENSITIVE_FIELDS if stamped.get(k) is not None]
            note = f"{', '.join(lost)} not recorded: {exc}"
            self.log(entry["project"]).append(
                {
                    **stamped,
                    **dict.fromkeys(lost),
                    "detail": f"{detail}; {note}" if detail else note,
                }
            )
        return stamped


def purchases_preamble(policy: PaymentPolicy | None) -> str:
    """What an agent is told about buying: where to ask, what to state, which currency first.

    The URL and the bearer token are in its environment (`AUTOVIBE_PAYMENTS_URL`,
    `AUTOVIBE_MACHINE_TOKEN`); empty when no method is configured."""
    if policy is None or not policy.methods:
        return ""
    assets = [a for a in [policy.preferred_crypto, *policy.crypto_order] if a]
    crypto = (
        f" Crypto is paid in {', then '.join(assets)}: give a wallet address as pay_to."
        if assets
        else ""
    )
    cards = [m for m in policy.methods if m.kind == "card"]
    card = " A card pays a checkout page: give its URL as pay_to." if cards else ""
    free = (
        " A request that names no free alternative is refused."
        if policy.require_free_alternatives
        else ""
    )
    return (
        "## Purchases\n"
        "Look for a free alternative first. If you must buy, POST JSON to "
        "$AUTOVIBE_PAYMENTS_URL with the header `Authorization: Bearer "
        "$AUTOVIBE_MACHINE_TOKEN`: item, amount, currency, justification, "
        "free_alternatives_considered (what free option you tried, or why there is none) and "
        f"pay_to.{free}{crypto}{card} Purchases count against this machine's daily "
        "allowance and the project budget; above "
        f"{policy.approval_threshold:f} (primary currency) in a day, counting what this machine "
        "already bought, a purchase waits for the operator's approval (HTTP 202); "
        "GET $AUTOVIBE_PAYMENTS_URL/<id> with the same header says when it was paid.\n\n"
    )


def _cipher_from_env(root: DataRoot) -> FieldCipher:
    from secretstore import cipher_from_env  # the adapters load only when a field needs one

    return cipher_from_env(root)


def masked_destination(pay_to: str) -> str:
    """Where a payment goes, as the attempt log shows it in plain: a wallet's ends, a URL's
    host, anything else masked."""
    if ADDRESS.fullmatch(pay_to):
        return mask_address(pay_to)
    host = urlsplit(pay_to).netloc if pay_to.startswith(("https://", "http://")) else ""
    return host.rpartition("@")[2] or mask(pay_to)


def _destination_kind(pay_to: str | None) -> str:
    if pay_to is not None and ADDRESS.fullmatch(pay_to):
        return "a wallet address"
    return "a URL" if pay_to and pay_to.startswith(("https://", "http://")) else "this destination"


def _fee_fields(fee: Fee | None, primary: Decimal) -> dict[str, str]:
    if fee is None:
        return {}
    return {"fee": f"{fee.amount:f}", "fee_currency": fee.currency, "fee_primary": f"{primary:f}"}


def _scope_reason(scope: str) -> Reason:
    return "machine_allowance" if scope.startswith("machine:") else "project_budget"


# -- revenue -------------------------------------------------------------------------------


def record_revenue(
    root: DataRoot, project: str, event: RevenueEvent, fx: Mapping[str, Decimal]
) -> tuple[str, bool]:
    """Post `event` as `Income:Revenue:<Source>`; returns its id and whether it was new."""
    ledger = Ledger.of(root, project)
    primary = ledger.currency()
    on = event.date or dt.date.today()
    revenue_id = event.id or "rev_" + _digest(
        [
            project,
            on.isoformat(),
            event.source,
            f"{event.amount:f}",
            event.currency,
            event.description,
        ]
    )
    amount = convert(event.amount, event.currency, primary, fx)
    posted = ledger.post_revenue(
        revenue=revenue_id,
        on=on,
        source=event.source,
        amount=amount,
        received=(event.amount, event.currency),
        narration=event.description or f"Revenue from {event.source}",
        meta={},
    )
    return revenue_id, posted


CSV_COLUMNS = ("date", "source", "amount", "currency", "description", "id")


def read_revenue_csv(path: Path) -> list[RevenueEvent]:
    """Rows of a revenue CSV (header: date,source,amount,currency[,description][,id])."""
    events: list[RevenueEvent] = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        unknown = set(reader.fieldnames or []) - set(CSV_COLUMNS)
        if unknown:
            raise PaymentError(
                f"{path}: unknown columns {sorted(unknown)}; allowed: {', '.join(CSV_COLUMNS)}"
            )
        for line, row in enumerate(reader, start=2):
            cleaned = {k: v for k, v in row.items() if v not in (None, "")}
            try:
                events.append(RevenueEvent.model_validate(cleaned))
            except ValidationError as exc:
                raise PaymentError(f"{path}:{line}: {exc}") from exc
    return events


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]
