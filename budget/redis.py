"""The production counter store: Redis, one Lua script per change so each is atomic.

A scope is a hash, a reservation a hash, and the open reservations a sorted set by creation
time. Every key carries the hash tag `{autovibe-budget}`, so a Redis Cluster keeps them in
one slot and a script may touch them together. The scripts check the period the caller
computed the window from; a scope whose period changed meanwhile answers `stale` and the
call is retried with the new one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis as redis_py
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

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
    require,
    scope_state,
    to_micro,
)
from budget.periods import anchor_of, window

PREFIX = "{autovibe-budget}:"
_RETRIES = 3

# KEYS[1] scope. ARGV: limit, currency, period, anchor, window start.
_ENSURE = """
local currency = redis.call('HGET', KEYS[1], 'currency')
if not currency then
  redis.call('HSET', KEYS[1], 'limit', ARGV[1], 'currency', ARGV[2], 'period', ARGV[3],
             'anchor', ARGV[4], 'wstart', ARGV[5], 'spent', 0, 'reserved', 0)
  return 'created'
end
if currency ~= ARGV[2] then return 'currency:' .. currency end
redis.call('HSET', KEYS[1], 'limit', ARGV[1], 'period', ARGV[3])
return 'updated'
"""

# KEYS: reservation, open set, scopes... ARGV: id, amount, now, scopes (JSON), then for each
# scope its period and the start of the window holding `now`, then the metadata (JSON).
_RESERVE = """
local held = redis.call('HMGET', KEYS[1], 'amount', 'scopes', 'settled')
if held[1] then
  if held[3] then return {'settled'} end
  return {'ok', held[1], held[2]}
end
local amount = tonumber(ARGV[2])
for i = 1, #KEYS - 2 do
  local key = KEYS[i + 2]
  local s = redis.call('HMGET', key, 'limit', 'period', 'wstart', 'spent', 'reserved')
  if not s[1] then return {'unknown', i} end
  if s[2] ~= ARGV[3 + 2 * i] then return {'stale', i} end
  local spent = tonumber(s[4])
  if tonumber(ARGV[4 + 2 * i]) > tonumber(s[3]) then
    redis.call('HSET', key, 'wstart', ARGV[4 + 2 * i], 'spent', 0)
    spent = 0
  end
  local left = tonumber(s[1]) - spent - tonumber(s[5])
  if amount > left then return {'refused', i, left} end
