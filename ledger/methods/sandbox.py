"""The sandbox method: records the payment, charges nothing, returns a fake receipt id.

Nothing moves, so the broker books its charges apart (`Expenses:Sandbox`) and settles their
budget reservations at zero.
"""

from __future__ import annotations

import secrets as random
from typing import Any

from contracts.secrets import SecretStore
from ledger.methods import Charge, Receipt


class SandboxMethod:
    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> SandboxMethod:
        return cls()

    def charge(
        self, charge: Charge, secrets: SecretStore | None, secret_path: str | None
    ) -> Receipt:
        return Receipt(receipt_id=f"sandbox-{random.token_hex(6)}", charged=False)
