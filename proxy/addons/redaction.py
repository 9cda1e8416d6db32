"""What the platform writes from a flow never holds a credential: redaction of records.

Authorization, proxy credentials, API-key headers and cookies are dropped by name; any value
held in the secret store is replaced wherever it appears, as `[REDACTED]`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from contracts.dataroot import DataRoot
from contracts.records import FlowRecord
from contracts.secrets import (
    MIN_SECRET_LEN,
    REDACTED,
    SecretStore,
    SecretStoreError,
    redact_text,
    redactable,
)
from contracts.settings import Settings

__all__ = ["REDACTED", "Redactor", "SecretCache", "redact_headers", "redact_text", "redactor_for"]

SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie", "set-cookie"}
)


def open_store(root: DataRoot) -> SecretStore:
    """The secret store the platform is configured with (`$AUTOVIBE_SECRET_STORE`, data root)."""
    from secretstore import store_from_env  # the adapters load only when a proxy needs them

    return store_from_env(settings=Settings(data=root.root))


class SecretCache:
    """Secret-store reads kept for `ttl_s` seconds, so a flow does not wait on the store."""

    def __init__(self, store: SecretStore, ttl_s: float = 30.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._values: tuple[float, list[str]] | None = None
        self._gets: dict[str, tuple[float, str]] = {}

    def get(self, path: str) -> str:
        now = time.monotonic()
        hit = self._gets.get(path)
        if hit is None or now - hit[0] > self.ttl_s:
            hit = (now, self.store.get(path))
            self._gets[path] = hit
        return hit[1]

    def values(self) -> list[str]:
        now = time.monotonic()
        if self._values is None or now - self._values[0] > self.ttl_s:
            self._values = (now, [v for v in self.store.values() if len(v) >= MIN_SECRET_LEN])
        return self._values[1]


def redact_headers(headers: Iterable[tuple[str, str]], secrets: Iterable[str]) -> list[list[str]]:
    values = list(secrets)
    return [
        [name, REDACTED if name.lower() in SECRET_HEADERS else redact_text(value, values)]
        for name, value in headers
    ]


class Redactor:
    """Redacts records before they are spooled (no store configured: nothing to look for)."""

    def __init__(self, cache: SecretCache | None) -> None:
        self.cache = cache

    def record(self, record: FlowRecord) -> FlowRecord:
        secrets = self.cache.values() if self.cache is not None else []
        if not secrets:
            return record
        # Secret values may also be JSON-escaped inside the record's text.
        text = redact_text(record.model_dump_json(), redactable(secrets))
        return FlowRecord.model_validate_json(text)


def redactor_for(root: DataRoot) -> Redactor:
    try:
        return Redactor(SecretCache(open_store(root)))
    except SecretStoreError:
        return Redactor(None)
