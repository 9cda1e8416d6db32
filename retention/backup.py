"""Backups of a data root: a consistent snapshot of what cannot be rebuilt, and its restore.

What is copied, and how each piece is kept consistent while the platform runs:

- the state DB: SQLite through the online backup API (`sqlite3.Connection.backup`), which
  copies one committed state even while other processes write in WAL mode; or, when the
  state URL is PostgreSQL, `pg_dump --format=custom` (restored with `pg_restore`);
- the traffic index and the budget counters: SQLite, through the backup API too;
- every project's `financial/` folder, each ledger read under a shared `flock` on its
  `.lock` file, so no ledger write (which holds it exclusively) is half seen;
- the data root's `configs/`, the proxy CA (`proxy/`) and `vault-secrets/` (the embedded
  secret store, its keys and the operator token), modes kept (0600 stays 0600).

Each piece is consistent on its own; pieces are taken one after another, not at one instant.
The spool (`traffic-logs/`) is not copied: it is large, append-only and better served by a
file-level backup; the index can be rebuilt from it. `backup-manifest.json` lists every file
with its size, mode and sha256; restore checks them all before writing anything.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from contracts.dataroot import DataRoot, atomic_write

MANIFEST = "backup-manifest.json"
VERSION = 1
PG_DUMP = "postgres/state.dump"
"""Where a PostgreSQL state DB's dump lies in a backup."""
_SKIP = (".lock", ".tmp", "-wal", "-shm", "-journal")


class BackupError(Exception):
    """A backup or restore was refused or failed; the message says what to do."""


@dataclass(frozen=True)
class FileRecord:
    path: str
    """Relative to the backup folder, which mirrors the data root's layout."""
    size: int
    mode: int
    sha256: str


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _sqlite_copy(src: Path, dest: Path) -> None:
    """One committed state of `src`, whatever other connections are writing."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    target = sqlite3.connect(dest)
    try:
        source.backup(target)
        target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
    finally:
        target.close()
        source.close()
    os.chmod(dest, stat.S_IMODE(src.stat().st_mode))


def _copy_tree(src: Path, dest: Path) -> None:
    """Files and folders of `src`, modes kept; locks, temp files and symlinks left out."""
    for dirpath, _dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        out = dest / here.relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        os.chmod(out, stat.S_IMODE(here.stat().st_mode))
        for name in filenames:
            path = here / name
            if name.endswith(_SKIP) or path.is_symlink():
                continue
            shutil.copy2(path, out / name)


def _copy_financial(project_dir: Path, dest: Path) -> None:
    """A project's financial folder, read under a shared lock on its ledger's lock file."""
    lock_path = project_dir / "ledger.beancount.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        try:
            _copy_tree(project_dir, dest)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _pg_url(url: str) -> str:
    """A libpq URL from a SQLAlchemy one: `postgresql+psycopg://…` → `postgresql://…`."""
    scheme, sep, rest = url.partition("://")
    return scheme.split("+", 1)[0] + sep + rest


def _run(args: list[str]) -> None:
    if shutil.which(args[0]) is None:
        raise BackupError(f"{args[0]} not found: install the PostgreSQL client (postgresql-client)")
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BackupError(f"{args[0]} failed (exit {proc.returncode}): {proc.stderr.strip()}")


def _sqlite_path(state_url: str | None, root: DataRoot) -> Path | None:
    if state_url is None:
        return root.state_db
    if state_url.startswith("sqlite:///"):
        return Path(state_url.removeprefix("sqlite:///"))
    return None


def _records(dest: Path) -> list[FileRecord]:
    found = []
    for path in sorted(p for p in dest.rglob("*") if p.is_file() and p.name != MANIFEST):
        st = path.stat()
        rel = path.relative_to(dest).as_posix()
        found.append(FileRecord(rel, st.st_size, stat.S_IMODE(st.st_mode), _sha256(path)))
    return found


def backup(root: DataRoot, dest: Path, *, state_url: str | None = None) -> dict[str, Any]:
    """Snapshot `root` into `dest` (absent or empty); returns the manifest written there."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} is not an empty folder; back up into a new one")
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(dest, 0o700)  # it holds secrets
    state_path = _sqlite_path(state_url, root)
    if state_path is None:
        assert state_url is not None
        (dest / PG_DUMP).parent.mkdir(parents=True)
        _run(["pg_dump", "--format=custom", f"--file={dest / PG_DUMP}", _pg_url(state_url)])
        state = "postgresql"
    else:
        if state_path.exists():
            _sqlite_copy(state_path, dest / root.state_db.relative_to(root.root))
        state = "sqlite"
    for db in (root.traffic_index, root.budget_counters):
        if db.exists():
            _sqlite_copy(db, dest / db.relative_to(root.root))
    financial = root.root / "financial"
    for project_dir in sorted(p for p in financial.glob("*") if p.is_dir()):
        _copy_financial(project_dir, dest / project_dir.relative_to(root.root))
    for tree in (root.configs, root.proxy_confdir, root.secrets):
        if tree.is_dir():
            _copy_tree(tree, dest / tree.relative_to(root.root))
    manifest = {
        "version": VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(),
        "data_root": str(root.root),
        "state": state,
        "files": [asdict(r) for r in _records(dest)],
    }
    # Written last and whole: a folder with a manifest is a finished backup.
    atomic_write(dest / MANIFEST, json.dumps(manifest, indent=1), mode=0o600)
    return manifest


