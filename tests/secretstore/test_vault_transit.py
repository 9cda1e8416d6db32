"""Vault transit through the adapter: against the documented API (double) or a real Vault (live).

The live variant needs `VAULT_ADDR`/`VAULT_TOKEN` and a transit engine at
`AUTOVIBE_VAULT_TRANSIT_MOUNT` (default `transit`); it uses one key, `autovibe-test`.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator

import pytest
from vault_double import ROOT_TOKEN, VaultDouble

from contracts.secrets import SecretStoreError
from secretstore.vault import AccessDenied, VaultSecretStore

CARD = "4242 4242 4242 4242 · 12/29 · 123 · ünïcode"


@pytest.fixture
def double() -> Iterator[VaultDouble]:
    vault = VaultDouble()
    vault.start()
    yield vault
    vault.stop()
    assert not vault.violations, "requests outside the documented API:\n" + "\n".join(
        vault.violations
    )


@pytest.fixture(params=["double", pytest.param("live", marks=pytest.mark.live)])
def store(request: pytest.FixtureRequest) -> VaultSecretStore:
    if request.param == "double":
        vault = request.getfixturevalue("double")
        return VaultSecretStore(vault.url, token=ROOT_TOKEN)
    if not (os.environ.get("VAULT_ADDR") and os.environ.get("VAULT_TOKEN")):
        pytest.skip("set VAULT_ADDR and VAULT_TOKEN to run against a real Vault")
    return VaultSecretStore(
        os.environ["VAULT_ADDR"],
        token=os.environ["VAULT_TOKEN"],
        transit_mount=os.environ.get("AUTOVIBE_VAULT_TRANSIT_MOUNT", "transit"),
    )


def test_encrypt_then_decrypt_round_trips(store: VaultSecretStore) -> None:
    ciphertext = store.encrypt("autovibe-test", CARD)
    assert ciphertext.startswith("vault:v") and CARD not in ciphertext
    assert store.decrypt("autovibe-test", ciphertext) == CARD
    assert store.encrypt("autovibe-test", CARD) != ciphertext  # a fresh nonce each time


def test_tampered_ciphertext_is_a_clear_error(store: VaultSecretStore) -> None:
    ciphertext = store.encrypt("autovibe-test", CARD)
    head, _, body = ciphertext.rpartition(":")
    tampered = f"{head}:{'A' if body[0] != 'A' else 'B'}{body[1:]}"
    with pytest.raises(SecretStoreError, match="could not decrypt with transit key"):
        store.decrypt("autovibe-test", tampered)
    with pytest.raises(SecretStoreError, match="invalid ciphertext"):
        store.decrypt("autovibe-test", "not-a-vault-ciphertext")


def test_requests_are_the_documented_ones(double: VaultDouble) -> None:
    store = VaultSecretStore(double.url, token=ROOT_TOKEN)
    ciphertext = store.encrypt("cards", "4242")
    assert store.decrypt("cards", ciphertext) == "4242"
    sent = [(r.method, r.path, r.token, r.body) for r in double.requests]
    assert sent == [
        ("POST", "/v1/transit/encrypt/cards", ROOT_TOKEN,
         {"plaintext": base64.b64encode(b"4242").decode()}),
        ("POST", "/v1/transit/decrypt/cards", ROOT_TOKEN, {"ciphertext": ciphertext}),
    ]  # fmt: skip
    assert all(r.query == {} for r in double.requests)


def test_transit_mount_is_configurable(double: VaultDouble) -> None:
    double.transit_mount = "kms"
    store = VaultSecretStore(double.url, token=ROOT_TOKEN, transit_mount="kms/")
    assert store.decrypt("k", store.encrypt("k", "x")) == "x"
    assert [r.path for r in double.requests] == ["/v1/kms/encrypt/k", "/v1/kms/decrypt/k"]


def test_unknown_key_and_refused_token(double: VaultDouble) -> None:
    store = VaultSecretStore(double.url, token=ROOT_TOKEN)
    with pytest.raises(SecretStoreError, match="encryption key not found"):
        store.decrypt("never-made", "vault:v1:AAAA")
    double.revoke_tokens()
    with pytest.raises(AccessDenied, match="refused to encrypt with transit key 'k'"):
        store.encrypt("k", "x")


def test_key_name_is_one_segment(double: VaultDouble) -> None:
    store = VaultSecretStore(double.url, token=ROOT_TOKEN)
    with pytest.raises(SecretStoreError, match="invalid transit key name 'a/b'"):
        store.encrypt("a/b", "x")
    assert double.requests == []
