"""Payment methods: one adapter per way of paying, picked by short name from configs/payments.yaml.

An adapter is built once per charge from its method's `settings` (`from_settings`, which
validates them into the adapter's own model) and charges one approved payment. Methods that
need a secret (card details, a wallet key) receive the secret store and read their secret while
charging, never earlier; the agent that asked never sees it. What comes back is a `Receipt`
(what was paid, the fee as its own amount, where it went masked, the evidence); a charge that
did not go through raises `PaymentFailed`, which carries the fee when one was spent anyway (a
reverted transaction still pays for its gas).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from contracts.adapters import resolve
from contracts.secrets import SecretStore

S = TypeVar("S", bound=BaseModel)

ADAPTERS = {
    "sandbox": "ledger.methods.sandbox:SandboxMethod",
    "crypto": "ledger.methods.crypto:CryptoMethod",
    "card": "ledger.methods.card:CardMethod",
}


@dataclass(frozen=True)
class Fee:
    amount: Decimal
    currency: str
    """The currency or coin the fee was paid in (ETH for gas)."""


class PaymentFailed(Exception):
    """The method did not charge; the message says why (declined, unreachable, reverted…)."""

    def __init__(
        self, message: str, *, fee: Fee | None = None, evidence: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.fee = fee
        self.evidence = dict(evidence or {})


@dataclass(frozen=True)
class Charge:
    payment_id: str
    item: str
    amount: Decimal
    currency: str
    """What the seller is paid: the agent's currency for a card, the method's asset for crypto."""
    pay_to: str | None = None
    """Where the money goes, as the agent gave it (wallet address, merchant, checkout URL)."""
    receipts: Path | None = None
    """The folder a method keeps its receipt files in (`financial/<project>/receipts/`)."""


@dataclass(frozen=True)
class Receipt:
    receipt_id: str
    charged: bool
    """False when no money moved for real (the sandbox)."""
    fee: Fee | None = None
    """What paying cost on top of the price (gas), posted as its own leg."""
    destination: str | None = None
    """Where the money went, masked (a wallet's ends, a merchant's host)."""
    evidence: Mapping[str, str] = field(default_factory=dict)
    """What proves it: a transaction hash and block, a final URL and a masked screenshot."""


class PaymentMethod(Protocol):
    def charge(
        self, charge: Charge, secrets: SecretStore | None, secret_path: str | None
    ) -> Receipt:
        """Pay `charge`; reads `secret_path` from `secrets` now, when it needs one."""
        ...


def get_method(adapter: str, settings: Mapping[str, Any] | None = None) -> PaymentMethod:
    """The adapter called `adapter`, built from its method's `settings`."""
    cls = resolve("payment adapter", adapter, ADAPTERS, dotted=False)
    method: PaymentMethod = cls.from_settings(dict(settings or {}))
    return method


def validated(model: type[S], settings: Mapping[str, Any], adapter: str) -> S:
    """`settings` as the adapter's own model; ValueError naming the adapter and the field."""
    try:
        return model.model_validate(settings)
    except ValidationError as exc:
        raise ValueError(f"{adapter} method settings: {exc}") from exc


def mask_address(value: str) -> str:
    """A wallet address or account shown to a person: its first 6 and last 4 characters."""
    return f"{value[:6]}…{value[-4:]}" if len(value) > 12 else "****"
