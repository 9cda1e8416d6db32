"""The field-cipher port with both adapters: the embedded AES-GCM key file, and Vault transit
(against the documented transit API, through the double)."""

from __future__ import annotations

import base64
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner
from vault_double import ROOT_TOKEN, VaultDouble

from contracts.dataroot import DataRoot
from contracts.secrets import FieldCipher, FieldCipherError, is_sealed
from secretstore import cipher_from_env
from secretstore.cli import app
from secretstore.fields import EmbeddedFieldCipher, TransitFieldCipher
from secretstore.file import FileSecretStore
from secretstore.vault import VaultSecretStore

CARD = "4242 4242 4242 4242 · 12/29 · ünïcode"


@pytest.fixture
def root(tmp_path: Path) -> DataRoot:
    return DataRoot.at(tmp_path / "data")


@pytest.fixture
def double() -> Iterator[VaultDouble]:
    vault = VaultDouble()
    vault.start()
    yield vault
    vault.stop()
    assert not vault.violations, "requests outside the documented API:\n" + "\n".join(
        vault.violations
    )


@pytest.fixture(params=["embedded", "transit"])
def cipher(request: pytest.FixtureRequest, root: DataRoot) -> FieldCipher:
    if request.param == "embedded":
        return EmbeddedFieldCipher(root)
    vault = request.getfixturevalue("double")
    return TransitFieldCipher(VaultSecretStore(vault.url, token=ROOT_TOKEN))


def test_round_trip_with_a_fresh_nonce_each_time(cipher: FieldCipher) -> None:
    token = cipher.encrypt("payments", CARD)
    assert is_sealed(token) and CARD not in token and "4242" not in token
    assert cipher.decrypt("payments", token) == CARD
    assert cipher.encrypt("payments", CARD) != token
    assert isinstance(cipher, FieldCipher)


def test_tampered_value_is_a_clear_error_naming_the_context(cipher: FieldCipher) -> None:
    token = cipher.encrypt("payments", CARD)
    head, _, body = token.rpartition(":")
    tampered = f"{head}:{'A' if body[0] != 'A' else 'B'}{body[1:]}"
    with pytest.raises(FieldCipherError, match="'payments' field"):
        cipher.decrypt("payments", tampered)
    with pytest.raises(FieldCipherError, match="'payments' field is not a"):
        cipher.decrypt("payments", "4242 4242 4242 4242")


def test_embedded_values_and_key_file(root: DataRoot) -> None:
    FileSecretStore(root).put("payments/card", CARD)  # the store's own key exists too
    cipher = EmbeddedFieldCipher(root)
    token = cipher.encrypt("payments", CARD)
    assert token.startswith("avf:v1:")
    key = root.secrets / "fields.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes() != (root.secrets / "store.key").read_bytes()
    # The context is bound in: the same value does not decrypt as another context's.
    with pytest.raises(FieldCipherError, match="cannot decrypt a 'receipts' field with key v1"):
        cipher.decrypt("receipts", token)
    with pytest.raises(FieldCipherError, match="invalid field context 'Pay/ments'"):
        cipher.encrypt("Pay/ments", "x")
    with pytest.raises(FieldCipherError, match="encrypted by Vault transit"):
        cipher.decrypt("payments", "vault:v1:AAAA")


def test_embedded_wrong_or_missing_key(root: DataRoot, tmp_path: Path) -> None:
    token = EmbeddedFieldCipher(root).encrypt("payments", CARD)
    key = root.secrets / "fields.key"
    saved = key.read_text()

    other = DataRoot.at(tmp_path / "other")
    EmbeddedFieldCipher(other).encrypt("payments", "x")  # another installation's key
    key.write_text((other.secrets / "fields.key").read_text())
    with pytest.raises(FieldCipherError, match="wrong key or tampered value"):
        EmbeddedFieldCipher(root).decrypt("payments", token)

    key.unlink()
    with pytest.raises(FieldCipherError, match=r"no field key at .*restore the key file"):
        EmbeddedFieldCipher(root).decrypt("payments", token)
    key.write_text(saved)
    key.chmod(0o644)
    with pytest.raises(FieldCipherError, match=r"readable by others .*chmod 600"):
        EmbeddedFieldCipher(root).decrypt("payments", token)
    key.chmod(0o600)
    key.write_text('{"current": 1, "keys": {"1": "c2hvcnQ="}}')
    with pytest.raises(FieldCipherError, match="not a field key file"):
        EmbeddedFieldCipher(root).decrypt("payments", token)
    key.write_text(saved)
    assert EmbeddedFieldCipher(root).decrypt("payments", token) == CARD


