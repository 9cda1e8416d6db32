"""Settles the reservations nobody will settle: what a killed or crashed proxy left open."""

from __future__ import annotations

import logging
from collections.abc import Container
from typing import Literal

from ledger.counters import CounterStore, Reservation

log = logging.getLogger(__name__)

Charge = Literal["reserved", "zero"]


def sweep_orphans(
    store: CounterStore,
    older_than: float,
    *,
    charge: Charge = "reserved",
    keep: Container[str] = (),
    now: float | None = None,
) -> list[Reservation]:
    """Settle open reservations made before `older_than`, except those in `keep` (live calls).

    An orphan is charged its reserved amount by default: the call may have reached the
    provider, so booking the most it could have cost never understates spend.
    """
    swept = []
    for reservation in store.open_reservations(older_than):
        if reservation.reservation_id in keep:
            continue
        amount = reservation.amount if charge == "reserved" else type(reservation.amount)(0)
        reason = f"orphan: unsettled since {reservation.created:.0f}, charged {charge}"
        if store.settle(reservation.reservation_id, amount, reason, now=now):
            log.warning("settled orphan reservation %s: %s", reservation.reservation_id, reason)
            swept.append(reservation)
    return swept
