"""What the platform writes from a flow never holds a credential: redaction of records.

Authorization, proxy credentials, API-key headers and cookies have their values replaced by
name; any value held in the secret store is replaced wherever it appears, as `[REDACTED]`.
Bodies are redacted as bytes by the capture addon before they are hashed and cut
(`Redactor.bytes`); `Redactor.record` redacts everything else in a record.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from contracts.dataroot import DataRoot
from contracts.records import BODY_FIELDS, HEADER_FIELDS, FlowRecord
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
        [name, REDACTED if name.lower() in SECRET_HEADERS else _redacted(value, values)]
        for name, value in headers
    ]


def _redacted(text: str, secrets: list[str]) -> str:
    """`redact_text`, without its work when no secret occurs (the common case)."""
    return redact_text(text, secrets) if any(s in text for s in secrets) else text


class Redactor:
    """Redacts records before they are spooled (no store configured: header names only)."""

    def __init__(self, cache: SecretCache | None) -> None:
        self.cache = cache
        self._from: list[str] | None = None
        self._secrets: list[str] = []
        self._encoded: list[bytes] = []

    def secrets(self) -> list[str]:
        """The store's values as they may appear in text, raw and JSON-escaped, longest first."""
        if self.cache is None:
            return []
        values = self.cache.values()
        if values is not self._from:  # recomputed only when the cache refreshed
            self._from = values
            self._secrets = sorted(redactable(values), key=len, reverse=True)
            self._encoded = [v.encode() for v in self._secrets]
        return self._secrets

    def bytes(self, data: bytes) -> bytes:
        """`data` with every secret-store value (UTF-8, raw or JSON-escaped) replaced."""
        self.secrets()
        for value in self._encoded:
            if value in data:
                data = data.replace(value, _REDACTED_BYTES)
        return data

    def record(self, record: FlowRecord) -> FlowRecord:
        """`record` redacted; its bodies and websocket messages must come redacted already.

        Headers are redacted by name and value; every other text field of the record (URL,
        path, error, budget, …) by value. The record's other fields are numbers, and its
        bodies may be megabytes: they were redacted as bytes (`bytes`).
        """
        secrets = self.secrets()
        update: dict[str, object] = {
            name: [(n, v) for n, v in redact_headers(getattr(record, name), secrets)]
            for name in HEADER_FIELDS
        }
        if secrets:
            for name, value in vars(record).items():
                if isinstance(value, str) and name not in BODY_FIELDS:
                    redacted = _redacted(value, secrets)
                    if redacted is not value:
                        update[name] = redacted
        return record.model_copy(update=update)


_REDACTED_BYTES = REDACTED.encode()


def redactor_for(root: DataRoot) -> Redactor:
    try:
        return Redactor(SecretCache(open_store(root)))
    except SecretStoreError:
        return Redactor(None)
