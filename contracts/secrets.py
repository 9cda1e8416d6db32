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


# -- fields encrypted at rest --------------------------------------------------------------

EMBEDDED_PREFIX = "avf:v"
"""Ciphertext written by the embedded field cipher: `avf:v<key version>:<base64>`."""
TRANSIT_PREFIX = "vault:v"
"""Ciphertext written by Vault transit: `vault:v<key version>:<base64>`."""
CONTEXT = re.compile(r"[a-z][a-z0-9-]{0,62}")


class FieldCipherError(SecretStoreError):
    """A field cannot be encrypted or decrypted: no key, wrong key, tampered value."""


@runtime_checkable
class FieldCipher(Protocol):
    """Encrypts single fields kept at rest outside the store (payment receipts, destinations).

    `context` names what the field belongs to (`payments`); each context has its own key, and a
    value encrypted in one context does not decrypt in another.
    """

    def encrypt(self, context: str, plaintext: str) -> str:
        """`plaintext` as a prefixed ciphertext string (`avf:v1:…` or `vault:v1:…`)."""
        ...

    def decrypt(self, context: str, token: str) -> str:
        """The plaintext of `token`; `FieldCipherError` naming `context` if it cannot be had."""
        ...


def check_context(context: str) -> str:
    """`context` if it is a valid key context (lowercase letters, digits, '-'), else an error."""
    if not CONTEXT.fullmatch(context):
        raise FieldCipherError(
            f"invalid field context {context!r}: use lowercase letters, digits and '-', "
            "starting with a letter (e.g. payments)"
        )
    return context


def is_sealed(value: object) -> bool:
    """Whether `value` is a ciphertext some field cipher wrote (else it is plain, or legacy)."""
    return isinstance(value, str) and value.startswith((EMBEDDED_PREFIX, TRANSIT_PREFIX))


# -- credentials in URLs and log lines -----------------------------------------------------

SECRET_PARAM_WORDS = (
    "token", "key", "secret", "password", "passwd", "pwd", "auth", "signature", "sig",
    "credential", "session", "code",
)  # fmt: skip
"""A query parameter whose name contains one of these carries a credential."""
_QUERY_PARAM = re.compile(
    r"(?P<name>[?&;][\w.\-\[\]%]*(?:" + "|".join(SECRET_PARAM_WORDS) + r")[\w.\-\[\]%]*=)"
    r"(?P<value>[^&;#\s\"'\\]+)",
    re.IGNORECASE,
)
_CREDENTIAL_SHAPES = re.compile(
    r"avt_[A-Za-z0-9_\-]{16,}"  # control-API tokens
    r"|av1\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+"  # machine credentials (contracts.credentials)
)
_URL_PASSWORD = re.compile(r"(?P<user>//[^/\s:@\"'\\]+:)[^@/\s\"'\\]+@")
_BEARER = re.compile(r"(?P<scheme>\b(?:Bearer|Basic)\s+)[A-Za-z0-9._~+/=\-]+", re.IGNORECASE)


def redact_credentials(text: str) -> str:
    """`text` with credential-shaped parts replaced by `[REDACTED]`, without knowing the values.

    Values of query parameters named like credentials (`?token=`, `api_key=`, `X-Amz-Signature=`),
    URL passwords (`//user:pass@`), `Bearer`/`Basic` credentials, and autovibe's own API tokens
    and machine credentials wherever they appear.
    """
    text = _QUERY_PARAM.sub(lambda m: m["name"] + REDACTED, text)
    text = _URL_PASSWORD.sub(lambda m: m["user"] + REDACTED + "@", text)
    text = _BEARER.sub(lambda m: m["scheme"] + REDACTED, text)
    return _CREDENTIAL_SHAPES.sub(REDACTED, text)
