"""The embedded secret store: one Fernet-encrypted JSON file in the data root.

`vault-secrets/store.enc` holds every secret; `vault-secrets/store.key` holds the key (0600).
Every operation takes an exclusive flock on `store.lock`, so processes sharing the data root
never lose each other's writes, and writes replace the file atomically.
"""

from __future__ import annotations

import builtins
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from contracts.dataroot import DataRoot, write_secret_file
from contracts.secrets import SecretNotFound, SecretStoreError, check_path, check_prefix
from secretstore.keyfile import check_private, locked

STORE_FILE = "store.enc"
KEY_FILE = "store.key"
LOCK_FILE = "store.lock"
FORMAT_VERSION = 1


class FileSecretStore:
    """Secrets encrypted at rest in `<data root>/vault-secrets/`, for one machine."""

    def __init__(self, root: DataRoot) -> None:
        self.dir = root.secrets
        self.store_path = self.dir / STORE_FILE
        self.key_path = self.dir / KEY_FILE
        self.lock_path = self.dir / LOCK_FILE

    @classmethod
    def from_env(cls, env: Mapping[str, str], root: DataRoot) -> FileSecretStore:
        return cls(root)

    def get(self, path: str) -> str:
        check_path(path)
        with self._locked() as fernet:
            secrets = self._read(fernet)
        if path not in secrets:
            raise SecretNotFound(path, str(self.store_path))
        return secrets[path]

    def put(self, path: str, value: str) -> None:
        check_path(path)
        with self._locked() as fernet:
            secrets = self._read(fernet)
            secrets[path] = value
            self._write(fernet, secrets)

    def delete(self, path: str) -> None:
        check_path(path)
        with self._locked() as fernet:
            secrets = self._read(fernet)
            if secrets.pop(path, None) is None:
                raise SecretNotFound(path, str(self.store_path))
            self._write(fernet, secrets)

    def values(self) -> builtins.list[str]:
        with self._locked() as fernet:
            return builtins.list(self._read(fernet).values())

    def list(self, prefix: str = "") -> builtins.list[str]:
        folder = check_prefix(prefix)
        with self._locked() as fernet:
            paths = self._read(fernet)
        return sorted(p for p in paths if not folder or p.startswith(folder + "/"))

    # -- the file ----------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[Fernet]:
        with locked(self.lock_path):
            yield self._fernet()

    def _fernet(self) -> Fernet:
        """The store's key, created on first use; called under the lock so only one is made."""
        if not self.key_path.exists():
            if self.store_path.exists():
                raise SecretStoreError(
                    f"{self.store_path} exists but its key {self.key_path} is missing: restore "
                    "the key file from backup (a new key cannot decrypt the store)"
                )
            write_secret_file(self.key_path, Fernet.generate_key().decode())
        check_private(self.key_path, SecretStoreError)
        try:
            return Fernet(self.key_path.read_bytes().strip())
        except ValueError as exc:
            raise SecretStoreError(
                f"{self.key_path} is not a Fernet key (32 url-safe base64-encoded bytes)"
            ) from exc

    def _read(self, fernet: Fernet) -> dict[str, str]:
        if not self.store_path.exists():
            return {}
        try:
            plain = fernet.decrypt(self.store_path.read_bytes())
        except InvalidToken as exc:
            raise SecretStoreError(
                f"{self.store_path} cannot be decrypted with {self.key_path}: "
                "wrong key or tampered file"
            ) from exc
        doc = json.loads(plain)
        if doc.get("version") != FORMAT_VERSION:
            raise SecretStoreError(
                f"{self.store_path} has format version {doc.get('version')!r}; "
                f"this autovibe reads version {FORMAT_VERSION}"
            )
        secrets: dict[str, str] = doc["secrets"]
        return secrets

    def _write(self, fernet: Fernet, secrets: dict[str, str]) -> None:
        token = fernet.encrypt(json.dumps({"version": FORMAT_VERSION, "secrets": secrets}).encode())
        tmp = self.store_path.with_suffix(".enc.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(token)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.store_path)
        _fsync_dir(self.dir)


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
