"""`autovibe secrets …` through typer's CliRunner, on the real file store and the Vault double."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner
from vault_double import ROOT_TOKEN, VaultDouble

from contracts.dataroot import DataRoot
from secretstore.cli import app
from secretstore.file import FileSecretStore

KEY = "sk-proj-0123456789abcdefWXYZ"
runner = CliRunner()


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DataRoot:
    monkeypatch.setenv("AUTOVIBE_DATA", str(tmp_path))
    monkeypatch.delenv("AUTOVIBE_SECRET_STORE", raising=False)
    return DataRoot.at(tmp_path)


def test_set_from_stdin_then_get_masked_and_revealed(data: DataRoot) -> None:
    result = runner.invoke(app, ["set", "providers/openai"], input=KEY + "\n")
    assert result.exit_code == 0, result.output
    assert KEY not in result.output and "sk-…WXYZ" in result.output
    assert FileSecretStore(data).get("providers/openai") == KEY  # the newline is not kept

    masked = runner.invoke(app, ["get", "providers/openai"])
    assert masked.exit_code == 0 and masked.stdout == "sk-…WXYZ\n"
    revealed = runner.invoke(app, ["get", "providers/openai", "--reveal"])
    assert revealed.exit_code == 0 and revealed.stdout == KEY + "\n"


def test_short_values_are_masked_whole(data: DataRoot) -> None:
    assert runner.invoke(app, ["set", "platform/pin", "12345678"]).exit_code == 0
    assert runner.invoke(app, ["get", "platform/pin"]).stdout == "****\n"


def test_ls_and_rm(data: DataRoot) -> None:
    for path in ("providers/openai", "providers/anthropic", "payments/card"):
        assert runner.invoke(app, ["set", path, "value-" + path]).exit_code == 0
    listing = runner.invoke(app, ["ls"])
    assert listing.stdout.split() == ["payments/card", "providers/anthropic", "providers/openai"]
    assert "value-" not in listing.stdout
    assert runner.invoke(app, ["ls", "providers"]).stdout.split() == [
        "providers/anthropic",
        "providers/openai",
    ]
    removed = runner.invoke(app, ["rm", "providers/openai"])
    assert removed.exit_code == 0 and "removed providers/openai" in removed.stdout
    assert FileSecretStore(data).list() == ["payments/card", "providers/anthropic"]


def test_errors_are_one_line_and_exit_nonzero(data: DataRoot) -> None:
    missing = runner.invoke(app, ["get", "providers/none"])
    assert missing.exit_code == 1
    assert "error: no secret at 'providers/none'" in missing.stderr
    assert runner.invoke(app, ["rm", "providers/none"]).exit_code == 1
    empty = runner.invoke(app, ["set", "providers/openai"], input="\n")
    assert empty.exit_code == 2 and "refusing to store an empty value" in empty.stderr
    bad = runner.invoke(app, ["set", "../etc/passwd", "x"])
    assert bad.exit_code == 1 and "invalid secret path" in bad.stderr


def test_unknown_store_name(data: DataRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOVIBE_SECRET_STORE", "consul")
    result = runner.invoke(app, ["ls"])
    assert result.exit_code == 1
    assert "secret store 'consul' ($AUTOVIBE_SECRET_STORE); allowed: file, vault" in result.stderr


@pytest.fixture
def vault(data: DataRoot, monkeypatch: pytest.MonkeyPatch) -> Iterator[VaultDouble]:
    double = VaultDouble()
    double.start()
    monkeypatch.setenv("AUTOVIBE_SECRET_STORE", "vault")
    monkeypatch.setenv("VAULT_ADDR", double.url)
    monkeypatch.setenv("VAULT_TOKEN", ROOT_TOKEN)
    yield double
    double.stop()
    assert not double.violations


def test_the_same_commands_on_vault(vault: VaultDouble, data: DataRoot) -> None:
    assert runner.invoke(app, ["set", "providers/openai"], input=KEY).exit_code == 0
    assert vault.kv["providers/openai"]["data"] == {"value": KEY}
    assert runner.invoke(app, ["get", "providers/openai"]).stdout == "sk-…WXYZ\n"
    assert runner.invoke(app, ["ls"]).stdout == "providers/openai\n"
    assert runner.invoke(app, ["rm", "providers/openai"]).exit_code == 0
    assert vault.kv == {}
    assert not data.secrets.exists()  # nothing written locally
