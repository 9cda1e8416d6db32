"""plan / apply / `retention apply` on a generated data tree with old and new files."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from retention_harness import Tree, snapshot
from rich.filesize import decimal
from typer.testing import CliRunner

from retention.apply import Action, RetentionError, apply, plan
from retention.cli import app
from retention.policy import RetentionPolicy


def _expected_after(tree: Tree, before: dict[Path, tuple[int, int]]) -> set[Path]:
    """What must remain: everything outside the expired units, plus their protected files
    and the folders holding those."""
    keep = set()
    for path in before:
        unit = next((u for u in tree.expired if path == u or u in path.parents), None)
        if unit is None:
            keep.add(path)
    for file in tree.survivors:
        keep.add(file)
        keep.update(p for p in file.parents if p in before)
    return keep


def test_plan_lists_exactly_the_expired_units_with_sizes(
    tree: Tree, policy: RetentionPolicy
) -> None:
    actions = plan(tree.root, policy, tree.now)
    got = {a.path: (a.size, a.age_days) for a in actions}
    assert got == tree.expired
    assert all(a.action == "delete" for a in actions)
    assert [a.path for a in actions] == sorted(a.path for a in actions)


def test_apply_deletes_the_expired_and_nothing_else(tree: Tree, policy: RetentionPolicy) -> None:
    before = snapshot(tree.root.root)
    outside = snapshot(tree.outside)
    done = apply(plan(tree.root, policy, tree.now), tree.root, policy)
    assert {a.path for a in done} == set(tree.expired)
    after = snapshot(tree.root.root)
    assert set(after) == _expected_after(tree, before)
    # Untouched entries are untouched, not rewritten; only parents of deleted units changed.
    changed = {p for p in after if after[p] != before[p]}
    assert changed <= {u.parent for u in tree.expired} | {
        p for f in tree.survivors for p in f.parents
    }
    assert snapshot(tree.outside) == outside
    assert plan(tree.root, policy, tree.now) == []  # nothing left to do; lock-only folders stay


def test_financial_checkpoints_and_locks_survive_any_age(
    tree: Tree, policy: RetentionPolicy
) -> None:
    later = tree.now + dt.timedelta(days=365 * 50)
    apply(plan(tree.root, policy, later), tree.root, policy)
    root = tree.root.root
    assert tree.root.ledger("demo").read_bytes() == b"x" * 800
    assert tree.root.ledger("demo").with_suffix(".beancount.lock").exists()
    assert (tree.root.financial("demo") / "receipts" / "r1.pdf").exists()
    assert (root / "checkpoints" / "demo" / "vm-snapshots" / "snap.img").exists()
    locks = sorted(p.name for p in root.rglob("*.lock"))
    assert locks == ["flows.jsonl.lock", "ledger.beancount.lock", "runner.lock"]
    artifacts = root / "worker-artifacts"
    left = {p.relative_to(artifacts).as_posix() for p in snapshot(artifacts)}
    assert left == {
        "demo",
        "demo/t-link",
        "demo/t-old",
        "demo/t-old/a1",
        "demo/t-old/a1/runner.lock",
    }
    assert (tree.outside / "precious.txt").exists()


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("financial/demo", "not a <folder>/<project>/<unit>"),
        ("financial/demo/x", "deletes nothing under financial/"),
        ("checkpoints/demo/vm-snapshots", "deletes nothing under checkpoints/"),
        ("worker-artifacts/demo/t-link", "symlink"),
        ("traffic-logs/linked/x", "symlink"),
        ("../outside/x", "not a <folder>"),
    ],
)
def test_apply_refuses_what_plan_would_never_produce(
    tree: Tree, policy: RetentionPolicy, where: str, reason: str
) -> None:
    before = snapshot(tree.root.root)
    if where == "traffic-logs/linked/x":
        (tree.outside / "x").mkdir()
    forged = [*plan(tree.root, policy, tree.now), Action(tree.root.root / where, 0, 9999)]
    with pytest.raises(RetentionError, match=re.escape(reason)):
        apply(forged, tree.root, policy)
    assert snapshot(tree.root.root) == before  # checked before anything is deleted


def test_apply_refuses_paths_outside_the_root(tree: Tree, policy: RetentionPolicy) -> None:
    with pytest.raises(RetentionError, match="outside the data root"):
        apply([Action(tree.outside, 10, 1000)], tree.root, policy)
    assert (tree.outside / "precious.txt").exists()


def test_plan_needs_an_aware_now(tree: Tree, policy: RetentionPolicy) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        plan(tree.root, policy, dt.datetime.now())


def test_cli_dry_run_lists_sizes_and_deletes_nothing(tree: Tree) -> None:
    before = snapshot(tree.root.root)
    result = CliRunner().invoke(
        app, ["apply", "--dry-run"], env={"AUTOVIBE_DATA": str(tree.root.root)}
    )
    assert result.exit_code == 0, result.output
    assert "would delete (dry run)" in result.output
    rows = [line for line in result.output.splitlines() if "│" in line]
    for unit, (size, age) in tree.expired.items():
        row = next(r for r in rows if str(unit.relative_to(tree.root.root)) in r)
        assert [c.strip() for c in row.split("│")[2:4]] == [str(age), decimal(size)]
    listed = [r for r in rows if re.search(r"(traffic-logs|worker-artifacts)/", r)]
    assert len(listed) == len(tree.expired)
    total = sum(size for size, _ in tree.expired.values())
    assert f"{len(tree.expired)} folders" in result.output and decimal(total) in result.output
    assert snapshot(tree.root.root) == before


def test_cli_apply_deletes_and_reports(tree: Tree) -> None:
    env = {"AUTOVIBE_DATA": str(tree.root.root)}
    result = CliRunner().invoke(app, ["apply"], env=env)
    assert result.exit_code == 0, result.output
    assert f"deleted {len(tree.expired)} folders" in result.output
    assert not any(u.exists() and any(u.rglob("*.jsonl")) for u in tree.expired)
    again = CliRunner().invoke(app, ["apply"], env=env)
    assert "nothing has expired" in again.output


def test_cli_reports_a_bad_policy_with_its_line(tree: Tree, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("directories:\n  traffic-logs:\n    keep_days: -1\n    expire_by: day-folder\n")
    result = CliRunner().invoke(
        app, ["apply", "--policy", str(bad)], env={"AUTOVIBE_DATA": str(tree.root.root)}
    )
    assert result.exit_code == 2
    assert f"{bad}: line 3: directories.traffic-logs.keep_days:" in result.output