def test_embedded_rotation_keeps_old_values_readable(root: DataRoot) -> None:
    cipher = EmbeddedFieldCipher(root)
    old = cipher.encrypt("payments", "old")
    assert cipher.rotate() == 2
    new = cipher.encrypt("payments", "new")
    assert new.startswith("avf:v2:")
    assert [cipher.decrypt("payments", t) for t in (old, new)] == ["old", "new"]
    doc = json.loads((root.secrets / "fields.key").read_text())
    assert (doc["current"], sorted(doc["keys"])) == (2, ["1", "2"])
    assert stat.S_IMODE((root.secrets / "fields.key").stat().st_mode) == 0o600
    doc["keys"].pop("1")
    (root.secrets / "fields.key").write_text(json.dumps(doc))
    with pytest.raises(FieldCipherError, match=r"needs key v1, which .* does not have"):
        cipher.decrypt("payments", old)


def test_transit_requests_are_the_documented_ones(double: VaultDouble, root: DataRoot) -> None:
    cipher = TransitFieldCipher(VaultSecretStore(double.url, token=ROOT_TOKEN))
    token = cipher.encrypt("payments", "0xabc")
    assert token.startswith("vault:v1:")
    assert cipher.decrypt("payments", token) == "0xabc"
    sent = [(r.method, r.path, r.token, r.body) for r in double.requests]
    assert sent == [
        ("POST", "/v1/transit/encrypt/autovibe-payments", ROOT_TOKEN,
         {"plaintext": base64.b64encode(b"0xabc").decode()}),
        ("POST", "/v1/transit/decrypt/autovibe-payments", ROOT_TOKEN, {"ciphertext": token}),
    ]  # fmt: skip
    # Values written before the move to Vault stay readable while the key file is kept.
    old = EmbeddedFieldCipher(root).encrypt("payments", "before vault")
    with pytest.raises(FieldCipherError, match="is not a vault:v<n>: value"):
        cipher.decrypt("payments", old)
    moved = TransitFieldCipher(cipher.vault, EmbeddedFieldCipher(root))
    assert moved.decrypt("payments", old) == "before vault"
    assert len(double.requests) == 2


def test_cipher_follows_the_secret_store_setting(double: VaultDouble, root: DataRoot) -> None:
    assert isinstance(cipher_from_env(root, {}), EmbeddedFieldCipher)
    assert isinstance(cipher_from_env(root, {"AUTOVIBE_SECRET_STORE": "file"}), EmbeddedFieldCipher)
    env = {"AUTOVIBE_SECRET_STORE": "vault", "VAULT_ADDR": double.url, "VAULT_TOKEN": ROOT_TOKEN}
    transit = cipher_from_env(root, env)
    assert isinstance(transit, TransitFieldCipher) and transit.embedded is None
    assert transit.decrypt("payments", transit.encrypt("payments", "x")) == "x"
    EmbeddedFieldCipher(root).encrypt("payments", "x")
    moved = cipher_from_env(root, env)
    assert isinstance(moved, TransitFieldCipher) and moved.embedded is not None


def test_rotate_key_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, double: VaultDouble
) -> None:
    root = DataRoot.at(tmp_path)
    monkeypatch.setenv("AUTOVIBE_DATA", str(tmp_path))
    monkeypatch.delenv("AUTOVIBE_SECRET_STORE", raising=False)
    old = EmbeddedFieldCipher(root).encrypt("payments", "old")
    out = CliRunner().invoke(app, ["rotate-key"])
    assert out.exit_code == 0, out.output
    assert "new fields are encrypted with key v2" in out.output
    assert EmbeddedFieldCipher(root).encrypt("payments", "x").startswith("avf:v2:")
    assert EmbeddedFieldCipher(root).decrypt("payments", old) == "old"

    for name, value in {"AUTOVIBE_SECRET_STORE": "vault", "VAULT_ADDR": double.url}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VAULT_TOKEN", ROOT_TOKEN)
    out = CliRunner().invoke(app, ["rotate-key"])
    assert out.exit_code == 1
    assert "vault write -f transit/keys/autovibe-payments/rotate" in out.output
