"""The sandbox method: records the payment, charges nothing, returns a fake receipt id."""

from __future__ import annotations

import secrets as random

from contracts.secrets import SecretStore
from ledger.methods import Charge, Receipt


class SandboxMethod:
    def charge(
        self, charge: Charge, secrets: SecretStore | None, secret_path: str | None
    ) -> Receipt:
        return Receipt(receipt_id=f"sandbox-{random.token_hex(6)}", charged=False)
