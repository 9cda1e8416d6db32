"""A throwaway cluster of the machine's PostgreSQL (Debian `postgresql`), for real tests.

initdb into a fresh folder, `pg_ctl start` on a free port (TCP on 127.0.0.1, trust auth),
stop and remove it afterwards. Used by the backup tests here and by
tests/orchestrator/test_state_postgres.py (as `tests.ops.postgres_harness`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from contracts.settings import free_port

PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
"""pg_ctl of each installed major version; empty when PostgreSQL is not installed."""


def _as_postgres(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI and developers run as root here.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


@contextmanager
def cluster() -> Iterator[str]:
    """A running cluster; yields its superuser URL (`postgresql+psycopg://…/postgres`)."""
    bindir = PG_BIN[-1].parent
    # Not under pytest's tmp folder: the postgres user cannot enter root's 0700 folders.
    base = Path(tempfile.mkdtemp(prefix="autovibe-pg-"))
    data = base / "data"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
    try:
        subprocess.run(
            _as_postgres(
                [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]
            ),
            check=True,
            capture_output=True,
        )
        port = free_port()
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            _as_postgres(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(base / "log"),
                    "-w",
                    "-o",
                    options,
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(
                _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
                capture_output=True,
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
