"""Secret-store adapters, picked by short name: `file` (embedded default) or `vault`.

Each store comes with a field cipher (`contracts.secrets.FieldCipher`, `secretstore.fields`)
for values kept encrypted outside it: the `file` store with the embedded AES-GCM key file,
`vault` with transit.

The port (`SecretStore`, `SecretNotFound`, `SecretStoreError`) is `contracts.secrets`.
Adapters are imported only when picked, so the file store never loads hvac.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from contracts.adapters import resolve
from contracts.dataroot import DataRoot
from contracts.secrets import FieldCipher, SecretStore
from contracts.settings import Settings

STORES = {
    "file": "secretstore.file:FileSecretStore",
    "vault": "secretstore.vault:VaultSecretStore",
}
"""Short name → adapter class; each is built by `from_env(env, root)`."""

STORE_ENV = (
    "VAULT_ADDR",
    "VAULT_CACERT",
    "VAULT_TOKEN",
    "VAULT_ROLE_ID",
    "VAULT_SECRET_ID",
    "VAULT_NAMESPACE",
    "VAULT_SKIP_VERIFY",
)
"""What the adapters read beyond `AUTOVIBE_*` (Vault's own variables): a process that opens
the store (`store_from_env`; the runner, to redact) is given these."""
ENV_VAR = "AUTOVIBE_SECRET_STORE"
DEFAULT = "file"


def _adapter(name: str, source: str = "") -> Any:
    return resolve("secret store", name, STORES, source=source)


def get_store(name: str, *args: Any, **options: Any) -> SecretStore:
    """The adapter called `name`, built with its own constructor's arguments."""
    store: SecretStore = _adapter(name)(*args, **options)
    return store


def store_from_env(
    env: Mapping[str, str] | None = None, settings: Settings | None = None
) -> SecretStore:
    """The store `$AUTOVIBE_SECRET_STORE` names (default `file`), configured from `env`."""
    env = os.environ if env is None else env
    root = DataRoot.at((settings or Settings()).data)
    store: SecretStore = _adapter(env.get(ENV_VAR, DEFAULT), f" (${ENV_VAR})").from_env(env, root)
    return store


def cipher_from_env(root: DataRoot, env: Mapping[str, str] | None = None) -> FieldCipher:
    """The field cipher of the configured store: `vault` → transit, `file` → embedded."""
    from secretstore.fields import KEY_FILE, EmbeddedFieldCipher, TransitFieldCipher

    env = os.environ if env is None else env
    name = env.get(ENV_VAR, DEFAULT)
    if name == "file":
        return EmbeddedFieldCipher(root)
    store = _adapter(name, f" (${ENV_VAR})").from_env(env, root)
    embedded = EmbeddedFieldCipher(root) if (root.secrets / KEY_FILE).exists() else None
    return TransitFieldCipher(store, embedded)
