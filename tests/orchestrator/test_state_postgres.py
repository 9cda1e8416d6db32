"""The state DB on PostgreSQL: a throwaway cluster of the machine's PostgreSQL, started here.

Runs where PostgreSQL's server binaries are installed (Debian `postgresql`); the same API
flow as on SQLite must work unchanged through `AUTOVIBE_STATE_URL`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from orchestrator.api import create_app

ROOT = Path(__file__).resolve().parents[2]
PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))


def _as_postgres(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI and developers run as root here.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    if not PG_BIN:
        pytest.skip("PostgreSQL server binaries not installed (Debian package postgresql)")
    bindir = PG_BIN[-1].parent
    # Not under pytest's tmp folder: the postgres user cannot enter root's 0700 folders.
    base = Path(tempfile.mkdtemp(prefix="autovibe-pg-"))
    data = base / "data"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
    subprocess.run(
        _as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]),
        check=True,
        capture_output=True,
    )
    port = free_port()
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
                f"-p {port} -k {base} -c listen_addresses=127.0.0.1",
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
        shutil.rmtree(base, ignore_errors=True)


def test_trial_lifecycle_on_postgres(
    postgres_url: str, tmp_path: Path, demo_trial: dict[str, Any]
) -> None:
    settings = Settings(data=tmp_path, configs=ROOT / "configs", state_url=postgres_url)
    app = create_app(settings, run_scheduler=False)
    token = (DataRoot.at(tmp_path).secrets / "operator-token").read_text().strip()
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        created = client.post("/v1/trials", json=demo_trial)
        assert created.status_code == 201, created.text
        trial_id = created.json()["id"]
        assert client.post("/v1/trials", json=demo_trial).status_code == 409
        view = client.get(f"/v1/trials/{trial_id}").json()
        assert len(view["assignments"]) == 6
        client.post(f"/v1/trials/{trial_id}/cancel")
        view = client.get(f"/v1/trials/{trial_id}").json()
        assert view["status"] == "cancelled"
        assert {a["state"] for a in view["assignments"]} == {"cancelled"}
        with client.stream("GET", f"/v1/trials/{trial_id}/events") as resp:
            body = "".join(resp.iter_text())
        assert "event: trial_cancelled" in body
