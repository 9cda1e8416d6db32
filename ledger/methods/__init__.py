"""Payment methods: one adapter per way of paying, picked by short name from configs/payments.yaml.

An adapter charges one approved payment and returns a receipt. Methods that need a secret
(card details, a wallet key) receive the secret store and read their secret while charging,
never earlier; the agent that asked never sees it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from contracts.secrets import SecretStore

ADAPTERS = {"sandbox": "ledger.methods.sandbox:SandboxMethod"}


class PaymentFailed(Exception):
    """The method did not charge; the message says why (declined, unreachable, …)."""


@dataclass(frozen=True)
class Charge:
    payment_id: str
    item: str
    amount: Decimal
    currency: str
    """What the seller is paid, in the currency the agent asked for."""
    pay_to: str | None = None
    """Where the money goes, as the agent gave it (wallet address, merchant, checkout URL)."""


@dataclass(frozen=True)
class Receipt:
    receipt_id: str
    charged: bool
    """False when no money moved for real (the sandbox)."""


class PaymentMethod(Protocol):
    def charge(
        self, charge: Charge, secrets: SecretStore | None, secret_path: str | None
    ) -> Receipt:
        """Pay `charge`; reads `secret_path` from `secrets` now, when it needs one."""
        ...


def get_method(adapter: str) -> PaymentMethod:
    if adapter not in ADAPTERS:
        raise KeyError(f"unknown payment adapter {adapter!r}; allowed: {', '.join(ADAPTERS)}")
    module, _, cls = ADAPTERS[adapter].partition(":")
    method: PaymentMethod = getattr(importlib.import_module(module), cls)()
    return method
