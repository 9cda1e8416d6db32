"""The embedded store for real: Fernet on disk, flock, atomic replace, two processes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from contracts.dataroot import DataRoot
from contracts.secrets import SecretNotFound, SecretStore, SecretStoreError
from secretstore import get_store, store_from_env
from secretstore.file import FileSecretStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def root(tmp_path: Path) -> DataRoot:
    return DataRoot.at(tmp_path / "data")


@pytest.fixture
def store(root: DataRoot) -> FileSecretStore:
    return FileSecretStore(root)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_round_trip_survives_a_new_instance(store: FileSecretStore, root: DataRoot) -> None:
    store.put("providers/openai", "sk-proj-0123456789abcdef")
    store.put("providers/anthropic", "sk-ant-xyz")
    store.put("platform/operator", "op")
    again = FileSecretStore(root)
    assert again.get("providers/openai") == "sk-proj-0123456789abcdef"
    assert again.list() == ["platform/operator", "providers/anthropic", "providers/openai"]
    assert again.list("providers") == ["providers/anthropic", "providers/openai"]
    assert again.list("providers/") == again.list("providers")
    assert again.list("provider") == []  # a folder, not a string prefix
    assert sorted(again.values()) == ["op", "sk-ant-xyz", "sk-proj-0123456789abcdef"]


def test_overwrite_and_delete(store: FileSecretStore) -> None:
    store.put("providers/openai", "one")
    store.put("providers/openai", "two")
    assert store.get("providers/openai") == "two"
    store.delete("providers/openai")
    with pytest.raises(SecretNotFound, match=r"no secret at 'providers/openai' in .*store.enc"):
        store.get("providers/openai")
    with pytest.raises(SecretNotFound):
        store.delete("providers/openai")
    assert store.list() == [] and store.values() == []


def test_is_the_default_store_in_the_data_root(
    root: DataRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(get_store("file", root), SecretStore)
    monkeypatch.setenv("AUTOVIBE_DATA", str(root.root))
    store = store_from_env({})
    assert isinstance(store, FileSecretStore)
    assert store.store_path == root.secrets / "store.enc"


def test_files_are_private_and_encrypted(store: FileSecretStore) -> None:
    store.put("providers/openai", "sk-proj-PLAINTEXT-NEVER-ON-DISK")
    assert mode(store.dir) == 0o700
    assert mode(store.key_path) == 0o600
    assert mode(store.store_path) == 0o600
    assert b"PLAINTEXT" not in store.store_path.read_bytes()
    assert b"providers" not in store.store_path.read_bytes()  # paths are secret too
    assert sorted(p.name for p in store.dir.iterdir()) == ["store.enc", "store.key", "store.lock"]


def test_wrong_key_is_a_clear_error(store: FileSecretStore) -> None:
    store.put("providers/openai", "sk")
    store.key_path.write_bytes(Fernet.generate_key())
    with pytest.raises(
        SecretStoreError,
        match=r"store.enc cannot be decrypted with .*store.key: wrong key or tampered file",
    ):
        store.get("providers/openai")


@pytest.mark.parametrize("offset", [0, 40, -1])
def test_a_flipped_byte_is_a_clear_error(store: FileSecretStore, offset: int) -> None:
    store.put("providers/openai", "sk")
    data = bytearray(store.store_path.read_bytes())
    data[offset] ^= 0x01
    store.store_path.write_bytes(bytes(data))
    with pytest.raises(SecretStoreError, match=r"wrong key or tampered file"):
        store.list()


def test_lost_key_is_not_silently_replaced(store: FileSecretStore) -> None:
    store.put("providers/openai", "sk")
    store.key_path.unlink()
    with pytest.raises(SecretStoreError, match=r"key .*store.key is missing: restore"):
        store.get("providers/openai")
    assert not store.key_path.exists()


def test_key_readable_by_others_is_refused(store: FileSecretStore) -> None:
    store.put("providers/openai", "sk")
    store.key_path.chmod(0o644)
    with pytest.raises(SecretStoreError, match=r"readable by others .*chmod 600"):
        store.get("providers/openai")


def test_not_a_key(store: FileSecretStore) -> None:
    DataRoot.ensure(store.dir, 0o700)
    fd = os.open(store.key_path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not-a-key")
    os.close(fd)
    with pytest.raises(SecretStoreError, match=r"is not a Fernet key"):
        store.list()


@pytest.mark.parametrize("path", ["", "/abs", "a//b", "../up", "a/", "with space", "a/.hidden"])
def test_bad_paths_say_what_is_allowed(store: FileSecretStore, path: str) -> None:
    with pytest.raises(SecretStoreError, match=r"invalid secret path .*e.g. providers/openai"):
        store.put(path, "x")


WRITER = """
import sys, time
from pathlib import Path
from contracts.dataroot import DataRoot
from secretstore.file import FileSecretStore
root, name, n, gate = sys.argv[1:]
store = FileSecretStore(DataRoot.at(root))
Path(gate, name).touch()
while not Path(gate, "go").exists():
    time.sleep(0.001)
for i in range(int(n)):
    store.put(f"{name}/{i}", f"value-{name}-{i}")
"""


def test_two_processes_writing_at_once_lose_nothing(root: DataRoot, tmp_path: Path) -> None:
    """Both start together on an empty data root, so they also race to create the key."""
    n, gate = 50, tmp_path / "gate"
    gate.mkdir()
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root.root), name, str(n), str(gate)], cwd=REPO
        )
        for name in ("a", "b")
    ]
    deadline = time.monotonic() + 30
    while not ((gate / "a").exists() and (gate / "b").exists()) and time.monotonic() < deadline:
        time.sleep(0.005)
    (gate / "go").touch()
    assert [w.wait(timeout=60) for w in writers] == [0, 0]
    store = FileSecretStore(root)
    assert len(store.list()) == 2 * n
    assert store.get("a/49") == "value-a-49" and store.get("b/0") == "value-b-0"
