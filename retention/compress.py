"""LZ4-compressing old files in place (`compress_after_days`), never deleting what they hold.

A file older than its folder's `compress_after_days` becomes `<name>.lz4` (one LZ4 frame,
same mode and mtime); the original is removed only after the frame has been read back and
matched byte for byte. Left alone: files already ending in `.lz4`, protected files (`*.lock`),
half-written `*.tmp` files, links and anything that is not a regular file, the JSON records
the checkpoint tree reads by name (`<project>/{metadata,file-manifests,vm-snapshots}/*.json`),
a VM disk image a `vm-snapshots/` record names (its internal snapshots live inside it), and
the worker VM images under `<project>/vm-images/` (every VM's disk is an overlay backed by one).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import stat
from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase
from pathlib import Path

import lz4.frame

from contracts.dataroot import DataRoot
from retention.apply import DAY_S, Action, RetentionError
from retention.policy import RetentionPolicy

SUFFIX = ".lz4"
RECORD_FOLDERS = frozenset({"metadata", "file-manifests", "vm-snapshots"})
"""Folders of `checkpoints/<project>/` whose `*.json` records are read by name."""
_CHUNK = 1 << 20


def compressing(policy: RetentionPolicy) -> dict[str, int]:
    """Top-level folders with a `compress_after_days`, and that number of days."""
    return {
        name: rule.compress_after_days
        for name, rule in sorted(policy.directories.items())
        if rule.compress_after_days is not None
    }


def plan(root: DataRoot, policy: RetentionPolicy, now: dt.datetime) -> list[Action]:
    """Every file old enough to compress, in path order, with its size; changes nothing."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    actions = []
    for name, days in compressing(policy).items():
        base = root.root / name
        if base.is_symlink() or not base.is_dir():
            continue
        images = _vm_images(base)
        for path, st in _files(base):
            age = int((now.timestamp() - st.st_mtime) // DAY_S)
            if age > days and not _skipped(path, base, policy, images):
                actions.append(Action(path, st.st_size, age, "compress"))
    return sorted(actions, key=lambda a: a.path)


def apply(actions: Sequence[Action], root: DataRoot, policy: RetentionPolicy) -> list[Action]:
    """Compress what `actions` name; returns them with `size` set to the compressed bytes.

    Every path is checked first (one that fails stops the run before anything changes); a
    file already gone is skipped.
    """
    for action in actions:
        _check(action, root, policy)
    done = []
    for action in actions:
        if not os.path.lexists(action.path):
            continue
        done.append(Action(action.path, _compress(action.path), action.age_days, "compress"))
    return done


# -- choosing files ----------------------------------------------------------------------------


def _files(base: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Regular files below `base` with their lstat; links (to files or folders) not followed."""

    def fail(exc: OSError) -> None:
        raise exc

    for dirpath, _dirnames, filenames in os.walk(base, onerror=fail):
        for name in sorted(filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                yield path, st


def _vm_images(base: Path) -> set[Path]:
    """Disk images named by `<project>/vm-snapshots/*.json` records: compressing one would
    break `qemu-img snapshot -a`."""
    images = set()
    for record in base.glob("*/vm-snapshots/*.json"):
        try:
            image = json.loads(record.read_text()).get("image")
        except (OSError, ValueError, AttributeError):
            continue  # not a record retention can read: it names nothing to protect
        if isinstance(image, str):
            images.add(Path(image))
    return images


def _skipped(path: Path, base: Path, policy: RetentionPolicy, images: set[Path]) -> bool:
    rel = path.relative_to(base)
    if path.name.endswith((SUFFIX, ".tmp")) or path in images:
        return True
    if any(fnmatchcase(path.name, p) for p in policy.protected_patterns):
        return True
    if len(rel.parts) > 2 and rel.parts[1] == "vm-images":
        return True
    return len(rel.parts) == 3 and rel.parts[1] in RECORD_FOLDERS and path.suffix == ".json"


def _check(action: Action, root: DataRoot, policy: RetentionPolicy) -> None:
    path = action.path
    try:
        rel = path.relative_to(root.root)
    except ValueError:
        raise RetentionError(
            f"refusing to compress {path}: outside the data root {root.root}"
        ) from None
    if action.action != "compress" or ".." in rel.parts or len(rel.parts) < 2:
        raise RetentionError(f"refusing to compress {path}: not a file below a data-root folder")
    if rel.parts[0] not in compressing(policy):
        raise RetentionError(
            f"refusing to compress {path}: the policy compresses nothing under {rel.parts[0]}/"
        )
    base = root.root / rel.parts[0]
    if _skipped(path, base, policy, _vm_images(base)):
        raise RetentionError(f"refusing to compress {path}: retention leaves this file as it is")
    if not os.path.lexists(path):
        return
    if Path(os.path.realpath(path)) != path or not stat.S_ISREG(path.lstat().st_mode):
        raise RetentionError(f"refusing to compress {path}: not a regular file (or via a symlink)")


# -- compressing -------------------------------------------------------------------------------


def _sha256_of_frame(path: Path) -> str:
    digest = hashlib.sha256()
    with lz4.frame.open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _compress(path: Path) -> int:
    """Replace `path` by `path.lz4`; returns the compressed size."""
    target = path.with_name(path.name + SUFFIX)
    st = path.lstat()
    digest = hashlib.sha256()
    if os.path.lexists(target):
        # An earlier run stopped after the rename: finish it only if the frame is this file.
        with path.open("rb") as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
        if _sha256_of_frame(target) != digest.hexdigest():
            raise RetentionError(f"refusing to compress {path}: {target} exists and differs")
        path.unlink()
        return target.lstat().st_size
    tmp = path.with_name(path.name + SUFFIX + ".tmp")
    with path.open("rb") as src, tmp.open("wb") as raw:
        with lz4.frame.open(raw, "wb") as out:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        raw.flush()
        os.fsync(raw.fileno())
    if _sha256_of_frame(tmp) != digest.hexdigest():
        tmp.unlink()
        raise RetentionError(f"compressing {path}: the frame read back differs; original kept")
    os.chmod(tmp, stat.S_IMODE(st.st_mode))
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, target)
    path.unlink()
    return target.lstat().st_size
