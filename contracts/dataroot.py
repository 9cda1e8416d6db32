"""The data-root layout (service, then project, then date), in one place."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class DataRoot:
    """Paths under `$AUTOVIBE_DATA`; creating a path's parent is the caller's job via `ensure`."""

    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> DataRoot:
        return cls(Path(root).resolve())

    @staticmethod
    def ensure(path: Path, mode: int = 0o700) -> Path:
        """Create `path` and its missing parents, each with `mode` whatever the umask: the data
        root holds credentials (spec.json, tokens, keys), so other users may not even list it."""
        missing = []
        probe = path
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for folder in reversed(missing):
            with contextlib.suppress(FileExistsError):  # made meanwhile by another process
                folder.mkdir()
                os.chmod(folder, mode)
        return path

    # -- traffic ----------------------------------------------------------------------------
    @property
    def traffic_logs(self) -> Path:
        return self.root / "traffic-logs"

    def spool_dir(self, project: str, day: dt.date) -> Path:
        return self.traffic_logs / project / day.isoformat()

    @property
    def traffic_index(self) -> Path:
        """Embedded traffic store (SQLite, WAL) fed from the spool."""
        return self.traffic_logs / "index.sqlite"

    # -- money ------------------------------------------------------------------------------
    def financial(self, project: str) -> Path:
        return self.root / "financial" / project

    def ledger(self, project: str) -> Path:
        return self.financial(project) / "ledger.beancount"

    @property
    def budget_counters(self) -> Path:
        """Embedded budget counter store (SQLite, WAL): reservations and spend per scope."""
        return self.root / "budget" / "counters.sqlite"

    # -- workers ----------------------------------------------------------------------------
    def assignment_dir(self, project: str, trial: str, assignment: str) -> Path:
        return self.root / "worker-artifacts" / project / trial / assignment

    # -- tasks ------------------------------------------------------------------------------
    @property
    def task_mirrors(self) -> Path:
        """Bare git mirrors of the repositories trials name by URL, one per repository."""
        return self.root / "tasks" / "mirrors"

    @property
    def task_trees(self) -> Path:
        """Trees exported from the mirrors, `<mirror>/<commit>/`, with no git history."""
        return self.root / "tasks" / "trees"

    @property
    def task_sources(self) -> Path:
        """Git repositories the platform made of imported task folders (a Harbor task's
        environment), `<task>-<commit>.git`, which the mirrors fetch from."""
        return self.root / "tasks" / "sources"

    # -- services ---------------------------------------------------------------------------
    @property
    def state_db(self) -> Path:
        return self.root / "state" / "autovibe.sqlite"

    @property
    def secrets(self) -> Path:
        return self.root / "vault-secrets"

    @property
    def operator_token(self) -> Path:
        """The operator token the API creates at first start and the CLI reads (mode 0600)."""
        return self.secrets / "operator-token"

    @property
    def proxy_confdir(self) -> Path:
        """mitmproxy's confdir: the CA generated once and handed to workers."""
        return self.root / "proxy"

    @property
    def ca_cert(self) -> Path:
        return self.proxy_confdir / "mitmproxy-ca-cert.pem"

    @property
    def model_weights(self) -> Path:
        return self.root / "model-weights"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def run(self) -> Path:
        """Pid files and service logs of `autovibe up`."""
        return self.root / "run"


def atomic_write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Replace `path` whole: write a sibling temp file, fsync it, rename, fsync the folder.

    A reader (or a crash) sees the old file or the new one, never a part of either. Callers
    that may race each other must hold their own lock: the temp name is fixed.
    """
    tmp = path.with_name(path.name + ".tmp")
    # Never through a symlink planted at the fixed temp name.
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_secret_file(path: Path, value: str) -> None:
    """Create `path` with mode 0600 atomically; never leaves a readable partial file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, value, mode=0o600)


def open_nofollow(
    path: Path, flags: int = os.O_RDONLY, mode: int = 0o600, *, below: Path | None = None
) -> int:
    """fd of `path`, refusing a symlink as its last component and, with `below`, as any
    component under `below` (a folder an untrusted process could write): `OSError` (ELOOP)."""
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if below is None:
        return os.open(path, flags, mode)
    parts = path.relative_to(below).parts
    fd = os.open(below, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            step = os.open(
                part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
            )
            os.close(fd)
            fd = step
        return os.open(parts[-1], flags, mode, dir_fd=fd)
    finally:
        os.close(fd)


def open_log(path: Path, *, append: bool = False) -> BinaryIO:
    """A log written on the host (runner, tests, runs): created, truncated or appended to,
    never through a symlink (one planted by an earlier, unconfined attempt, say)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    return os.fdopen(open_nofollow(path, flags, 0o600), "ab" if append else "wb")


def read_untrusted(path: Path, below: Path, limit: int = 64 * 1024 * 1024) -> bytes:
    """The bytes of a file an agent wrote (under `below`), read without following a symlink
    and only when it is a regular file; at most `limit` bytes."""
    fd = open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK, below=below)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(f"{path} is not a regular file")
        return fh.read(limit)
