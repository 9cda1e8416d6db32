"""A real data tree with old and new files, and what the shipped policy must delete from it."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

from contracts.dataroot import DataRoot

DAY_S = 86400


@dataclass
class Tree:
    root: DataRoot
    outside: Path
    """A folder beside the data root that links inside it point to; must never be touched."""
    now: dt.datetime
    expired: dict[Path, tuple[int, int]] = field(default_factory=dict)
    """Expected plan: unit → (bytes it frees, age in days)."""
    survivors: set[Path] = field(default_factory=set)
    """Protected files inside expired units, which stay."""


def _write(path: Path, size: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return size


def _age_tree(top: Path, days: float, now: dt.datetime) -> None:
    """Set the mtime of `top` and everything in it to `days` ago, children first."""
    t = now.timestamp() - days * DAY_S
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        for name in (*filenames, *dirnames):
            os.utime(Path(dirpath, name), (t, t), follow_symlinks=False)
    os.utime(top, (t, t))


def build(base: Path) -> Tree:
    """traffic-logs, worker-artifacts, financial and checkpoints, each with old and new things."""
    now = dt.datetime.now(dt.UTC)
    today = now.date()
    tree = Tree(DataRoot.at(base / "data"), base / "outside", now)
    root = tree.root.root
    _write(tree.outside / "precious.txt", 10)
    _age_tree(tree.outside, 1000, now)

    # traffic-logs: by the UTC day naming the folder; 30 days old is still kept.
    for project, age, size in [("demo", 40, 1000), ("demo", 31, 500), ("demo", 30, 7)]:
        spool = tree.root.spool_dir(project, today - dt.timedelta(days=age))
        _write(spool / "flows.jsonl", size)
        if age > 30:
            tree.expired[spool] = (size, age)
    _write(tree.root.spool_dir("demo", today - dt.timedelta(days=1)) / "flows.jsonl", 9)
    locked = tree.root.spool_dir("other", today - dt.timedelta(days=100))
    _write(locked / "flows.jsonl", 300)
    _write(locked / "flows.jsonl.lock", 1)
    tree.expired[locked] = (300, 100)
    tree.survivors.add(locked / "flows.jsonl.lock")
    _write(tree.root.traffic_logs / "demo" / "notes" / "readme.txt", 5)  # not a day: left alone
    _write(tree.root.traffic_index, 4096)
    (tree.root.traffic_logs / "linked").symlink_to(tree.outside)
    _age_tree(tree.root.traffic_logs / "demo" / "notes", 400, now)
    os.utime(tree.root.traffic_index, (now.timestamp() - 400 * DAY_S,) * 2)

    # worker-artifacts: a <project>/<trial>/ by the newest mtime inside it.
    old = tree.root.assignment_dir("demo", "t-old", "a1")
    size = _write(old / "transcript.jsonl", 2000) + _write(old / "workspace" / "main.py", 123)
    _write(old / "runner.lock", 5)
    (old / "escape").symlink_to(tree.outside)
    size += len(str(tree.outside).encode())  # a link is removed as a link: its own size
    _age_tree(old.parent, 120, now)
    tree.expired[old.parent] = (size, 120)
    tree.survivors.add(old / "runner.lock")

    new = tree.root.assignment_dir("demo", "t-new", "a1")
    _write(new / "transcript.jsonl", 50)
    _age_tree(new.parent, 10, now)
    busy = tree.root.assignment_dir("demo", "t-busy", "a1")
    _write(busy / "transcript.jsonl", 70)
    _age_tree(busy.parent, 200, now)
    _write(busy / "workspace" / "still-writing.py", 3)  # written now, deep inside an old trial
    (tree.root.root / "worker-artifacts" / "demo" / "t-link").symlink_to(tree.outside)

    # financial and checkpoints: far older than any limit, never deleted.
    ledger = tree.root.ledger("demo")
    _write(ledger, 800)
    _write(ledger.with_name(ledger.name + ".lock"), 0)
    _write(tree.root.financial("demo") / "receipts" / "r1.pdf", 64)
    _age_tree(root / "financial", 3650, now)
    _write(root / "checkpoints" / "demo" / "vm-snapshots" / "snap.img", 256)
    _age_tree(root / "checkpoints", 3650, now)
    return tree


def snapshot(top: Path) -> dict[Path, tuple[int, int]]:
    """Every path under `top` (links not followed) with its size and mtime in ns."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in (*dirnames, *filenames):
            st = Path(dirpath, name).lstat()
            out[Path(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return out
