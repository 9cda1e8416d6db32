"""LZ4-compressing old checkpoint files (`compress_after_days`) on a generated tree."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import lz4.frame
import pytest
from retention_harness import DAY_S, snapshot
from rich.filesize import decimal
from typer.testing import CliRunner

from contracts.dataroot import DataRoot
from retention import apply as deleting
from retention import compress
from retention.apply import Action, RetentionError
from retention.cli import app
from retention.policy import RetentionPolicy


@dataclass
class Checkpoints:
    root: DataRoot
    now: dt.datetime
    old: dict[Path, bytes]
    """Files that must be compressed, with their content."""
    kept: set[Path]
    """Old files retention must leave exactly as they are."""


def _put(path: Path, data: bytes, days: float, now: dt.datetime, mode: int = 0o640) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    t = now.timestamp() - days * DAY_S
    os.utime(path, (t, t))
    return path


@pytest.fixture
def ck(tmp_path: Path) -> Checkpoints:
    now = dt.datetime.now(dt.UTC)
    root = DataRoot.at(tmp_path / "data")
    base = root.root / "checkpoints" / "demo"
    disk = base / "vm" / "worker.qcow2"
    big = os.urandom(64 * 1024) + b"a" * 300_000
    old = {
        _put(base / "vm-exports" / "worker-2026.qcow2", big, 30, now): big,
        _put(base / "notes.txt", b"why this branch won\n" * 50, 8, now, 0o600): (
            b"why this branch won\n" * 50
        ),
        _put(base / "vm-snapshots" / "raw.img", b"\0" * 4096, 9, now): b"\0" * 4096,
    }
    kept = {
        _put(base / "metadata" / "c1.json", b'{"id": "c1"}', 400, now),
        _put(base / "file-manifests" / "c1.json", b'{"sha256": "x"}', 400, now),
        _put(base / "archives" / "c1.tar.lz4", lz4.frame.compress(b"tar"), 400, now),
        _put(base / "vm-snapshots" / "s1.json", json.dumps({"image": str(disk)}).encode(), 9, now),
        _put(disk, b"qcow2 with internal snapshots", 60, now),  # named by s1.json
        _put(base / "run.lock", b"", 90, now),
        _put(base / "archives" / "c2.tar.lz4.tmp", b"half", 90, now),
        _put(base / "young.txt", b"new", 7, now),  # exactly 7 days: still kept as it is
        # A worker VM image (`autovibe vm image build`): VM disks are overlays backed by it.
        _put(
            root.root / "checkpoints" / "_platform" / "vm-images" / "k1" / "root.qcow2",
            b"qcow2 base",
            60,
            now,
        ),
    }
    outside = _put(tmp_path / "outside.bin", b"o" * 1000, 90, now)
    (base / "link.bin").symlink_to(outside)
    # Not a folder the policy compresses: old, and left alone.
    kept.add(_put(root.spool_dir("demo", now.date()) / "flows.jsonl", b"{}", 90, now))
    return Checkpoints(root, now, old, kept)


def test_plan_lists_exactly_the_old_files_with_sizes(
    ck: Checkpoints, policy: RetentionPolicy
) -> None:
    actions = compress.plan(ck.root, policy, ck.now)
    assert [a.path for a in actions] == sorted(ck.old)
    assert all(a.action == "compress" for a in actions)
    got = {a.path: (a.size, a.age_days) for a in actions}
    ages = {"worker-2026.qcow2": 30, "notes.txt": 8, "raw.img": 9}
    assert got == {p: (len(data), ages[p.name]) for p, data in ck.old.items()}


def test_apply_compresses_in_place_and_loses_nothing(
    ck: Checkpoints, policy: RetentionPolicy
) -> None:
    before = snapshot(ck.root.root)
    done = compress.apply(compress.plan(ck.root, policy, ck.now), ck.root, policy)
    assert {a.path for a in done} == set(ck.old)
    for path, data in ck.old.items():
        target = path.with_name(path.name + ".lz4")
        assert not path.exists()
        assert lz4.frame.decompress(target.read_bytes()) == data
        st = target.stat()
        assert st.st_mtime_ns == before[path][1]
        assert st.st_mode & 0o777 == (0o600 if path.name == "notes.txt" else 0o640)
        assert next(a.size for a in done if a.path == path) == st.st_size
    assert next(a for a in done if a.path.name == "worker-2026.qcow2").size < 100_000
    after = snapshot(ck.root.root)
    for path in ck.kept:
        assert after[path] == before[path], path
    assert (ck.root.root / "checkpoints" / "demo" / "link.bin").is_symlink()
    assert compress.plan(ck.root, policy, ck.now) == []  # nothing left to do


def test_checkpoints_are_never_deleted_however_old(
    ck: Checkpoints, policy: RetentionPolicy
) -> None:
    later = ck.now + dt.timedelta(days=365 * 50)
    assert not any("checkpoints" in a.path.parts for a in deleting.plan(ck.root, policy, later))
    forged = Action(ck.root.root / "checkpoints" / "demo" / "notes.txt", 1, 9999, "compress")
    with pytest.raises(RetentionError, match="planned to compress"):
        deleting.apply([forged], ck.root, policy)
    assert forged.path.exists()


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("checkpoints/demo/metadata/c1.json", "leaves this file as it is"),
        ("checkpoints/demo/archives/c1.tar.lz4", "leaves this file as it is"),
        ("checkpoints/demo/run.lock", "leaves this file as it is"),
        ("checkpoints/demo/vm/worker.qcow2", "leaves this file as it is"),
        ("checkpoints/demo/link.bin", "symlink"),
        ("traffic-logs/demo", "compresses nothing under traffic-logs/"),
        ("../outside.bin", "not a file below"),
    ],
)
def test_apply_refuses_what_plan_would_never_produce(
    ck: Checkpoints, policy: RetentionPolicy, where: str, reason: str
) -> None:
    before = snapshot(ck.root.root)
    forged = [
        *compress.plan(ck.root, policy, ck.now),
        Action(ck.root.root / where, 0, 9999, "compress"),
    ]
    with pytest.raises(RetentionError, match=re.escape(reason)):
        compress.apply(forged, ck.root, policy)
    assert snapshot(ck.root.root) == before  # checked before anything changes


def test_an_interrupted_run_is_finished_only_when_the_frame_matches(
    ck: Checkpoints, policy: RetentionPolicy
) -> None:
    actions = compress.plan(ck.root, policy, ck.now)
    notes = next(a for a in actions if a.path.name == "notes.txt")
    raw = next(a for a in actions if a.path.name == "raw.img")
    notes.path.with_name("notes.txt.lz4").write_bytes(lz4.frame.compress(ck.old[notes.path]))
    compress.apply([notes], ck.root, policy)
    assert not notes.path.exists()
    raw.path.with_name("raw.img.lz4").write_bytes(lz4.frame.compress(b"something else"))
    with pytest.raises(RetentionError, match="exists and differs"):
        compress.apply([raw], ck.root, policy)
    assert raw.path.read_bytes() == ck.old[raw.path]


def test_cli_dry_run_lists_compressions_with_sizes_then_apply_does_them(ck: Checkpoints) -> None:
    env = {"AUTOVIBE_DATA": str(ck.root.root)}
    before = snapshot(ck.root.root)
    result = CliRunner().invoke(app, ["apply", "--dry-run"], env=env)
    assert result.exit_code == 0, result.output
    assert "would compress (dry run)" in result.output
    rows = [line for line in result.output.splitlines() if "│" in line]
    for path, data in ck.old.items():
        row = next(r for r in rows if str(path.relative_to(ck.root.root)) in r)
        assert [c.strip() for c in row.split("│")[3:5]] == [decimal(len(data)), "compress"]
    assert f"{len(ck.old)} files" in result.output
    assert snapshot(ck.root.root) == before

    result = CliRunner().invoke(app, ["apply"], env=env)
    assert result.exit_code == 0, result.output
    assert f"compressed {len(ck.old)} files" in result.output
    assert all(p.with_name(p.name + ".lz4").exists() for p in ck.old)
    again = CliRunner().invoke(app, ["apply"], env=env)
    assert "nothing has expired" in again.output
