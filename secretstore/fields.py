"""Field ciphers: single values encrypted at rest outside the store (the `FieldCipher` port).

`EmbeddedFieldCipher` (with the `file` store): AES-256-GCM with keys kept in
`vault-secrets/fields.key` (mode 0600), distinct from the store's own key. Values read
`avf:v<n>:<base64 nonce + ciphertext>`, n the key version; the context is bound in as
associated data, so a value copied to another context, a wrong key or one changed byte fails
loudly. `rotate` adds a key version; older values still decrypt with their own.

`TransitFieldCipher` (with the `vault` store): Vault transit, one key per context named
`autovibe-<context>`; values read `vault:v<n>:…` and the key never leaves Vault.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from contracts.dataroot import DataRoot, atomic_write
from contracts.secrets import (
    EMBEDDED_PREFIX,
    TRANSIT_PREFIX,
    FieldCipherError,
    SecretStoreError,
    check_context,
)
from secretstore.keyfile import check_private, locked

if TYPE_CHECKING:  # hvac loads only when the vault store is picked
    from secretstore.vault import VaultSecretStore

KEY_FILE = "fields.key"
LOCK_FILE = "fields.lock"
NONCE_BYTES = 12
TRANSIT_KEY_PREFIX = "autovibe-"
"""Transit key of a context: `autovibe-payments` for `payments` (configs/vault/policies/)."""


class EmbeddedFieldCipher:
    """AES-GCM field encryption with a versioned key file in `<data root>/vault-secrets/`."""

    def __init__(self, root: DataRoot) -> None:
        self.dir = root.secrets
        self.key_path = self.dir / KEY_FILE
        self.lock_path = self.dir / LOCK_FILE

    def encrypt(self, context: str, plaintext: str) -> str:
        check_context(context)
        version, keys = self._keys(create=True)
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(keys[version]).encrypt(nonce, plaintext.encode(), _aad(context))
        return f"{EMBEDDED_PREFIX}{version}:{base64.b64encode(nonce + sealed).decode()}"

    def decrypt(self, context: str, token: str) -> str:
        check_context(context)
        if token.startswith(TRANSIT_PREFIX):
            raise FieldCipherError(
                f"a {context!r} field was encrypted by Vault transit: read it with "
                "AUTOVIBE_SECRET_STORE=vault"
            )
        head, _, body = token.removeprefix(EMBEDDED_PREFIX).partition(":")
        if not token.startswith(EMBEDDED_PREFIX) or not head.isdigit() or not body:
            raise FieldCipherError(f"a {context!r} field is not an {EMBEDDED_PREFIX}<n>: value")
        version = int(head)
        _, keys = self._keys(create=False)
        if version not in keys:
            raise FieldCipherError(
                f"a {context!r} field needs key v{version}, which {self.key_path} does not have "
                f"(it has {', '.join(f'v{v}' for v in sorted(keys))}): restore the key file"
            )
        try:
            raw = base64.b64decode(body, validate=True)
            plain = AESGCM(keys[version]).decrypt(
                raw[:NONCE_BYTES], raw[NONCE_BYTES:], _aad(context)
            )
        except (binascii.Error, ValueError, InvalidTag) as exc:
            raise FieldCipherError(
                f"cannot decrypt a {context!r} field with key v{version} of {self.key_path}: "
                "wrong key or tampered value"
            ) from exc
        return plain.decode()

    def rotate(self) -> int:
        """Add a new key version and encrypt with it from now on; returns the version."""
        with locked(self.lock_path):
            keys = self._keys(create=False)[1] if self.key_path.exists() else {}
            version = max(keys, default=0) + 1
            self._write({**keys, version: AESGCM.generate_key(256)}, version)
        return version

    # -- the key file ------------------------------------------------------------------------

    def _keys(self, create: bool) -> tuple[int, dict[int, bytes]]:
        """The current version and every key, making the first key when `create` and none is."""
        if not self.key_path.exists():
            if not create:
                raise FieldCipherError(
                    f"no field key at {self.key_path}: encrypted fields cannot be read without "
                    "it; restore the key file from backup"
                )
            with locked(self.lock_path):  # two processes starting at once make only one key
                if not self.key_path.exists():
                    self._write({1: AESGCM.generate_key(256)}, 1)
        check_private(self.key_path, FieldCipherError)
        try:
            doc = json.loads(self.key_path.read_text())
            keys = {int(v): base64.b64decode(k, validate=True) for v, k in doc["keys"].items()}
            current = int(doc["current"])
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise FieldCipherError(f"{self.key_path} is not a field key file: {exc}") from exc
        if current not in keys or any(len(k) != 32 for k in keys.values()):
            raise FieldCipherError(f"{self.key_path} is not a field key file: bad key or version")
        return current, keys

    def _write(self, keys: dict[int, bytes], current: int) -> None:
        encoded = {str(v): base64.b64encode(k).decode() for v, k in sorted(keys.items())}
        doc = {"current": current, "keys": encoded}
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.key_path, json.dumps(doc, indent=1) + "\n", mode=0o600)


class TransitFieldCipher:
    """Vault transit, key `autovibe-<context>`; `avf:` values from before a move to Vault are
    read with the embedded key file when it is still there."""

    def __init__(self, vault: VaultSecretStore, embedded: EmbeddedFieldCipher | None = None):
        self.vault = vault
        self.embedded = embedded

    def encrypt(self, context: str, plaintext: str) -> str:
        return self.vault.encrypt(TRANSIT_KEY_PREFIX + check_context(context), plaintext)

    def decrypt(self, context: str, token: str) -> str:
        check_context(context)
        if token.startswith(EMBEDDED_PREFIX) and self.embedded is not None:
            return self.embedded.decrypt(context, token)
        if not token.startswith(TRANSIT_PREFIX):
            raise FieldCipherError(f"a {context!r} field is not a {TRANSIT_PREFIX}<n>: value")
        try:
            return self.vault.decrypt(TRANSIT_KEY_PREFIX + context, token)
        except FieldCipherError:
            raise
        except SecretStoreError as exc:
            raise FieldCipherError(f"cannot decrypt a {context!r} field: {exc}") from exc


def _aad(context: str) -> bytes:
    return f"autovibe-field:{context}".encode()