def verify(src: Path) -> dict[str, Any]:
    """The backup's manifest, after checking every file it lists (and that it lists every file)."""
    try:
        manifest: dict[str, Any] = json.loads((src / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise BackupError(f"{src} has no {MANIFEST}: not an autovibe backup") from exc
    listed = {r["path"]: FileRecord(**r) for r in manifest["files"]}
    present = {r.path: r for r in _records(src)}
    if listed.keys() != present.keys():
        odd = sorted(listed.keys() ^ present.keys())
        raise BackupError(f"{src}: files missing or unlisted in the manifest: {odd[:5]}")
    bad = [
        p for p, r in listed.items() if present[p].sha256 != r.sha256 or present[p].size != r.size
    ]
    if bad:
        raise BackupError(f"{src}: files changed since the backup (sha256 differs): {bad[:5]}")
    return manifest


def restore(
    src: Path, root: DataRoot, *, state_url: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Bring a verified backup back into `root`, which must be empty unless `force`."""
    manifest = verify(src)
    if root.root.exists() and any(root.root.iterdir()) and not force:
        raise BackupError(f"{root.root} is not empty; restore into an empty data root or --force")
    if manifest["state"] == "postgresql":
        if state_url is None or _sqlite_path(state_url, root) is not None:
            raise BackupError("this backup holds a PostgreSQL dump: set AUTOVIBE_STATE_URL")
        _run(
            [
                "pg_restore",
                "--clean",
                "--if-exists",
                f"--dbname={_pg_url(state_url)}",
                str(src / PG_DUMP),
            ]
        )
    root.root.mkdir(parents=True, exist_ok=True)
    for record in manifest["files"]:
        rel = record["path"]
        if rel == PG_DUMP:
            continue
        target = root.root / rel
        for folder in reversed(Path(rel).parents[:-1]):
            mirrored = src / folder
            (root.root / folder).mkdir(exist_ok=True)
            os.chmod(root.root / folder, stat.S_IMODE(mirrored.stat().st_mode))
        for stale in ("-wal", "-shm", "-journal"):
            # A leftover WAL beside a restored database would be replayed into it.
            Path(f"{target}{stale}").unlink(missing_ok=True)
        # Streamed, not `atomic_write`: a database here can be larger than memory.
        tmp = target.with_name(target.name + ".restore-tmp")
        shutil.copy2(src / rel, tmp)
        os.chmod(tmp, record["mode"])
        os.replace(tmp, target)
    return manifest
