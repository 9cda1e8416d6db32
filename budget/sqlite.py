"""The embedded counter store: one SQLite file (WAL), every change in one `BEGIN IMMEDIATE`.

`BEGIN IMMEDIATE` takes the database's write lock before the first read, so two processes
(proxy, orchestrator, sweeper) reserving at once are serialized: the second reads the
first's holds. Each thread gets its own connection.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

from budget import (
    CounterError,
    CounterStore,
    CounterStoreUnavailable,
    Period,
    Refused,
    Reservation,
    Reserved,
    ScopeState,
    Settlement,
    UnknownScope,
    as_period,
    checked,
    from_micro,
    reopened,
    scope_state,
)
from budget.periods import anchor_of, window

BUSY_TIMEOUT_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scopes (
    id TEXT PRIMARY KEY,
    limit_micro INTEGER NOT NULL,
    currency TEXT NOT NULL,
    period TEXT NOT NULL,
    anchor INTEGER NOT NULL,
    window_start INTEGER NOT NULL,
    spent_micro INTEGER NOT NULL DEFAULT 0,
    reserved_micro INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    scopes TEXT NOT NULL,
    amount_micro INTEGER NOT NULL,
    created REAL NOT NULL,
    settled REAL,
    actual_micro INTEGER,
    reason TEXT,
    meta TEXT
);
CREATE INDEX IF NOT EXISTS reservations_open ON reservations (created) WHERE settled IS NULL;
"""

_Row = tuple[int, str, Period, int, int, int, int]
"""limit, currency, period, anchor, window start, spent, reserved (micro-units, seconds)."""

_SCOPE_COLUMNS = "limit_micro, currency, period, anchor, window_start, spent_micro, reserved_micro"


