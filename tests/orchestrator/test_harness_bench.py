"""`python -m bench.harness` in small: the floor on the generated repo, the rows' schema, and
the fleet run (real API, scheduler and SQLite state DB; simulated runners) on 20 assignments."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import fleet, harness


def test_floor_runs_the_generated_suite_and_rows_have_the_schema(tmp_path: Path) -> None:
    repo = tmp_path / "calc"
    harness.make_repo(repo, modules=20)
    assert len(list(repo.rglob("*.py"))) == 20 + 5
    run = harness.floor_run(repo, tmp_path, n=2, machines=2)
    assert [r["agent"] for r in run["records"]] == [0.0, 0.0]
    assert all(r["wall"] >= harness.TEST_SLEEP_S for r in run["records"])
    runs = {("floor", 1): [run], ("autovibe", 1): [run]}
    rows = harness.overhead_rows(runs, n=2, machines=(1,))
    assert [r["system"] for r in rows] == ["floor", "autovibe"]
    schema = {"system", "machines", "assignments_per_min", "overhead_p50_s", "overhead_p90_s"}
    assert all(schema <= row.keys() for row in rows)
    assert rows[1]["vs_floor"] == 1.0


@pytest.mark.slow
def test_fleet_collects_every_simulated_runner(tmp_path: Path) -> None:
    row = fleet.run_fleet(tmp_path, "sqlite", "", assignments=20, machines=5, run_s=0.2)
    assert (row["assignments"], row["ended"]) == (20, "finished")
    assert row["ticks"] > 0 and row["api_gets"] > 0
    assert 0 <= row["collect_p50_s"] < 5
