"""Who may call which route of the control API: hashed tokens, scopes, rate limits, audit.

Tokens are random strings shown once; only their sha256 is kept, in
`<data>/vault-secrets/api-tokens.json` (mode 0600). Every route has a rule in `RULES`
naming the scopes allowed on it; a route without a rule is refused to everybody (fail
closed), and the authorization-matrix test fails until the rule is written.

Rate limits are counted in the store the budget counters use (`budget_store`: a SQLite file in
the data root, or Redis), so every API process and replica draws on one allowance per token.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import secrets
import sqlite3
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from starlette import types as asgi

from contracts.dataroot import DataRoot, write_secret_file
from contracts.settings import Settings

TOKENS_FILE = "api-tokens.json"
OPERATOR_TOKEN_ID = "operator"
"""Id of the token in `vault-secrets/operator-token`, adopted as an `admin` token."""
AUTH_KEY = "autovibe.auth"
"""Scope key under which the audit middleware hands the guard a holder for the caller's id."""
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
RATE_FILE = "rate-limits.sqlite"
"""Shared request counts of the control API (`sqlite` budget store), in `<data>/api/`."""
BUSY_TIMEOUT_S = 10.0


class TokenScope(StrEnum):
    admin = "admin"
    operator = "operator"
    viewer = "viewer"
    machine = "machine"
    """A worker's own project: payments and revenue only (`Rule.machine_project_param`)."""


ALL_SCOPES = tuple(TokenScope)


@dataclass(frozen=True)
class Rule:
    """Scopes allowed on a route; `public` routes need no token at all."""

    scopes: frozenset[TokenScope] = frozenset()
    public: bool = False
    machine_project_param: str | None = None
    """Path parameter that must equal a machine token's project (payments, revenue)."""


_READ = frozenset({TokenScope.admin, TokenScope.operator, TokenScope.viewer})
_WRITE = frozenset({TokenScope.admin, TokenScope.operator})
PUBLIC = Rule(public=True)

RULES: dict[tuple[str, str], Rule] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    ("POST", "/v1/trials"): Rule(_WRITE),
    ("GET", "/v1/trials"): Rule(_READ),
    ("GET", "/v1/trials/{trial_id}"): Rule(_READ),
    ("GET", "/v1/trials/{trial_id}/report"): Rule(_READ),
    ("POST", "/v1/trials/{trial_id}/cancel"): Rule(_WRITE),
    ("GET", "/v1/trials/{trial_id}/events"): Rule(_READ),
    ("POST", "/v1/concierge"): Rule(_WRITE),  # a draft only, but the model's calls cost
    ("POST", "/v1/intake/github"): PUBLIC,  # signed by GitHub (X-Hub-Signature-256) instead
    ("POST", "/v1/payments"): Rule(_WRITE),
    ("POST", "/v1/revenue"): Rule(_WRITE),
    ("POST", "/v1/projects/{project}/payments"): Rule(
        _WRITE | {TokenScope.machine}, machine_project_param="project"
    ),
    ("GET", "/v1/projects/{project}/payments/{payment_id}"): Rule(
        _READ | {TokenScope.machine}, machine_project_param="project"
    ),
    ("POST", "/v1/projects/{project}/revenue"): Rule(
        _WRITE | {TokenScope.machine}, machine_project_param="project"
    ),
}
"""(method, route path) → rule. `HEAD` follows `GET`."""


def rule_for(method: str, path: str) -> Rule | None:
    return RULES.get(("GET" if method == "HEAD" else method, path))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ApiToken:
    """A token as stored: never the token itself, only its hash."""

    id: str
    scope: TokenScope
    sha256: str
    created: str
    project: str | None = None
    revoked: str | None = None
    machine: str | None = None
    """The machine a machine token speaks for: its purchases are charged to that machine's
    daily allowance. A worker's own machine credential (`av1.…`) carries it too."""
    trial: str | None = None
    assignment: str | None = None
    """Of a worker's own machine credential: whose purchases these are (never stored)."""


class TokenError(Exception):
    """A token cannot be created, found or revoked as asked; the message says why."""


