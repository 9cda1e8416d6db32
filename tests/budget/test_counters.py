"""Both counter stores for real: SQLite in a temp folder, Redis in a throwaway redis-server."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from budget_harness import RedisServer, redis_server

from budget import (
    CounterError,
    CounterStore,
    CounterStoreUnavailable,
    Refused,
    Reserved,
    Settlement,
    UnknownScope,
    open_counters,
)
from budget.periods import window
from budget.sweeper import sweep_orphans
from contracts.settings import free_port

NOW = dt.datetime(2025, 3, 12, 15, 30, tzinfo=dt.UTC).timestamp()  # a Wednesday
DAY = 86_400.0


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    yield from redis_server()


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CounterStore]:
    if request.param == "sqlite":
        counters = open_counters("sqlite", path=tmp_path / "budget" / "counters.sqlite")
    else:
        server: RedisServer = request.getfixturevalue("redis")
        counters = open_counters("redis", url=server.url)
        # A fresh namespace per test on the shared server.
        counters.prefix = f"{{autovibe-budget-{uuid.uuid4().hex[:8]}}}:"  # type: ignore[attr-defined]
    yield counters
    counters.close()


def D(text: str) -> Decimal:
    return Decimal(text)


def test_reserve_settle_books_actual_and_releases_hold(store: CounterStore) -> None:
    store.ensure_scope("project:p", D("10"), "CAD", "biweekly", NOW)
    outcome = store.reserve("r1", ["project:p"], D("4"), NOW)
    assert outcome == Reserved("r1", D("4"), ("project:p",))
    assert store.remaining("project:p", NOW) == D("6")
    assert store.spent("project:p", NOW) == 0
    assert store.settle("r1", D("1.25"), "response", now=NOW)
    assert store.spent("project:p", NOW) == D("1.25")
    assert store.remaining("project:p", NOW) == D("8.75")
    assert store.open_reservations(NOW + 1) == []


def test_settlement_happens_exactly_once(store: CounterStore) -> None:
    store.ensure_scope("project:p", D("10"), "CAD", "once", NOW)
    store.reserve("r1", ["project:p"], D("3"), NOW)
    assert store.settle("r1", D("2"), now=NOW) is True
    assert store.settle("r1", D("2"), now=NOW) is False
    assert store.settle("r1", D("3"), now=NOW) is False
    assert store.settle("never-reserved", D("3"), now=NOW) is False
    assert store.spent("project:p", NOW) == D("2")
    assert store.remaining("project:p", NOW) == D("8")
    with pytest.raises(CounterError, match="settled already"):
        store.reserve("r1", ["project:p"], D("1"), NOW)


def test_settlements_written_with_a_reservation_go_first_whatever_its_outcome(
    store: CounterStore,
) -> None:
    store.ensure_scope("project:p", D("10"), "CAD", "once", NOW)
    store.reserve("r1", ["project:p"], D("6"), NOW)
    store.reserve("r2", ["project:p"], D("3"), NOW)
    # r3 fits only once r1's hold is released: the settlement is made before the check.
    r1 = Settlement("r1", D("1"), "response")
    assert store.reserve("r3", ["project:p"], D("5"), NOW, settle=[r1]) == Reserved(
        "r3", D("5"), ("project:p",)
    )
    assert store.spent("project:p", NOW) == D("1")
    # A refused reservation still writes its settlements; a settled or unknown id is skipped.
    r2 = Settlement("r2", D("2"), "response")
    outcome = store.reserve("r4", ["project:p"], D("9"), NOW, settle=[r2, r1, Settlement("x", 1)])
    assert isinstance(outcome, Refused) and outcome.left == D("2")
    assert store.spent("project:p", NOW) == D("3")
    assert [o.reservation_id for o in store.open_reservations(NOW + 1)] == ["r3"]


def test_settle_many_settles_each_once_or_none_when_one_is_negative(store: CounterStore) -> None:
    store.ensure_scope("project:p", D("10"), "CAD", "once", NOW)
    for name in ("r1", "r2"):
        store.reserve(name, ["project:p"], D("2"), NOW)
    with pytest.raises(CounterError, match="negative"):
        store.settle_many([Settlement("r1", D("1")), Settlement("r2", D("-1"))], NOW)
    assert store.spent("project:p", NOW) == 0
    settled = store.settle_many([Settlement("r1", D("1")), Settlement("r2", D("0.5"))], NOW)
    assert settled == [True, True]
    assert store.settle_many([Settlement("r1", D("1"))], NOW) == [False]
    assert store.spent("project:p", NOW) == D("1.5")
    assert store.remaining("project:p", NOW) == D("8.5")


def test_repeated_reserve_is_one_hold(store: CounterStore) -> None:
    store.ensure_scope("project:p", D("10"), "CAD", "once", NOW)
    assert isinstance(store.reserve("r1", ["project:p"], D("3"), NOW), Reserved)
    assert isinstance(store.reserve("r1", ["project:p"], D("3"), NOW), Reserved)
    assert store.remaining("project:p", NOW) == D("7")


def test_reserve_is_all_scopes_or_none(store: CounterStore) -> None:
    store.ensure_scope("project:p", D("10"), "CAD", "biweekly", NOW)
    store.ensure_scope("machine:p:m1", D("1"), "CAD", "daily", NOW)
    refused = store.reserve("r1", ["project:p", "machine:p:m1"], D("1.5"), NOW)
    tomorrow = dt.datetime(2025, 3, 13, tzinfo=dt.UTC).timestamp()
    assert refused == Refused("machine:p:m1", D("1"), "CAD", tomorrow)
    # Nothing was held in the project scope that could pay.
    assert store.remaining("project:p", NOW) == D("10")
    assert store.open_reservations(NOW + 1) == []
    assert isinstance(store.reserve("r2", ["project:p", "machine:p:m1"], D("1"), NOW), Reserved)
    assert store.remaining("project:p", NOW) == D("9")
    assert store.remaining("machine:p:m1", NOW) == 0


def test_unknown_scope_is_refused_loudly(store: CounterStore) -> None:
    store.ensure_scope("project:p", D("10"), "CAD", "once", NOW)
    with pytest.raises(UnknownScope, match="machine:p:m9"):
        store.reserve("r1", ["project:p", "machine:p:m9"], D("1"), NOW)
    assert store.remaining("project:p", NOW) == D("10")
    assert store.describe("machine:p:m9", NOW) is None


def test_ensure_scope_is_idempotent_and_keeps_spend(store: CounterStore) -> None:
    store.ensure_scope("project:p", D("10"), "CAD", "weekly", NOW)
    store.reserve("r1", ["project:p"], D("2"), NOW)
    store.settle("r1", D("2"), now=NOW)
    store.ensure_scope("project:p", D("10"), "CAD", "weekly", NOW + 60)
    store.ensure_scope("project:p", D("12"), "CAD", "weekly", NOW + 60)
    state = store.describe("project:p", NOW)
    assert state is not None
    assert (state.limit, state.spent, state.left) == (D("12"), D("2"), D("10"))
    with pytest.raises(CounterError, match="counts CAD"):
        store.ensure_scope("project:p", D("12"), "EUR", "weekly", NOW)


def test_period_reset_drops_spend_but_carries_holds(store: CounterStore) -> None:
    store.ensure_scope("machine:p:m1", D("1"), "CAD", "daily", NOW)
    store.reserve("r1", ["machine:p:m1"], D("0.4"), NOW)
    store.reserve("r2", ["machine:p:m1"], D("0.6"), NOW)
    store.settle("r1", D("0.4"), now=NOW)
    refused = store.reserve("r3", ["machine:p:m1"], D("0.1"), NOW)
    assert isinstance(refused, Refused) and refused.left == 0
    tomorrow = NOW + DAY
    # A new day: yesterday's spend is gone, the call still in flight holds its share.
    assert store.spent("machine:p:m1", tomorrow) == 0
    assert store.remaining("machine:p:m1", tomorrow) == D("0.4")
    assert isinstance(store.reserve("r3", ["machine:p:m1"], D("0.4"), tomorrow), Reserved)
    store.settle("r2", D("0.5"), now=tomorrow)
    assert store.spent("machine:p:m1", tomorrow) == D("0.5")
    assert store.remaining("machine:p:m1", tomorrow) == D("0.1")


def test_once_never_resets(store: CounterStore) -> None:
    store.ensure_scope("task:t:x", D("1"), "CAD", "once", NOW)
    store.reserve("r1", ["task:t:x"], D("1"), NOW)
    store.settle("r1", D("1"), now=NOW)
    later = NOW + 400 * DAY
    refused = store.reserve("r2", ["task:t:x"], D("0.01"), later)
    assert refused == Refused("task:t:x", D("0"), "CAD", None)


def test_sweeper_settles_orphans_once_and_spares_live_calls(store: CounterStore) -> None:
    store.ensure_scope("project:p", D("10"), "CAD", "once", NOW)
    store.reserve("old", ["project:p"], D("2"), NOW - 3600)
    store.reserve("live", ["project:p"], D("1"), NOW - 3600)
    store.reserve("young", ["project:p"], D("1"), NOW)
    opened = {r.reservation_id for r in store.open_reservations(NOW - 60)}
    assert opened == {"old", "live"}
    swept = sweep_orphans(store, NOW - 60, keep={"live"}, now=NOW)
    assert [r.reservation_id for r in swept] == ["old"]
    assert store.spent("project:p", NOW) == D("2")  # charged what it reserved
    assert sweep_orphans(store, NOW - 60, keep={"live"}, now=NOW) == []
    assert sweep_orphans(store, NOW + 1, charge="zero", now=NOW)
    assert store.spent("project:p", NOW) == D("2")
    assert store.open_reservations(NOW + 1) == []
    assert store.remaining("project:p", NOW) == D("8")


def test_concurrent_reservations_never_overrun(store: CounterStore) -> None:
    store.ensure_scope("project:p", D("1"), "CAD", "once", NOW)
    store.ensure_scope("machine:p:m1", D("100"), "CAD", "daily", NOW)
    granted: list[str] = []

    def worker(n: int) -> None:
        for i in range(25):
            rid = f"w{n}-{i}"
            if isinstance(
                store.reserve(rid, ["project:p", "machine:p:m1"], D("0.01"), NOW), Reserved
            ):
                granted.append(rid)
                store.settle(rid, D("0.01"), now=NOW)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 100
    assert store.spent("project:p", NOW) == D("1")
    assert store.spent("machine:p:m1", NOW) == D("1")


def test_money_is_kept_to_the_micro_unit_and_holds_round_up(store: CounterStore) -> None:
    store.ensure_scope("project:p", D("1"), "CAD", "once", NOW)
    held = store.reserve("r1", ["project:p"], D("0.0000001"), NOW)
    assert held == Reserved("r1", D("0.000001"), ("project:p",))


def test_monthly_window_is_the_calendar_month() -> None:
    start, end = window("monthly", 0, dt.datetime(2025, 12, 31, 23, tzinfo=dt.UTC).timestamp())
    assert dt.datetime.fromtimestamp(start, dt.UTC) == dt.datetime(2025, 12, 1, tzinfo=dt.UTC)
    assert end is not None
    assert dt.datetime.fromtimestamp(end, dt.UTC) == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_unreachable_redis_is_unavailable_not_empty() -> None:
    counters = open_counters("redis", url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(CounterStoreUnavailable):
        counters.reserve("r1", ["project:p"], D("1"), NOW)
    with pytest.raises(CounterStoreUnavailable):
        counters.describe("project:p", NOW)
