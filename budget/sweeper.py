"""Settles the reservations nobody will settle: what a killed or crashed proxy left open."""

from __future__ import annotations

import logging
from collections.abc import Callable, Container
from decimal import Decimal
from typing import Literal

from budget import CounterStore, Reservation

log = logging.getLogger(__name__)

Charge = Literal["reserved", "zero"]
SettleAt = Callable[[Reservation, Decimal], tuple[Decimal, str] | None]
"""Given an orphan and what it would be charged: what to charge it and why, or None to leave
it open until the next sweep. The proxy's budget addon answers from the traffic spool."""


def sweep_orphans(
    store: CounterStore,
    older_than: float,
    *,
    charge: Charge = "reserved",
    keep: Container[str] = (),
    now: float | None = None,
    settle_at: SettleAt | None = None,
) -> list[Reservation]:
    """Settle open reservations made before `older_than`, except those in `keep` (live calls).

    An orphan is charged its reserved amount by default: the call may have reached the
    provider, so booking the most it could have cost never understates spend. `settle_at`
    may say otherwise for each orphan, before it is settled.
    """
    swept = []
    for reservation in store.open_reservations(older_than):
        if reservation.reservation_id in keep:
            continue
        amount = reservation.amount if charge == "reserved" else type(reservation.amount)(0)
        how = f"charged {charge}"
        if settle_at is not None:
            decided = settle_at(reservation, amount)
            if decided is None:
                continue
            amount, how = decided
        reason = f"orphan: unsettled since {reservation.created:.0f}, {how}"
        if store.settle(reservation.reservation_id, amount, reason, now=now):
            log.warning("settled orphan reservation %s: %s", reservation.reservation_id, reason)
            swept.append(reservation)
    return swept
