"""Backup and restore of a generated data root, with a writer busy during the backup."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest
import typer
from ops_harness import ledger, secrets
from typer.testing import CliRunner

from budget import open_ample
from contracts.dataroot import DataRoot
from retention import backup as bk
from retention import backup_cli
from traffic.sqlite_store import SqliteTrafficStore

WRITER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS ticks (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
print("ready", flush=True)
end = time.time() + float(sys.argv[2])
while time.time() < end:
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO ticks (payload) VALUES (?)", ("x" * 2000,))
    db.execute("INSERT INTO ticks (payload) VALUES (?)", ("y" * 2000,))
    db.execute("COMMIT")
"""


def _ticks(path: Path) -> list[int]:
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return [r[0] for r in db.execute("SELECT id FROM ticks ORDER BY id")]
    finally:
        db.close()


def _dump(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return list(db.iterdump())
    finally:
        db.close()


@pytest.fixture
def root(tmp_path: Path) -> DataRoot:
    root = DataRoot.at(tmp_path / "data")
    root.state_db.parent.mkdir(parents=True)
    db = sqlite3.connect(root.state_db)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE ticks (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
    db.close()
    ledger(root)
    secrets(root)
    with SqliteTrafficStore(root.traffic_index):
        pass
    open_ample(root.budget_counters, "p1", ["m1"])
    return root


def test_round_trip_with_a_busy_writer(root: DataRoot, tmp_path: Path) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root.state_db), "3"], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    before = len(_ticks(root.state_db))
    dest = tmp_path / "backup"
    manifest = bk.backup(root, dest)
    after = len(_ticks(root.state_db))
    writer.wait(timeout=30)
    assert writer.returncode == 0

    copied = _ticks(dest / "state" / "autovibe.sqlite")
    # One committed state: whole transactions (pairs), a prefix of what the writer wrote.
    assert before <= len(copied) <= after and len(copied) % 2 == 0
    assert copied == list(range(1, len(copied) + 1))
    assert manifest["state"] == "sqlite"
    listed = {f["path"]: f for f in manifest["files"]}
    assert "financial/p1/ledger.beancount" in listed
    assert "financial/p1/ledger.beancount.lock" not in listed
    assert listed["vault-secrets/store.key"]["mode"] == 0o600
    assert listed["proxy/mitmproxy-ca.pem"]["mode"] == 0o600
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700

    fresh = DataRoot.at(tmp_path / "restored")
    bk.restore(dest, fresh)
    assert _ticks(fresh.state_db) == copied
    for db in (root.traffic_index, root.budget_counters):
        twin = fresh.root / db.relative_to(root.root)
        assert _dump(twin) == _dump(db)
    assert fresh.ledger("p1").read_bytes() == root.ledger("p1").read_bytes()
    for rel in (
        "vault-secrets/store.key",
        "vault-secrets/operator-token",
        "proxy/mitmproxy-ca.pem",
    ):
        assert stat.S_IMODE((fresh.root / rel).stat().st_mode) == 0o600
        assert (fresh.root / rel).read_bytes() == (root.root / rel).read_bytes()
    assert stat.S_IMODE(fresh.secrets.stat().st_mode) == 0o700
    assert (fresh.configs / "logrotate.conf").read_text() == "# rendered\n"
    # The restored ledger takes writes through ledger/book.py again.
    book = ledger(fresh)
    assert book.open(
        "p1", Decimal("20"), "CAD", {"CAD": Decimal("1.37")}, dt.date(2026, 1, 6), funding="t2"
    )


def test_ledger_is_copied_under_its_lock(root: DataRoot, tmp_path: Path) -> None:
    lock_path = root.ledger("p1").with_name("ledger.beancount.lock")
    done = threading.Event()
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a ledger write in progress
        thread = threading.Thread(target=lambda: (bk.backup(root, tmp_path / "b"), done.set()))
        thread.start()
        assert not done.wait(0.5), "the backup read the ledger while a write held its lock"
        fcntl.flock(lock, fcntl.LOCK_UN)
    thread.join(timeout=30)
    assert done.is_set()


def test_restore_refuses_full_roots_and_tampered_backups(root: DataRoot, tmp_path: Path) -> None:
    dest = tmp_path / "backup"
    bk.backup(root, dest)
    with pytest.raises(bk.BackupError, match="not an empty folder"):
        bk.backup(root, dest)
    with pytest.raises(bk.BackupError, match="not empty"):
        bk.restore(dest, root)
    # --force over a live root: a stale WAL beside the state DB must not be replayed.
    stale = Path(f"{root.state_db}-wal")
    stale.write_bytes(b"garbage")
    bk.restore(dest, root, force=True)
    assert not stale.exists()

    (dest / "financial" / "p1" / "ledger.beancount").write_text("tampered\n")
    with pytest.raises(bk.BackupError, match="sha256 differs"):
        bk.restore(dest, DataRoot.at(tmp_path / "other"))
    (dest / "extra").write_text("x")
    with pytest.raises(bk.BackupError, match="unlisted"):
        bk.verify(dest)
    with pytest.raises(bk.BackupError, match="not an autovibe backup"):
        bk.verify(tmp_path)


def test_cli(root: DataRoot, tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("backup")(backup_cli.backup)
    app.command("restore")(backup_cli.restore)
    runner = CliRunner()
    made = runner.invoke(
        app, ["backup", str(tmp_path / "b")], env={"AUTOVIBE_DATA": str(root.root)}
    )
    assert made.exit_code == 0 and "backed up" in made.output, made.output
    target = {"AUTOVIBE_DATA": str(tmp_path / "new")}
    assert runner.invoke(app, ["restore", str(tmp_path / "b")], env=target).exit_code == 0
    again = runner.invoke(app, ["restore", str(tmp_path / "b")], env=target)
    assert again.exit_code == 1 and "--force" in again.output
    assert (
        runner.invoke(app, ["restore", "--force", str(tmp_path / "b")], env=target).exit_code == 0
    )
    assert json.loads((tmp_path / "b" / bk.MANIFEST).read_text())["version"] == bk.VERSION