end
for i = 1, #KEYS - 2 do redis.call('HINCRBY', KEYS[i + 2], 'reserved', amount) end
redis.call('HSET', KEYS[1], 'amount', ARGV[2], 'scopes', ARGV[4], 'created', ARGV[3],
           'meta', ARGV[#ARGV])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return {'ok', ARGV[2], ARGV[4]}
"""

# KEYS: reservation, open set, scopes... ARGV: id, actual, now, reason, then per scope its
# period and window start.
_SETTLE = """
local r = redis.call('HMGET', KEYS[1], 'amount', 'settled')
if not r[1] or r[2] then return {'no'} end
local held = tonumber(r[1])
for i = 1, #KEYS - 2 do
  local key = KEYS[i + 2]
  local s = redis.call('HMGET', key, 'period', 'wstart', 'reserved')
  if s[1] then
    if s[1] ~= ARGV[3 + 2 * i] then return {'stale', i} end
    if tonumber(ARGV[4 + 2 * i]) > tonumber(s[2]) then
      redis.call('HSET', key, 'wstart', ARGV[4 + 2 * i], 'spent', 0)
    end
    local reserved = tonumber(s[3]) - held
    if reserved < 0 then reserved = 0 end
    redis.call('HSET', key, 'reserved', string.format('%d', reserved))
    redis.call('HINCRBY', key, 'spent', ARGV[2])
  end
end
redis.call('HSET', KEYS[1], 'settled', ARGV[3], 'actual', ARGV[2], 'reason', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
return {'ok'}
"""


class RedisCounters(CounterStore):
    @classmethod
    def open(
        cls, *, path: Path | None = None, url: str | None, maintained: bool = False
    ) -> RedisCounters:
        """The counter stores' one constructor (`open_counters`): this one needs `url`;
        `maintained` changes nothing (Redis has no housekeeping of ours)."""
        if not url:
            raise CounterError("the redis counter store needs a URL (redis://host:port/db)")
        return cls(url)

    def __init__(self, url: str, *, prefix: str = PREFIX):
        try:
            # Fail fast: a call waits on the store, and an unreachable store refuses the call.
            self.client = redis_py.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=2,
                socket_connect_timeout=1,
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            )
        except ValueError as exc:
            raise CounterError(f"bad redis URL {url!r}: {exc}") from exc
        self.url = url
        self.prefix = prefix
        self._ensure = self.client.register_script(_ENSURE)
        self._reserve = self.client.register_script(_RESERVE)
        self._settle = self.client.register_script(_SETTLE)
        self._shapes: dict[str, tuple[Period, int]] = {}
        """period and anchor per scope, for the window arguments of the scripts."""

    def _scope_key(self, scope_id: str) -> str:
        return f"{self.prefix}scope:{scope_id}"

    def _reservation_key(self, reservation_id: str) -> str:
        return f"{self.prefix}reservation:{reservation_id}"

    @property
    def _open_key(self) -> str:
        return f"{self.prefix}open"

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis_py.RedisError as exc:
            raise CounterStoreUnavailable(f"counter store {self.url}: {exc}") from exc

    def close(self) -> None:
        self.client.close()

    # -- scopes ------------------------------------------------------------------------------
    def _ensure_scope(
        self, scope_id: str, limit: int, currency: str, period: Period, now: float
    ) -> None:
        anchor = anchor_of(now)
        outcome = self._call(
            self._ensure,
            keys=[self._scope_key(scope_id)],
            args=[limit, currency, period, anchor, window(period, anchor, now)[0]],
        )
        if outcome.startswith("currency:"):
            raise reopened(scope_id, outcome.partition(":")[2], currency)
        self._shapes.pop(scope_id, None)

    def _windows(self, names: Sequence[str], now: float) -> list[str]:
        """period, window start for each scope, as script arguments."""
        missing = [n for n in names if n not in self._shapes]
        if missing:
            pipe = self.client.pipeline(transaction=False)
            for name in missing:
                pipe.hmget(self._scope_key(name), "period", "anchor")
            for name, (period, anchor) in zip(missing, self._call(pipe.execute), strict=True):
                if period is not None:
                    self._shapes[name] = (as_period(period), int(anchor))
        args: list[str] = []
        for name in names:
            if name not in self._shapes:
                raise UnknownScope(name)
            period, anchor = self._shapes[name]
            args += [period, str(window(period, anchor, now)[0])]
        return args

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
        # One script per change: the settlements go first, each atomic on its own.
        self.settle_many(settle, now)
        keys = [self._reservation_key(reservation_id), self._open_key]
        keys += [self._scope_key(n) for n in names]
        for _ in range(_RETRIES):
            args = [reservation_id, micro, repr(now), json.dumps(names)]
            windows = self._windows(names, now)
            answer = self._call(self._reserve, keys=keys, args=[*args, *windows, json.dumps(meta)])
            verdict = answer[0]
            if verdict == "ok":
                return Reserved(
                    reservation_id, from_micro(int(answer[1])), tuple(json.loads(answer[2]))
                )
            if verdict == "settled":
                raise CounterError(f"reservation {reservation_id} is settled already")
            scope = names[int(answer[1]) - 1]
            if verdict == "unknown":
                self._shapes.pop(scope, None)
                raise UnknownScope(scope)
            if verdict == "refused":
                period, anchor = self._shapes[scope]
                state = require(self.describe(scope, now), scope)
                return Refused(
                    scope, from_micro(max(int(answer[2]), 0)), state.currency,
                    window(period, anchor, now)[1],
                )  # fmt: skip
            self._shapes.pop(scope, None)  # stale: its period changed; read it again
        raise CounterError(f"scopes {', '.join(names)} keep changing period; try again")

    def settle(
        self, reservation_id: str, actual: Decimal, reason: str = "", now: float | None = None
    ) -> bool:
        now = time.time() if now is None else now
        micro = to_micro(actual)
        if micro < 0:
            raise CounterError(f"cannot settle a negative amount ({actual})")
        key = self._reservation_key(reservation_id)
        scopes_json = self._call(self.client.hget, key, "scopes")
        if scopes_json is None:
            return False
        names = tuple(json.loads(scopes_json))
        known = [n for n in names if n in self._shapes or self._exists(n)]
        keys = [key, self._open_key] + [self._scope_key(n) for n in known]
        for _ in range(_RETRIES):
            args = [reservation_id, micro, repr(now), reason]
            answer = self._call(self._settle, keys=keys, args=args + self._windows(known, now))
            if answer[0] != "stale":
                return bool(answer[0] == "ok")
            self._shapes.pop(known[int(answer[1]) - 1], None)
        raise CounterError(f"scopes {', '.join(known)} keep changing period; try again")

    def settle_many(
        self, settlements: Sequence[Settlement], now: float | None = None
    ) -> list[bool]:
        now = time.time() if now is None else now
        checked(settlements)  # none is made if one is refused
        return [self.settle(s.reservation_id, s.actual, s.reason, now) for s in settlements]

    def _exists(self, scope_id: str) -> bool:
        return bool(self._call(self.client.exists, self._scope_key(scope_id)))

    # -- reads -------------------------------------------------------------------------------
    def open_reservations(self, older_than: float) -> list[Reservation]:
        ids = self._call(self.client.zrangebyscore, self._open_key, "-inf", f"({older_than!r}")
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for rid in ids:
            pipe.hmget(self._reservation_key(rid), "scopes", "amount", "created", "settled", "meta")
        out = []
        for rid, (scopes, amount, created, settled, meta) in zip(
            ids, self._call(pipe.execute), strict=True
        ):
            if scopes is not None and settled is None:
                out.append(
                    Reservation(
                        rid,
                        tuple(json.loads(scopes)),
                        from_micro(int(amount)),
                        float(created),
                        json.loads(meta or "{}"),
                    )
                )
        return out

    def describe(self, scope_id: str, now: float | None = None) -> ScopeState | None:
        now = time.time() if now is None else now
        fields = ("limit", "currency", "period", "anchor", "wstart", "spent", "reserved")
        values = self._call(self.client.hmget, self._scope_key(scope_id), *fields)
        if values[0] is None:
            return None
        limit, currency, period, anchor, wstart, spent, reserved = values
        return scope_state(
            scope_id, int(limit), currency, period, int(anchor), int(wstart), int(spent),
            int(reserved), now=now,
        )  # fmt: skip
