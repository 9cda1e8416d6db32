"""Budget counters: reserve, then settle, atomically in every scope a call is charged to.

A scope is a budget with a limit per period (`project:<p>`, `machine:<p>:<m>`,
`task:<trial>:<task>`). Before a call the proxy reserves its maximum cost in all of its
scopes at once, or in none; after the call it settles the reservation with the actual cost,
exactly once. At every moment `spent + reserved <= limit` in each scope, so concurrent calls
cannot overrun a budget (only a call that costs more than it reserved could).

Money is a Decimal in the scope's currency (the trial's primary currency); stores keep it as
integer micro-units. Adapters are picked by short name: `sqlite` (embedded) and `redis`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

from budget.periods import PERIODS, Period, iso, window
from budget.scopes import machine_scope, open_ample, open_project, project_scope, task_scope
from contracts.adapters import resolve

__all__ = [
    "ADAPTERS",
    "PERIODS",
    "CounterError",
    "CounterStore",
    "CounterStoreUnavailable",
    "Maintained",
    "Period",
    "Refused",
    "Reservation",
    "Reserved",
    "ScopeState",
    "Settlement",
    "UnknownScope",
    "as_period",
    "checked",
    "from_micro",
    "iso",
    "machine_scope",
    "open_ample",
    "open_counters",
    "open_project",
    "project_scope",
    "task_scope",
    "to_micro",
    "window",
]

MICRO = Decimal(1_000_000)


class CounterError(Exception):
    """A counter operation was refused; the message says what and why."""


class CounterStoreUnavailable(CounterError):
    """The store cannot be reached or written; callers refuse the call (fail closed)."""


class UnknownScope(CounterError):
    """A scope was never opened (`ensure_scope`); nothing may be charged to it."""

    def __init__(self, scope: str):
        super().__init__(f"no budget scope {scope!r}; the orchestrator opens it at submission")
        self.scope = scope


def to_micro(amount: Decimal, *, round_up: bool = False) -> int:
    """Money → integer micro-units; reservations round up so they never fall short."""
    rounding = ROUND_CEILING if round_up else ROUND_HALF_UP
    return int((amount * MICRO).to_integral_value(rounding=rounding))


def from_micro(micro: int) -> Decimal:
    return (Decimal(micro) / MICRO).quantize(Decimal("0.000001"))


@dataclass(frozen=True)
class ScopeState:
    """A scope as it stands in its current period."""

    scope: str
    limit: Decimal
    currency: str
    period: Period
    spent: Decimal
    reserved: Decimal
    resets_at: float | None
    """When the current period ends (epoch seconds, UTC); None for `once`."""

    @property
    def left(self) -> Decimal:
        """What may still be reserved; never negative."""
        return max(self.limit - self.spent - self.reserved, Decimal(0))


@dataclass(frozen=True)
class Reserved:
    reservation_id: str
    amount: Decimal
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class Settlement:
    """A settle to be made: release reservation `reservation_id`'s hold, book `actual`."""

    reservation_id: str
    actual: Decimal
    reason: str = ""


def checked(settlements: Sequence[Settlement]) -> list[tuple[str, int, str]]:
    """(id, micro-units, reason) of each settlement, all checked before any is made."""
    out = []
    for s in settlements:
        micro = to_micro(s.actual)
        if micro < 0:
            raise CounterError(f"cannot settle a negative amount ({s.actual})")
        out.append((s.reservation_id, micro, s.reason))
    return out


@dataclass(frozen=True)
class Refused:
    """The first scope that could not cover the amount; nothing was reserved anywhere."""

    scope: str
    left: Decimal
    currency: str
    resets_at: float | None


@dataclass(frozen=True)
class Reservation:
    """An open (unsettled) reservation."""

    reservation_id: str
    scopes: tuple[str, ...]
    amount: Decimal
    created: float
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """What the reserver noted with it (JSON): the proxy notes the flow, so that whoever
    settles an orphan can write the flow's spool record (proxy.addons.budget)."""