class SqliteCounters(CounterStore):
    @classmethod
    def open(
        cls, *, path: Path | None, url: str | None = None, maintained: bool = False
    ) -> SqliteCounters:
        """The counter stores' one constructor (`open_counters`): this one needs `path`."""
        if path is None:
            raise CounterError("the sqlite counter store needs a file path")
        return cls(path, maintained=maintained)

    def __init__(self, path: Path, *, maintained: bool = False):
        self.path = Path(path)
        self.maintained = maintained
        """The owner calls `maintain()` every second or so, so commits skip checkpointing."""
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = self._connection()
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(reservations)")}
            if "meta" not in columns:  # a store made before reservations carried metadata
                with contextlib.suppress(sqlite3.OperationalError):  # another process added it
                    db.execute("ALTER TABLE reservations ADD COLUMN meta TEXT")
        except (OSError, sqlite3.Error) as exc:
            raise CounterStoreUnavailable(f"cannot create {self.path}: {exc}") from exc

    # -- connection --------------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            # Used by its own thread only; `close` may come from another.
            db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            if self.maintained:
                # A checkpoint copies the WAL into the database and syncs it: `maintain`, on
                # the owner's own thread, does that instead of whichever commit fills the WAL.
                db.execute("PRAGMA wal_autocheckpoint=0")
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise CounterStoreUnavailable(f"counter store {self.path}: {exc}") from exc
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise CounterStoreUnavailable(f"counter store {self.path}: {exc}") from exc

    def maintain(self) -> None:
        """Checkpoint the WAL (PASSIVE: never waits for a reader or a writer). With
        `maintained`, the owner's background thread calls this every second or so."""
        try:
            self._connection().execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            raise CounterStoreUnavailable(f"counter store {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()

    # -- scopes ------------------------------------------------------------------------------
    def _ensure_scope(
        self, scope_id: str, limit: int, currency: str, period: Period, now: float
    ) -> None:
        with self._transaction() as db:
            row = db.execute(
                "SELECT currency, anchor FROM scopes WHERE id = ?", (scope_id,)
            ).fetchone()
            if row is None:
                anchor = anchor_of(now)
                db.execute(
                    f"INSERT INTO scopes (id, {_SCOPE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 0, 0)",
                    (scope_id, limit, currency, period, anchor,
                     window(period, anchor, now)[0]),
                )  # fmt: skip
                return
            if row[0] != currency:
                raise reopened(scope_id, row[0], currency)
            db.execute(
                "UPDATE scopes SET limit_micro = ?, period = ? WHERE id = ?",
                (limit, period, scope_id),
            )

    def _roll(self, db: sqlite3.Connection, scope_id: str, now: float) -> _Row:
        """The scope's row, moved into the period holding `now` (spend of an ended one drops)."""
        row = db.execute(
            f"SELECT {_SCOPE_COLUMNS} FROM scopes WHERE id = ?", (scope_id,)
        ).fetchone()
        if row is None:
            raise UnknownScope(scope_id)
        limit, currency, period, anchor, started, spent, reserved = row
        period = as_period(period)
        start, _ = window(period, anchor, now)
        if start > started:
            # Holds still in flight are carried over: they will be settled in the new period.
            db.execute(
                "UPDATE scopes SET window_start = ?, spent_micro = 0 WHERE id = ?",
                (start, scope_id),
            )
            spent = 0
        return limit, currency, period, anchor, start, spent, reserved

    # -- reserve / settle --------------------------------------------------------------------
    def _reserve_in(
        self,
        reservation_id: str,
        names: tuple[str, ...],
        micro: int,
        now: float,
        meta: Mapping[str, Any],
        settle: Sequence[Settlement],
    ) -> Reserved | Refused:
        settling = checked(settle)
        with self._transaction() as db:
            for args in settling:
                self._settle_in(db, *args, now)
            existing = db.execute(
                "SELECT scopes, amount_micro, settled FROM reservations WHERE id = ?",
                (reservation_id,),
            ).fetchone()
            if existing is not None:
                if existing[2] is not None:
                    raise CounterError(f"reservation {reservation_id} is settled already")
                return Reserved(
                    reservation_id, from_micro(existing[1]), tuple(json.loads(existing[0]))
                )
            for name in names:
                limit, currency, period, anchor, _, spent, reserved = self._roll(db, name, now)
                left = limit - spent - reserved
                if micro > left:
                    return Refused(
                        name, from_micro(max(left, 0)), currency, window(period, anchor, now)[1]
                    )
            db.executemany(
                "UPDATE scopes SET reserved_micro = reserved_micro + ? WHERE id = ?",
                [(micro, name) for name in names],
            )
            db.execute(
                "INSERT INTO reservations (id, scopes, amount_micro, created, meta)"
                " VALUES (?, ?, ?, ?, ?)",
                (reservation_id, json.dumps(names), micro, now, json.dumps(meta)),
            )
        return Reserved(reservation_id, from_micro(micro), names)

    def settle(
        self, reservation_id: str, actual: Decimal, reason: str = "", now: float | None = None
    ) -> bool:
        return self.settle_many([Settlement(reservation_id, actual, reason)], now)[0]

    def settle_many(
        self, settlements: Sequence[Settlement], now: float | None = None
    ) -> list[bool]:
        now = time.time() if now is None else now
        settling = checked(settlements)
        if not settling:
            return []
        with self._transaction() as db:
            return [self._settle_in(db, *args, now) for args in settling]

    def _settle_in(
        self, db: sqlite3.Connection, reservation_id: str, micro: int, reason: str, now: float
    ) -> bool:
        row = db.execute(
            "SELECT scopes, amount_micro FROM reservations WHERE id = ? AND settled IS NULL",
            (reservation_id,),
        ).fetchone()
        if row is None:
            return False
        held = row[1]
        for name in json.loads(row[0]):
            try:
                self._roll(db, name, now)
            except UnknownScope:
                continue  # a scope removed by hand: nothing left to release there
            db.execute(
                "UPDATE scopes SET reserved_micro = MAX(reserved_micro - ?, 0),"
                " spent_micro = spent_micro + ? WHERE id = ?",
                (held, micro, name),
            )
        db.execute(
            "UPDATE reservations SET settled = ?, actual_micro = ?, reason = ? WHERE id = ?",
            (now, micro, reason, reservation_id),
        )
        return True

    # -- reads -------------------------------------------------------------------------------
    def open_reservations(self, older_than: float) -> list[Reservation]:
        try:
            rows = (
                self._connection()
                .execute(
                    "SELECT id, scopes, amount_micro, created, meta FROM reservations"
                    " WHERE settled IS NULL AND created < ? ORDER BY created",
                    (older_than,),
                )
                .fetchall()
            )
        except sqlite3.Error as exc:
            raise CounterStoreUnavailable(f"counter store {self.path}: {exc}") from exc
        return [
            Reservation(
                r[0], tuple(json.loads(r[1])), from_micro(r[2]), r[3], json.loads(r[4] or "{}")
            )
            for r in rows
        ]

    def describe(self, scope_id: str, now: float | None = None) -> ScopeState | None:
        now = time.time() if now is None else now
        try:
            row = (
                self._connection()
                .execute(f"SELECT {_SCOPE_COLUMNS} FROM scopes WHERE id = ?", (scope_id,))
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise CounterStoreUnavailable(f"counter store {self.path}: {exc}") from exc
        if row is None:
            return None
        limit, currency, period, anchor, started, spent, reserved = row
        return scope_state(
            scope_id, limit, currency, period, anchor, started, spent, reserved, now=now
        )
