"""`autovibe backup` / `autovibe restore` with the state DB on PostgreSQL: pg_dump, pg_restore.

A real cluster of the machine's PostgreSQL, the CLI's commands, a state DB written
through orchestrator.state: the restore brings back exactly what the backup saw, both into an
empty database (a new server) and over one that changed since (`pg_restore --clean`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from ops_harness import ledger, secrets
from postgres_harness import PG_BIN, cluster
from sqlalchemy import MetaData, create_engine, delete, select, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner, Result

from contracts.config import TrialConfig
from contracts.dataroot import DataRoot
from orchestrator.state import Assignment, Store, Trial
from retention import backup_cli
from retention.backup import MANIFEST, PG_DUMP


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    if not PG_BIN:
        pytest.skip("PostgreSQL server binaries not installed (Debian package postgresql)")
    with cluster() as url:
        yield url


def _database(server: str, name: str) -> str:
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(server).set(database=name).render_as_string(hide_password=False)


def _autovibe(*args: str, data: Path, state_url: str) -> Result:
    """`autovibe backup|restore …` in this process (the console script's own commands)."""
    app = typer.Typer()
    app.command("backup")(backup_cli.backup)
    app.command("restore")(backup_cli.restore)
    env = {"AUTOVIBE_DATA": str(data), "AUTOVIBE_STATE_URL": state_url}
    return CliRunner().invoke(app, list(args), env=env)


def _rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in primary-key order."""
    engine = create_engine(url)
    meta = MetaData()
    meta.reflect(engine)
    try:
        with engine.connect() as conn:
            return {
                name: [
                    tuple(r)
                    for r in conn.execute(select(table).order_by(*table.primary_key.columns))
                ]
                for name, table in sorted(meta.tables.items())
            }
    finally:
        engine.dispose()


def _fill(url: str, demo_trial: dict[str, Any], trial_id: str) -> None:
    store = Store(url)
    config = TrialConfig.model_validate(demo_trial | {"name": f"demo-{trial_id}"})
    with store.session() as s:
        s.add(
            Trial(
                id=trial_id, name=config.name, project="demo", config=config.model_dump(mode="json")
            )
        )
        s.flush()
        for i, state in enumerate(("queued", "running", "finished")):
            s.add(
                Assignment(
                    id=f"{trial_id}-{i:03d}",
                    trial_id=trial_id,
                    index=i,
                    task_id="mathkit-basics",
                    agent="builtin",
                    model="tiny",
                    state=state,
                )
            )
        store.add_event(s, trial_id, "trial_submitted", note="é ünïcode")
    store.engine.dispose()


def test_round_trip_through_pg_dump(
    server: str, tmp_path: Path, demo_trial: dict[str, Any]
) -> None:
    url = _database(server, "autovibe")
    _fill(url, demo_trial, "t1")
    root = DataRoot.at(tmp_path / "data")
    ledger(root, "demo")
    secrets(root)
    saw = _rows(url)
    assert len(saw["assignments"]) == 3 and len(saw["events"]) == 1

    dest = tmp_path / "backup"
    made = _autovibe("backup", str(dest), data=root.root, state_url=url)
    assert made.exit_code == 0, made.output
    assert (dest / PG_DUMP).stat().st_size > 0
    assert '"state": "postgresql"' in (dest / MANIFEST).read_text()
    assert not (dest / "state").exists()  # no SQLite state DB beside the dump

    # The database moves on after the backup: a new trial, a lost assignment.
    _fill(url, demo_trial, "t2")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(delete(Assignment).where(Assignment.id == "t1-002"))
    engine.dispose()
    assert _rows(url) != saw

    # A new server: an empty database and an empty data root.
    fresh_url = _database(server, "autovibe_restored")
    fresh = DataRoot.at(tmp_path / "fresh")
    restored = _autovibe("restore", str(dest), data=fresh.root, state_url=fresh_url)
    assert restored.exit_code == 0, restored.output
    assert _rows(fresh_url) == saw
    assert fresh.ledger("demo").read_bytes() == root.ledger("demo").read_bytes()
    assert (fresh.secrets / "operator-token").read_text() == "tok"

    # The same server, rolled back: --clean drops what came after, --force the data root.
    back = _autovibe("restore", "--force", str(dest), data=root.root, state_url=url)
    assert back.exit_code == 0, back.output
    assert _rows(url) == saw
    # Inserts go on where the restored sequences left off.
    _fill(url, demo_trial, "t3")
    assert len(_rows(url)["events"]) == 2


def test_a_postgres_backup_needs_a_postgres_url_to_restore(
    server: str, tmp_path: Path, demo_trial: dict[str, Any]
) -> None:
    url = _database(server, "autovibe_refuse")
    _fill(url, demo_trial, "t1")
    root = DataRoot.at(tmp_path / "data")
    secrets(root)
    dest = tmp_path / "backup"
    assert _autovibe("backup", str(dest), data=root.root, state_url=url).exit_code == 0
    sqlite = f"sqlite:///{tmp_path / 'state.sqlite'}"
    refused = _autovibe("restore", str(dest), data=tmp_path / "fresh", state_url=sqlite)
    assert refused.exit_code == 1
    assert "AUTOVIBE_STATE_URL" in refused.output
    assert not (tmp_path / "fresh").exists()  # nothing written