class CounterStore(ABC):
    """The budget counter port; every method is atomic on its own. An adapter stores; the
    checks and reads that do not depend on how it stores are made here, once."""

    def ensure_scope(
        self, scope_id: str, limit: Decimal, currency: str, period: Period, now: float
    ) -> None:
        """Open a scope, or update its limit and period; its spend and currency are kept."""
        if period not in PERIODS:
            raise CounterError(f"unknown period {period!r}; allowed: {', '.join(PERIODS)}")
        if limit < 0:
            raise CounterError(f"scope {scope_id}: a limit cannot be negative ({limit})")
        self._ensure_scope(scope_id, to_micro(limit), currency, period, now)

    @abstractmethod
    def _ensure_scope(
        self, scope_id: str, limit: int, currency: str, period: Period, now: float
    ) -> None:
        """`ensure_scope` with the checks made, `limit` in micro-units; raise `reopened` when
        the scope counts another currency."""

    def reserve(
        self,
        reservation_id: str,
        scopes: Sequence[str],
        amount: Decimal,
        now: float | None = None,
        meta: Mapping[str, Any] | None = None,
        settle: Sequence[Settlement] = (),
    ) -> Reserved | Refused:
        """Hold `amount` in every scope, or in none; repeating an open reservation is a no-op.

        `meta` (JSON-serializable) is kept with the reservation and read back by
        `open_reservations`. `settle`: settlements made first, as `settle_many` makes them,
        in the same transaction where the store has them (SQLite: one commit for all); they
        are made whatever the reservation's outcome, and not at all if this raises."""
        now = time.time() if now is None else now
        micro = to_micro(amount, round_up=True)
        if micro < 0:
            raise CounterError(f"cannot reserve a negative amount ({amount})")
        names = tuple(dict.fromkeys(scopes))
        return self._reserve_in(reservation_id, names, micro, now, meta or {}, settle)

    @abstractmethod
    def _reserve_in(
        self,
        reservation_id: str,
        names: tuple[str, ...],
        micro: int,
        now: float,
        meta: Mapping[str, Any],
        settle: Sequence[Settlement],
    ) -> Reserved | Refused:
        """`reserve` with the checks made: `names` without repeats, `micro` rounded up."""

    @abstractmethod
    def settle(
        self, reservation_id: str, actual: Decimal, reason: str = "", now: float | None = None
    ) -> bool:
        """Release the hold and book `actual`; True only for the call that settled it."""

    @abstractmethod
    def settle_many(
        self, settlements: Sequence[Settlement], now: float | None = None
    ) -> list[bool]:
        """`settle` each, in one transaction where the store has them; one bool each."""

    @abstractmethod
    def open_reservations(self, older_than: float) -> list[Reservation]:
        """Unsettled reservations made before `older_than` (epoch seconds)."""

    @abstractmethod
    def describe(self, scope_id: str, now: float | None = None) -> ScopeState | None:
        """The scope in its current period, or None when it was never opened."""

    def spent(self, scope_id: str, now: float | None = None) -> Decimal:
        """Settled spend in the current period; UnknownScope when never opened."""
        return require(self.describe(scope_id, now), scope_id).spent

    def remaining(self, scope_id: str, now: float | None = None) -> Decimal:
        """What may still be reserved in the current period."""
        return require(self.describe(scope_id, now), scope_id).left

    @abstractmethod
    def close(self) -> None: ...


def reopened(scope_id: str, counted: str, currency: str) -> CounterError:
    """The refusal to reopen a scope that counts `counted` in another currency."""
    return CounterError(f"scope {scope_id} counts {counted}; it cannot be reopened in {currency}")


@runtime_checkable
class Maintained(Protocol):
    """A store with housekeeping to run off the hot path (SQLite: a WAL checkpoint); an owner
    that opened it `maintained` calls this every second or so. Redis has none."""

    def maintain(self) -> None: ...


ADAPTERS = {
    "sqlite": "budget.sqlite:SqliteCounters",
    "redis": "budget.redis:RedisCounters",
}
"""Short name -> store class; each is built by `open(path=, url=, maintained=)` and takes
what it needs of them."""


def open_counters(
    name: str, *, path: Path | None = None, url: str | None = None, maintained: bool = False
) -> CounterStore:
    """The adapter called `name`: `sqlite` needs `path`, `redis` needs `url`. `maintained`:
    the caller runs `maintain()` every second or so from a thread of its own, so that no
    reserve or settle pays for the store's housekeeping (the proxy does)."""
    adapter = resolve("counter store", name, ADAPTERS)
    store: CounterStore = adapter.open(path=path, url=url, maintained=maintained)
    return store


def scope_state(
    scope: str,
    limit: int,
    currency: str,
    period: str,
    anchor: int,
    window_start: int,
    spent: int,
    reserved: int,
    now: float,
) -> ScopeState:
    """A stored scope seen at `now`: the spend of a period that has ended reads as zero."""
    start, end = window(as_period(period), anchor, now)
    return ScopeState(
        scope=scope,
        limit=from_micro(limit),
        currency=currency,
        period=as_period(period),
        spent=from_micro(0 if start > window_start else spent),
        reserved=from_micro(reserved),
        resets_at=end,
    )


def require(state: ScopeState | None, scope_id: str) -> ScopeState:
    """`state`, or UnknownScope when the scope was never opened."""
    if state is None:
        raise UnknownScope(scope_id)
    return state


def as_period(value: str) -> Period:
    if value not in PERIODS:
        raise CounterError(f"unknown period {value!r}; allowed: {', '.join(PERIODS)}")
    return cast(Period, value)
