"""The production secret store: HashiCorp Vault's KV v2 engine, through hvac.

Each secret is one KV v2 entry whose data is `{"value": <secret>}`, at `<mount>/data/<path>`.
The adapter logs in with AppRole (role_id + secret_id) or uses a given token; when an AppRole
token has expired it logs in again once and retries. `encrypt`/`decrypt` use the transit
engine (at `transit_mount`) for sensitive fields kept at rest outside Vault: only the
`vault:v<n>:...` ciphertext is stored, the key never leaves Vault.
"""

from __future__ import annotations

import base64
import binascii
import builtins
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import hvac
import requests
from hvac import exceptions as vault_errors

from contracts.dataroot import DataRoot
from contracts.secrets import SecretNotFound, SecretStoreError, check_path, check_prefix

T = TypeVar("T")
VALUE_KEY = "value"


class AccessDenied(SecretStoreError):
    """Vault answered 403: the token expired or its policy does not allow this."""


class VaultSecretStore:
    """Secrets in Vault KV v2 at `mount_point`; auth by `token` or by `role_id` + `secret_id`."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        role_id: str | None = None,
        secret_id: str | None = None,
        mount_point: str = "secret",
        approle_mount: str = "approle",
        transit_mount: str = "transit",
        namespace: str | None = None,
        verify: bool | str = True,
        timeout: float = 10,
    ) -> None:
        if not token and not (role_id and secret_id):
            raise SecretStoreError(
                f"Vault at {url}: give a token (VAULT_TOKEN) or an AppRole "
                "(VAULT_ROLE_ID and VAULT_SECRET_ID)"
            )
        self.url = url
        self.mount_point = mount_point.strip("/")
        self.approle_mount = approle_mount.strip("/")
        self.transit_mount = transit_mount.strip("/")
        self._role = (role_id, secret_id) if role_id and secret_id else None
        self.client = hvac.Client(
            url=url, token=token, namespace=namespace, verify=verify, timeout=timeout
        )
        if self._role:
            self._login()

    @classmethod
    def from_env(cls, env: Mapping[str, str], root: DataRoot) -> VaultSecretStore:
        """Vault's own variables plus `AUTOVIBE_VAULT_MOUNT` (default `secret`) and
        `AUTOVIBE_VAULT_TRANSIT_MOUNT` (default `transit`)."""
        url = env.get("VAULT_ADDR")
        if not url:
            raise SecretStoreError(
                "AUTOVIBE_SECRET_STORE=vault needs VAULT_ADDR (e.g. https://vault:8200)"
            )
        cacert = env.get("VAULT_CACERT")
        return cls(
            url,
            token=env.get("VAULT_TOKEN"),
            role_id=env.get("VAULT_ROLE_ID"),
            secret_id=env.get("VAULT_SECRET_ID"),
            mount_point=env.get("AUTOVIBE_VAULT_MOUNT", "secret"),
            transit_mount=env.get("AUTOVIBE_VAULT_TRANSIT_MOUNT", "transit"),
            namespace=env.get("VAULT_NAMESPACE"),
            verify=cacert if cacert else env.get("VAULT_SKIP_VERIFY", "") not in ("1", "true"),
        )

    def get(self, path: str) -> str:
        check_path(path)
        try:
            response = self._call(
                lambda: self.client.secrets.kv.v2.read_secret_version(
                    path=path, mount_point=self.mount_point, raise_on_deleted_version=True
                ),
                f"read {self._where(path)}",
            )
        except vault_errors.InvalidPath as exc:
            raise SecretNotFound(path, self._where()) from exc
        data = response["data"]["data"]
        if VALUE_KEY not in data:
            raise SecretStoreError(
                f"{self._where(path)} has no {VALUE_KEY!r} field (fields: {sorted(data)}); "
                f"autovibe stores each secret as {{{VALUE_KEY!r}: ...}}"
            )
        value: str = data[VALUE_KEY]
        return value

    def put(self, path: str, value: str) -> None:
        check_path(path)
        self._call(
            lambda: self.client.secrets.kv.v2.create_or_update_secret(
                path=path, secret={VALUE_KEY: value}, mount_point=self.mount_point
            ),
            f"write {self._where(path)}",
        )

    def delete(self, path: str) -> None:
        check_path(path)
        try:  # deleting metadata answers 204 even for a missing path, so look first
            self._call(
                lambda: self.client.secrets.kv.v2.read_secret_metadata(
                    path=path, mount_point=self.mount_point
                ),
                f"read metadata of {self._where(path)}",
            )
        except vault_errors.InvalidPath as exc:
            raise SecretNotFound(path, self._where()) from exc
        self._call(
            lambda: self.client.secrets.kv.v2.delete_metadata_and_all_versions(
                path=path, mount_point=self.mount_point
            ),
            f"delete {self._where(path)}",
        )

    def values(self) -> builtins.list[str]:
        """Every value this identity may read; what its policy hides it could never leak."""
        found = []
        for path in self.list():
            try:
                found.append(self.get(path))
            except AccessDenied:
                continue
        return found

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Below `prefix`, skipping sub-folders the policy does not let this identity list."""
        folder = check_prefix(prefix)
        return sorted(self._walk(f"{folder}/" if folder else "", top=True))

    # -- transit: encryption of fields at rest -------------------------------------------------

    def encrypt(self, key_name: str, plaintext: str) -> str:
        """`plaintext` encrypted with the transit key `key_name`: a `vault:v<n>:...` string."""
        where = self._transit_where("encrypt", key_name)
        encoded = base64.b64encode(plaintext.encode()).decode()
        response = self._transit(
            lambda: self.client.secrets.transit.encrypt_data(
                name=key_name, plaintext=encoded, mount_point=self.transit_mount
            ),
            f"encrypt with {where}",
        )
        ciphertext: str = response["data"]["ciphertext"]
        return ciphertext

    def decrypt(self, key_name: str, ciphertext: str) -> str:
        """The plaintext of a `vault:v<n>:...` string made by `encrypt` with the same key."""
        where = self._transit_where("decrypt", key_name)
        response = self._transit(
            lambda: self.client.secrets.transit.decrypt_data(
                name=key_name, ciphertext=ciphertext, mount_point=self.transit_mount
            ),
            f"decrypt with {where}",
        )
        try:
            return base64.b64decode(response["data"]["plaintext"], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise SecretStoreError(
                f"{where} returned a plaintext that is not base64 UTF-8 text: {exc}"
            ) from exc

    def _transit(self, request: Callable[[], T], what: str) -> T:
        try:
            return self._call(request, what)
        except vault_errors.InvalidPath as exc:
            raise SecretStoreError(
                f"Vault could not {what}: no transit engine there (enable it with "
                f"`vault secrets enable -path={self.transit_mount} transit`)"
            ) from exc

    def _transit_where(self, action: str, key_name: str) -> str:
        if "/" in key_name:
            raise SecretStoreError(f"invalid transit key name {key_name!r}: no '/' allowed")
        check_path(key_name)
        return f"transit key {key_name!r} ({self.url}/v1/{self.transit_mount}/{action}/{key_name})"

    # -- plumbing ----------------------------------------------------------------------------

    def _walk(self, folder: str, top: bool = False) -> builtins.list[str]:
        """Every secret below `folder` (empty or ending in '/'), descending into sub-folders."""
        try:
            response = self._call(
                lambda: self.client.secrets.kv.v2.list_secrets(
                    path=folder, mount_point=self.mount_point
                ),
                f"list {self._where(folder)}",
            )
        except vault_errors.InvalidPath:
            return []  # Vault answers 404 for an empty folder
        except AccessDenied:
            if top:
                raise
            return []  # another service's folder
        paths: builtins.list[str] = []
        for key in response["data"]["keys"]:
            if key.endswith("/"):
                paths += self._walk(folder + key)
            else:
                paths.append(folder + key)
        return paths

    def _login(self) -> None:
        assert self._role is not None
        role_id, secret_id = self._role
        self.client.token = None  # login is unauthenticated; never send a stale token
        try:
            self.client.auth.approle.login(
                role_id=role_id, secret_id=secret_id, mount_point=self.approle_mount
            )
        except (vault_errors.InvalidRequest, vault_errors.Forbidden) as exc:
            raise SecretStoreError(
                f"AppRole login at {self.url}/v1/auth/{self.approle_mount}/login was refused "
                f"({_reason(exc)}): check VAULT_ROLE_ID and VAULT_SECRET_ID; a secret_id "
                "expires or runs out of uses, ask the operator for a new one"
            ) from exc
        except requests.RequestException as exc:
            raise SecretStoreError(f"cannot reach Vault at {self.url}: {exc}") from exc

    def _call(self, request: Callable[[], T], what: str) -> T:
        """Run one hvac request, turning Vault's failures into `SecretStoreError`s.

        `InvalidPath` (404) passes through: what a missing path means depends on the caller.
        """
        try:
            try:
                return request()
            except vault_errors.Forbidden:
                if not self._role:
                    raise
                self._login()  # the AppRole token expired or was revoked
                return request()
        except vault_errors.InvalidPath:
            raise
        except vault_errors.Forbidden as exc:
            raise AccessDenied(
                f"Vault refused to {what} ({_reason(exc)}): the token may have expired, or its "
                f"policy lacks this capability (see configs/vault/policies/)"
            ) from exc
        except vault_errors.VaultDown as exc:
            raise SecretStoreError(f"Vault at {self.url} is sealed or down: {exc}") from exc
        except vault_errors.VaultError as exc:
            raise SecretStoreError(f"Vault could not {what}: {_reason(exc)}") from exc
        except requests.RequestException as exc:
            raise SecretStoreError(f"cannot reach Vault at {self.url}: {exc}") from exc

    def _where(self, path: str = "") -> str:
        return f"{self.mount_point}/{path} at Vault {self.url}"


def _reason(exc: vault_errors.VaultError) -> str:
    errors: Any = getattr(exc, "errors", None)
    if errors:
        return "; ".join(str(e) for e in errors)
    return str(exc) or type(exc).__name__
