"""The state DB on PostgreSQL: a throwaway cluster of the machine's PostgreSQL, started here.

Runs where PostgreSQL's server binaries are installed (Debian `postgresql`); the same API
flow as on SQLite must work unchanged through `AUTOVIBE_STATE_URL`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from trial_runs import operator_api

from contracts.settings import Settings

# By its package path: tests/ops, where the harness lives, is not on sys.path here.
from tests.ops.postgres_harness import PG_BIN, cluster

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    if not PG_BIN:
        pytest.skip("PostgreSQL server binaries not installed (Debian package postgresql)")
    with cluster() as url:
        yield url


def test_trial_lifecycle_on_postgres(
    postgres_url: str, tmp_path: Path, demo_trial: dict[str, Any]
) -> None:
    settings = Settings(data=tmp_path, configs=ROOT / "configs", state_url=postgres_url)
    with operator_api(settings) as (client, _):
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