class TokenStore:
    """Hashed API tokens in one JSON file under the data root's secrets folder.

    Re-read whenever the file changes, so `autovibe tokens revoke` takes effect on a running API.
    """

    def __init__(self, root: DataRoot) -> None:
        self.path = root.secrets / TOKENS_FILE
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._tokens: dict[str, ApiToken] = {}

    def tokens(self) -> list[ApiToken]:
        with self._lock:
            return sorted(self._load().values(), key=lambda t: t.created)

    def create(
        self, scope: TokenScope, project: str | None = None, machine: str | None = None
    ) -> tuple[ApiToken, str]:
        """A new token and its one-time plain value."""
        if scope is TokenScope.machine and not (project and machine):
            raise TokenError(
                "a machine token needs --project and --machine: it may only touch its project, "
                "and its purchases are charged to its machine's daily allowance"
            )
        if scope is not TokenScope.machine and machine:
            raise TokenError("--machine is for machine tokens only")
        token = "avt_" + secrets.token_urlsafe(32)
        record = ApiToken(
            id="tok_" + secrets.token_hex(6),
            scope=scope,
            sha256=hash_token(token),
            created=_now(),
            project=project,
            machine=machine,
        )
        self._update(lambda tokens: tokens.__setitem__(record.id, record))
        return record, token

    def adopt(self, token: str, token_id: str, scope: TokenScope) -> None:
        """Keep an existing plain token (the operator-token file) as a hashed one, once."""
        digest = hash_token(token)

        def add(tokens: dict[str, ApiToken]) -> None:
            old = tokens.get(token_id)
            if old is None or old.sha256 != digest:
                tokens[token_id] = ApiToken(token_id, scope, digest, _now())

        with self._lock:
            known = self._load().get(token_id)
        if known is None or known.sha256 != digest:
            self._update(add)

    def revoke(self, token_id: str) -> ApiToken:
        def mark(tokens: dict[str, ApiToken]) -> None:
            if token_id not in tokens:
                raise TokenError(f"no token {token_id!r}; `autovibe tokens ls` lists them")
            old = tokens[token_id]
            tokens[token_id] = ApiToken(**{**asdict(old), "revoked": old.revoked or _now()})

        return self._update(mark)[token_id]

    def authenticate(self, token: str) -> ApiToken | None:
        """The live token whose hash matches, or None."""
        digest = hash_token(token)
        with self._lock:
            for record in self._load().values():
                if secrets.compare_digest(record.sha256, digest) and record.revoked is None:
                    return record
        return None

    def _update(self, change: Any) -> dict[str, ApiToken]:
        with self._lock:
            tokens = dict(self._load())
            change(tokens)
            data = {k: {**asdict(v), "scope": str(v.scope)} for k, v in tokens.items()}
            write_secret_file(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")
            self._stamp = None
            return self._load()

    def _load(self) -> dict[str, ApiToken]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._tokens = None, {}
            return self._tokens
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            raw = json.loads(self.path.read_text())
            self._tokens = {
                k: ApiToken(**{**v, "scope": TokenScope(v["scope"])}) for k, v in raw.items()
            }
            self._stamp = stamp
        return self._tokens


class RateLimited(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"rate limit exceeded; retry after {retry_after}s")
        self.retry_after = retry_after


class RateStoreUnavailable(Exception):
    """The shared rate-limit store cannot be reached; the guard answers 503 (fail closed)."""


WINDOW_S = 60.0
"""Rate limits count requests in any sliding window of this many seconds."""


class RateWindow(Protocol):
    """Where requests are counted, shared by every API process that uses the same store."""

    def admit(self, key: str, limit: int, now: float) -> float | None:
        """Count one request for `key` if fewer than `limit` were counted in the `WINDOW_S`
        before `now` (epoch seconds); else count nothing and return the seconds to wait."""
        ...

    def close(self) -> None: ...


class MemoryRateWindow:
    """Counts in this process only: for a single API process, and for tests."""

    def __init__(self) -> None:
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def admit(self, key: str, limit: int, now: float) -> float | None:
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - WINDOW_S:
                hits.popleft()
            if len(hits) >= limit:
                return hits[0] + WINDOW_S - now
            hits.append(now)
            return None

    def close(self) -> None:
        pass


class SqliteRateWindow:
    """Counts in one SQLite file of the data root; `BEGIN IMMEDIATE` serializes the processes."""

    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS hits (key TEXT NOT NULL, at REAL NOT NULL);
    CREATE INDEX IF NOT EXISTS hits_by_key ON hits (key, at);
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        try:
            DataRoot.ensure(path.parent, 0o700)
            self._db().executescript(self._SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise RateStoreUnavailable(f"rate-limit store {path}: {exc}") from exc

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def admit(self, key: str, limit: int, now: float) -> float | None:
        try:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM hits WHERE key = ? AND at <= ?", (key, now - WINDOW_S))
                count, oldest = db.execute(
                    "SELECT count(*), min(at) FROM hits WHERE key = ?", (key,)
                ).fetchone()
                if count >= limit:
                    db.execute("COMMIT")
                    return float(oldest) + WINDOW_S - now
                db.execute("INSERT INTO hits (key, at) VALUES (?, ?)", (key, now))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise RateStoreUnavailable(f"rate-limit store {self.path}: {exc}") from exc
        return None

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


# KEYS[1]: the key's sorted set of request times. ARGV: limit, now, window, a unique member.
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2] - ARGV[3])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tostring(oldest[2] + ARGV[3] - ARGV[2])
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(ARGV[3] * 1000))
return false
"""


class RedisRateWindow:
    """Counts in Redis (the budget counters' server and connection settings), one Lua script
    per request so that check and count are one atomic step."""

    PREFIX = "{autovibe-rate}:"

    def __init__(self, url: str) -> None:
        from budget import CounterError
        from budget.redis import RedisCounters

        try:
            self.client = RedisCounters(url).client  # one way to connect to Redis
        except CounterError as exc:
            raise RateStoreUnavailable(str(exc)) from exc
        self.url = url
        self._admit = self.client.register_script(_ADMIT)

    def admit(self, key: str, limit: int, now: float) -> float | None:
        import redis  # here, not at the top: `autovibe tokens` needs no Redis client

        member = f"{now!r}:{secrets.token_hex(4)}"
        try:
            wait = self._admit(keys=[self.PREFIX + key], args=[limit, repr(now), WINDOW_S, member])
        except redis.RedisError as exc:
            raise RateStoreUnavailable(f"rate-limit store {self.url}: {exc}") from exc
        return None if wait is None else float(wait)

    def close(self) -> None:
        self.client.close()


def rate_window(store: str, *, path: Path, url: str | None) -> RateWindow:
    """The window of the budget counter store `store`: `sqlite` at `path`, `redis` at `url`."""
    if store == "sqlite":
        return SqliteRateWindow(path)
    if store == "redis":
        if not url:
            raise RateStoreUnavailable("budget_store redis needs budget_redis_url (redis://…)")
        return RedisRateWindow(url)
    raise RateStoreUnavailable(f"unknown budget store {store!r}; allowed: sqlite, redis")


def rate_limiter(settings: Settings, root: DataRoot) -> RateLimiter:
    """The API's limiter: `settings.rate_limits`, counted where the budget counters are."""
    path = root.root / "api" / RATE_FILE
    window = rate_window(settings.budget_store, path=path, url=settings.budget_redis_url)
    return RateLimiter(settings.rate_limits, window)


class RateLimiter:
    """At most `limits[scope]` requests per token in any sliding `WINDOW_S`-second window,
    counted in `window`: shared by every API process using the same store."""

    WINDOW_S = WINDOW_S

    def __init__(self, limits: dict[str, int], window: RateWindow | None = None) -> None:
        self.limits = limits
        self.window = window or MemoryRateWindow()

    def hit(self, token: ApiToken, now: float | None = None) -> None:
        limit = self.limits.get(str(token.scope))
        if limit is None:
            return
        wait = self.window.admit(token.id, limit, time.time() if now is None else now)
        if wait is not None:
            raise RateLimited(max(1, math.ceil(wait)))


def check_cors_origins(origins: list[str]) -> list[str]:
    """The allowlist as given; a wildcard is refused (credentials travel in headers)."""
    for origin in origins:
        if "*" in origin or not origin.startswith(("http://", "https://")):
            raise ValueError(
                f"cors_origins: {origin!r} is not allowed; list exact origins like "
                "https://dash.example.com (no '*')"
            )
    return origins


class AuditLog:
    """Every mutating call as one JSONL line in `<data>/audit/<name>-YYYY-MM-DD.jsonl`: `api`
    for the control API, `intake` for what the intake channels do."""

    def __init__(self, root: DataRoot, name: str = "api") -> None:
        self.folder = root.root / "audit"
        self.name = name
        self._lock = threading.Lock()

    def path(self, day: dt.date) -> Path:
        return self.folder / f"{self.name}-{day.isoformat()}.jsonl"

    def write(self, who: str, method: str, path: str, status: int) -> None:
        self.record(who=who, method=method, path=path, status=status)

    def record(self, **fields: Any) -> None:
        """One line: the time, then `fields` (JSON values) in the order given."""
        now = dt.datetime.now(dt.UTC)
        line = json.dumps({"ts": now.isoformat().replace("+00:00", "Z"), **fields})
        with self._lock:
            DataRoot.ensure(self.folder, 0o700)
            with self.path(now.date()).open("a") as fh:
                fh.write(line + "\n")


class AuditMiddleware:
    """ASGI middleware: hands the guard a holder for the caller's token id, logs the result."""

    def __init__(self, app: asgi.ASGIApp, audit: AuditLog) -> None:
        self.app = app
        self.audit = audit

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING:
            await self.app(scope, receive, send)
            return
        holder: dict[str, str] = {}
        scope[AUTH_KEY] = holder
        status = 500

        async def send_status(message: asgi.Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.audit.write(
                holder.get("token_id", "anonymous"), scope["method"], scope["path"], status
            )


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
