"""The secret-store port: where provider keys and credentials live, behind one small interface.

Paths are folder-like (`providers/openai`); every value is one string. Adapters live in
`secretstore/` and are picked by short name (`file`, `vault`); every plane imports only this.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

PATH_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
REDACTED = "[REDACTED]"
MIN_SECRET_LEN = 6
"""Shorter store values are not searched for: they would redact ordinary words."""


class SecretStoreError(Exception):
    """The store cannot be used as asked: unreachable, refused, misconfigured or corrupt."""


class SecretNotFound(SecretStoreError):
    """No secret at this path."""

    def __init__(self, path: str, where: str) -> None:
        super().__init__(f"no secret at {path!r} in {where}")
        self.path = path


@runtime_checkable
class SecretStore(Protocol):
    """A key-value store of secret strings; `list` is last so `list[str]` above means the type."""

    def get(self, path: str) -> str:
        """The value at `path`; `SecretNotFound` when there is none."""
        ...

    def put(self, path: str, value: str) -> None:
        """Create or replace the value at `path`."""
        ...

    def delete(self, path: str) -> None:
        """Remove `path`; `SecretNotFound` when there is none."""
        ...

    def values(self) -> list[str]:
        """Every stored value, so that logs and captures can be redacted."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Sorted paths of every secret below the folder `prefix` (all of them when empty)."""
        ...


def check_path(path: str) -> str:
    """`path` if it is a valid secret path, else `SecretStoreError` saying what is allowed."""
    segments = path.split("/")
    if not path or not all(PATH_SEGMENT.fullmatch(s) for s in segments):
        raise SecretStoreError(
            f"invalid secret path {path!r}: use '/'-separated segments of letters, digits, "
            "'.', '_' or '-', each starting with a letter or digit (e.g. providers/openai)"
        )
    return path


def check_prefix(prefix: str) -> str:
    """`prefix` as a folder path without slashes at either end; empty means everything."""
    folder = prefix.strip("/")
    return check_path(folder) if folder else ""


def mask(value: str) -> str:
    """A secret shown to a person: its start and end when long enough to keep most hidden."""
    if len(value) >= 16:
        return f"{value[:3]}…{value[-4:]}"
    return "****"


def redactable(values: Iterable[str]) -> list[str]:
    """The store values worth searching for, each also as it appears escaped inside JSON."""
    long_enough = [v for v in values if len(v) >= MIN_SECRET_LEN]
    return sorted({*long_enough, *(json.dumps(v)[1:-1] for v in long_enough)})


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret replaced by `[REDACTED]`, longest first."""
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text
