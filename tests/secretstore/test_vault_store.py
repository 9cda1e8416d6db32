"""The Vault adapter, real hvac, against the documented API (double) or a real Vault (live).

The scenario tests run twice: against `vault_double` (every request checked against the API
docs) and, with `pytest -m live` and `VAULT_ADDR`/`VAULT_TOKEN` set, against a real Vault.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from vault_double import ROLE_ID, ROOT_TOKEN, SECRET_ID, VaultDouble

from contracts.adapters import UnknownAdapter
from contracts.dataroot import DataRoot
from contracts.secrets import SecretNotFound, SecretStore, SecretStoreError
from secretstore import get_store, store_from_env
from secretstore.vault import VaultSecretStore

LOGIN_TOKEN = "5b1a0318-679c-9c45-e5c6-d1b9a9035d49"  # fixtures/approle_login.json


@pytest.fixture
def double() -> Iterator[VaultDouble]:
    vault = VaultDouble()
    vault.start()
    yield vault
    vault.stop()
    assert not vault.violations, "requests outside the documented API:\n" + "\n".join(
        vault.violations
    )


@dataclass
class Target:
    store: SecretStore
    base: str
    """A folder of its own, so a live run touches nothing else."""


@pytest.fixture(params=["double", pytest.param("live", marks=pytest.mark.live)])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "double":
        vault = request.getfixturevalue("double")
        yield Target(VaultSecretStore(vault.url, token=ROOT_TOKEN), "t")
        return
    if not (os.environ.get("VAULT_ADDR") and os.environ.get("VAULT_TOKEN")):
        pytest.skip("set VAULT_ADDR and VAULT_TOKEN to run against a real Vault")
    store = VaultSecretStore(
        os.environ["VAULT_ADDR"],
        token=os.environ["VAULT_TOKEN"],
        mount_point=os.environ.get("AUTOVIBE_VAULT_MOUNT", "secret"),
    )
    base = f"autovibe-test-{uuid.uuid4().hex[:8]}"
    yield Target(store, base)
    for path in store.list(base):
        store.delete(path)


# -- the same checks, double and live --------------------------------------------------------


def test_put_get_overwrite(target: Target) -> None:
    path = f"{target.base}/providers/openai"
    target.store.put(path, "sk-first-0000000000001")
    assert target.store.get(path) == "sk-first-0000000000001"
    target.store.put(path, "sk-second-000000000002")
    assert target.store.get(path) == "sk-second-000000000002"


def test_list_walks_folders_and_values_has_every_secret(target: Target) -> None:
    b = target.base
    secrets = {f"{b}/providers/openai": "o", f"{b}/providers/anthropic": "a", f"{b}/x/y/z": "z"}
    for path, value in secrets.items():
        target.store.put(path, value)
    assert target.store.list(b) == sorted(secrets)
    assert target.store.list(f"{b}/providers/") == [
        f"{b}/providers/anthropic",
        f"{b}/providers/openai",
    ]
    assert target.store.list(f"{b}/nothing-here") == []
    assert set(secrets.values()) <= set(target.store.values())


def test_missing_path_is_secret_not_found(target: Target) -> None:
    path = f"{target.base}/providers/none"
    with pytest.raises(SecretNotFound, match=f"no secret at '{path}'"):
        target.store.get(path)
    with pytest.raises(SecretNotFound):
        target.store.delete(path)


def test_delete_removes_every_version(target: Target) -> None:
    path = f"{target.base}/providers/openai"
    target.store.put(path, "v1")
    target.store.put(path, "v2")
    target.store.delete(path)
    with pytest.raises(SecretNotFound):
        target.store.get(path)
    assert target.store.list(target.base) == []


# -- exact requests (double only) ------------------------------------------------------------


def test_requests_are_the_documented_ones(double: VaultDouble) -> None:
    store = VaultSecretStore(double.url, token=ROOT_TOKEN)
    store.put("providers/openai", "sk-abc")
    assert store.get("providers/openai") == "sk-abc"
    assert store.list("providers") == ["providers/openai"]
    store.delete("providers/openai")
    sent = [(r.method, r.path, r.token, r.body) for r in double.requests]
    assert sent == [
        ("POST", "/v1/secret/data/providers/openai", ROOT_TOKEN,
         {"options": {}, "data": {"value": "sk-abc"}}),
        ("GET", "/v1/secret/data/providers/openai", ROOT_TOKEN, None),
        ("LIST", "/v1/secret/metadata/providers", ROOT_TOKEN, None),
        ("GET", "/v1/secret/metadata/providers/openai", ROOT_TOKEN, None),
        ("DELETE", "/v1/secret/metadata/providers/openai", ROOT_TOKEN, None),
    ]  # fmt: skip
    assert all(r.query == {} for r in double.requests)


def test_list_of_everything_starts_at_the_mount_root(double: VaultDouble) -> None:
    store = VaultSecretStore(double.url, token=ROOT_TOKEN)
    store.put("a", "1")
    store.put("p/q", "2")
    assert store.list() == ["a", "p/q"]
    assert store.values() == ["1", "2"]
    lists = [r.path for r in double.requests if r.method == "LIST"]
    assert lists == ["/v1/secret/metadata", "/v1/secret/metadata/p"] * 2  # hvac drops the '/'


def test_listing_skips_folders_the_policy_hides(double: VaultDouble) -> None:
    """As the proxy: it may list and read providers/ only; values() is what it could leak."""
    store = VaultSecretStore(double.url, token=ROOT_TOKEN)
    store.put("providers/openai", "sk-o")
    store.put("payments/card", "4111")
    double.denied = {"payments/"}
    assert store.list() == ["providers/openai"]
    assert store.values() == ["sk-o"]
    with pytest.raises(SecretStoreError, match=r"refused to list secret/payments/ .*policy"):
        store.list("payments")


def test_mount_point_is_configurable(double: VaultDouble) -> None:
    double.mount = "kv-autovibe"
    store = VaultSecretStore(double.url, token=ROOT_TOKEN, mount_point="kv-autovibe")
    store.put("providers/openai", "sk")
    assert double.requests[-1].path == "/v1/kv-autovibe/data/providers/openai"


def test_approle_login_then_its_token(double: VaultDouble) -> None:
    store = VaultSecretStore(double.url, role_id=ROLE_ID, secret_id=SECRET_ID)
    store.put("providers/openai", "sk")
    login, put = double.requests
    assert (login.method, login.path, login.token) == ("POST", "/v1/auth/approle/login", None)
    assert login.body == {"role_id": ROLE_ID, "secret_id": SECRET_ID}
    assert put.token == LOGIN_TOKEN


def test_expired_approle_token_logs_in_again_once(double: VaultDouble) -> None:
    store = VaultSecretStore(double.url, role_id=ROLE_ID, secret_id=SECRET_ID)
    double.kv["providers/openai"] = {"data": {"value": "sk"}, "version": 1}
    double.revoke_tokens()
    assert store.get("providers/openai") == "sk"
    got = [(r.method, r.path, r.token) for r in double.requests[1:]]
    assert got == [
        ("GET", "/v1/secret/data/providers/openai", LOGIN_TOKEN),  # 403
        ("POST", "/v1/auth/approle/login", None),
        ("GET", "/v1/secret/data/providers/openai", f"{LOGIN_TOKEN}-2"),
    ]


def test_expired_plain_token_says_what_to_check(double: VaultDouble) -> None:
    store = VaultSecretStore(double.url, token="hvs.expired")
    with pytest.raises(SecretStoreError, match=r"refused to read .*permission denied.*policy"):
        store.get("providers/openai")


def test_wrong_secret_id_is_refused_clearly(double: VaultDouble) -> None:
    with pytest.raises(SecretStoreError, match=r"AppRole login .* refused .*VAULT_SECRET_ID"):
        VaultSecretStore(double.url, role_id=ROLE_ID, secret_id="wrong")


def test_unreachable_vault(double: VaultDouble) -> None:
    url = double.url
    double.stop()
    double.start()  # a new port; the old one is closed
    with pytest.raises(SecretStoreError, match=f"cannot reach Vault at {url}"):
        VaultSecretStore(url, token=ROOT_TOKEN, timeout=2).get("providers/openai")


def test_entry_written_by_hand_without_value_field(double: VaultDouble) -> None:
    double.kv["providers/openai"] = {"data": {"api_key": "sk"}, "version": 1}
    store = VaultSecretStore(double.url, token=ROOT_TOKEN)
    with pytest.raises(SecretStoreError, match=r"no 'value' field .*api_key"):
        store.get("providers/openai")


# -- picking and configuring -----------------------------------------------------------------


def test_picked_by_short_name_from_env(double: VaultDouble, tmp_path: os.PathLike[str]) -> None:
    env = {"AUTOVIBE_SECRET_STORE": "vault", "VAULT_ADDR": double.url, "VAULT_TOKEN": ROOT_TOKEN}
    store = store_from_env(env)
    assert isinstance(store, VaultSecretStore)
    assert isinstance(get_store("vault", double.url, token=ROOT_TOKEN), VaultSecretStore)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "needs VAULT_ADDR"),
        ({"VAULT_ADDR": "http://127.0.0.1:1"}, "VAULT_TOKEN.*VAULT_ROLE_ID and VAULT_SECRET_ID"),
    ],
)
def test_incomplete_vault_config_is_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(SecretStoreError, match=message):
        VaultSecretStore.from_env(env, DataRoot.at("var"))


def test_unknown_store_name_lists_the_known_ones() -> None:
    with pytest.raises(
        UnknownAdapter, match=r"'consul' \(\$AUTOVIBE_SECRET_STORE\); allowed: file, vault"
    ):
        store_from_env({"AUTOVIBE_SECRET_STORE": "consul"})
