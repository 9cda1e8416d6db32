"""What has expired under the data root (`plan`), and deleting it (`apply`).

A unit of expiry is a `<project>/<folder>/` two levels below a policy's top-level folder:
`traffic-logs/<project>/<YYYY-MM-DD>/`, `worker-artifacts/<project>/<trial>/`. Symbolic links
are never followed (a link is removed as a link), protected files (`*.lock`) stay in place
with the folders that hold them, and `apply` re-checks every path against the data root and
the policy, so a hand-made or stale plan cannot delete more than `plan` would.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

from contracts.dataroot import DataRoot
from retention.policy import DirectoryPolicy, RetentionPolicy

DAY_S = 86400
_DAY_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class RetentionError(Exception):
    """An action that must not be carried out; the message names the path and the rule."""


@dataclass(frozen=True)
class Action:
    path: Path
    """Absolute path of the expired `<project>/<folder>/`."""
    size: int
    """Bytes of the files it removes (protected files excluded)."""
    age_days: int
    action: Literal["delete", "compress"] = "delete"
    """`compress`: `path` is one file, `size` its bytes (`retention.compress`)."""


def plan(root: DataRoot, policy: RetentionPolicy, now: dt.datetime) -> list[Action]:
    """Every expired unit under `root`, in path order; deletes nothing."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (day folders are UTC dates)")
    protected = policy.protected_patterns
    actions = []
    for name, rule in policy.deleting().items():
        assert rule.keep_days is not None  # `deleting()` only yields rules with a limit
        for unit in _units(root.root / name):
            age = _age_days(unit, rule, now)
            if age is None or age <= rule.keep_days:
                continue
            size, removable = _measure(unit, protected)
            if removable:
                actions.append(Action(unit, size, age))
    return actions


def apply(actions: Sequence[Action], root: DataRoot, policy: RetentionPolicy) -> list[Action]:
    """Delete what `actions` name, keeping protected files; returns the actions carried out.

    Every path is checked first, and one that fails the check stops the run before anything
    is deleted. A path already gone is skipped.
    """
    for action in actions:
        if action.action != "delete":
            raise RetentionError(f"refusing to delete {action.path}: planned to {action.action}")
        _check(action.path, root, policy)
    done = []
    for action in actions:
        if not os.path.lexists(action.path):
            continue
        _remove(action.path, policy.protected_patterns)
        done.append(action)
    return done


# -- finding units -----------------------------------------------------------------------------


def _real_dirs(folder: Path) -> Iterator[Path]:
    """Sub-folders of `folder`, sorted, that are folders themselves and not links to one."""
    with os.scandir(folder) as entries:
        found = sorted(e.path for e in entries if e.is_dir(follow_symlinks=False))
    yield from (Path(p) for p in found)


def _units(base: Path) -> Iterator[Path]:
    if base.is_symlink() or not base.is_dir():
        return
    for project in _real_dirs(base):
        yield from _real_dirs(project)


def _age_days(unit: Path, rule: DirectoryPolicy, now: dt.datetime) -> int | None:
    """Whole days since the unit was last written; None when its age cannot be read."""
    if rule.expire_by == "day-folder":
        if not _DAY_FOLDER.match(unit.name):
            return None  # not a spool day: retention does not know it, so leaves it alone
        try:
            day = dt.date.fromisoformat(unit.name)
        except ValueError:
            return None
        return (now.astimezone(dt.UTC).date() - day).days
    # A trial still being written somewhere deep inside is young, whatever its folder's mtime.
    newest = unit.lstat().st_mtime
    for _path, st in _walk(unit):
        newest = max(newest, st.st_mtime)
    return int((now.timestamp() - newest) // DAY_S)


def _walk(top: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every entry below `top` with its lstat, children before parents; links not followed."""

    def fail(exc: OSError) -> None:
        raise exc

    for dirpath, dirnames, filenames in os.walk(top, topdown=False, onerror=fail):
        for name in (*filenames, *dirnames):
            path = Path(dirpath, name)
            yield path, path.lstat()


def _is_protected(path: Path, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(path.name, p) for p in patterns)


def _measure(unit: Path, protected: tuple[str, ...]) -> tuple[int, bool]:
    """Bytes that removing `unit` frees, and whether it would remove anything at all."""
    size, removable = 0, False
    for path, st in _walk(unit):
        if stat.S_ISDIR(st.st_mode):
            continue
        if not _is_protected(path, protected):
            size += st.st_size
            removable = True
    return size, removable


# -- deleting ----------------------------------------------------------------------------------


def _check(path: Path, root: DataRoot, policy: RetentionPolicy) -> None:
    try:
        rel = path.relative_to(root.root)
    except ValueError:
        raise RetentionError(
            f"refusing to delete {path}: outside the data root {root.root}"
        ) from None
    if not path.is_absolute() or ".." in rel.parts or len(rel.parts) != 3:
        raise RetentionError(
            f"refusing to delete {path}: not a <folder>/<project>/<unit> of the data root"
        )
    if rel.parts[0] not in policy.deleting():
        raise RetentionError(
            f"refusing to delete {path}: the policy deletes nothing under {rel.parts[0]}/"
        )
    # With the root resolved, a path that resolves elsewhere passes through a link.
    if os.path.lexists(path) and Path(os.path.realpath(path)) != path:
        raise RetentionError(f"refusing to delete {path}: it is, or passes through, a symlink")


def _remove(unit: Path, protected: tuple[str, ...]) -> None:
    for path, st in _walk(unit):
        if stat.S_ISDIR(st.st_mode):
            _rmdir_if_empty(path)
        elif not _is_protected(path, protected):
            path.unlink()
    _rmdir_if_empty(unit)


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # it holds a protected file
            raise
