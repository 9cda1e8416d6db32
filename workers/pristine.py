"""The tests that grade an assignment are the task's, not the agent's.

Before grading, every file of the task's test surface is put back as the baseline holds it:
`conftest.py` at any depth, pytest's own configuration files (`pytest.toml`, `pytest.ini` and
their dot-named forms) at any depth, pytest's section of `pyproject.toml`, `setup.cfg` and
`tox.ini` at any depth (`workers.pytest_sections`: the rest of those files, dependencies and
build settings, stays the agent's), everything under a `tests/` or `test/` folder, and the test
files the FAIL_TO_PASS / PASS_TO_PASS ids name. What the agent added there is removed, and so
are modules it added at the workspace root that Python or pytest would load before any test
(`pytest.py`, `sitecustomize.py`, `*.pth`, …), a `pyproject.toml` or `setup.py` it added below
the root (either can become pytest's rootdir, which test ids are relative to), and all
bytecode (`__pycache__`, `*.pyc`), which would be loaded in place of a restored file.
Whatever was different is returned as a `Tampering`: the paths, and a diff of the agent's
versions made here in Python (symlinks shown as their targets, never followed).

The workspace is walked and written through directory descriptors opened with O_NOFOLLOW,
so a symlink the agent left (`tests -> /etc`) is replaced, never written through.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from workers.pytest_sections import SECTIONED, Unmerged
from workers.pytest_sections import merge as merge_section
from workers.pytest_sections import read as read_section
from workers.pytest_sections import shown as shown_section
from workers.workspace import baseline_git

CONFIG_NAMES = frozenset(
    {"conftest.py", "pytest.toml", ".pytest.toml", "pytest.ini", ".pytest.ini", *SECTIONED}
)
"""Restored wherever they lie: pytest reads them while it collects (`SECTIONED` ones only for
pytest's section, outside the test folders)."""
TEST_FOLDERS = frozenset({"tests", "test"})
"""Everything under a folder of this name is the task's tests, its data and helpers."""
ROOTDIR_MARKERS = frozenset({"pyproject.toml", "setup.py"})
"""Files whose presence alone can make their folder pytest's rootdir."""
SHADOWING = frozenset({"pytest", "_pytest", "pluggy", "py", "sitecustomize", "usercustomize"})
"""Module names that, added at the root (on sys.path with `python -m pytest`), run first."""
_LINK = 0o120000
_EXEC = 0o100755
_FILE = 0o100644


@dataclass
class Tampering:
    """What the agent changed in the task's test surface; restored before the tests ran."""

    files: list[str] = field(default_factory=list)
    """Paths (workspace-relative) changed, added, removed or replaced, sorted."""
    diff: str = ""
    """Unified diff from the task's version (a/) to the agent's (b/)."""


@dataclass(frozen=True)
class _Entry:
    mode: int
    """Git's view: 0o100644 / 0o100755 file, 0o120000 symlink; 0 for anything else."""
    blob: str
    """Git's blob id of a file's content or a symlink's target."""
    data: bytes | None
    """The content or target for the diff; None when larger than `SHOWN_BYTES`."""

    @classmethod
    def of(cls, mode: int, data: bytes) -> _Entry:
        return cls(mode, _blob_id(len(data), [data]), data)


SHOWN_BYTES = 1 << 20
"""Larger versions are compared by hash and named in the diff, not shown."""


def _blob_id(size: int, chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha1(b"blob %d\0" % size)
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def test_files(test_ids: Iterable[str]) -> set[str]:
    """The files named by pytest ids (`tests/test_x.py::test_y` -> `tests/test_x.py`)."""
    return {test_id.split("::", 1)[0] for test_id in test_ids if test_id.split("::", 1)[0]}


def guarded(path: str, named: set[str]) -> bool:
    """Whether `path` belongs to the task's test surface, restored as the task had it."""
    parts = path.split("/")
    return parts[-1] in CONFIG_NAMES or any(part in TEST_FOLDERS for part in parts) or path in named


def loaded_first(path: str) -> bool:
    """A root module Python or pytest would load before any test (removed when added)."""
    top = path.split("/")[0]
    name, _, suffix = top.partition(".")
    return top.endswith(".pth") or (name in SHADOWING and suffix in ("", "py", "pyc"))


def restore(workspace: Path, baseline: Path, test_ids: Iterable[str]) -> Tampering:
    """Put the task's test surface in `workspace` back as committed in `baseline`."""
    named = test_files(test_ids)
    tree = _baseline_tree(baseline, workspace)
    pristine = {path: entry for path, entry in tree.items() if guarded(path, named)}
    root = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        # Bytecode caches are removed below, never flagged: running the tests makes them.
        current = dict(
            _walk(
                root,
                "",
                lambda p: (
                    "__pycache__" not in p.split("/")
                    and (
                        guarded(p, named)
                        or ((loaded_first(p) or moves_rootdir(p)) and p not in tree)
                    )
                ),
            )
        )
        tampered: dict[str, tuple[_Entry | None, _Entry | None]] = {}
        sections: dict[str, str] = {}
        for path in sorted(set(pristine) | set(current)):
            have = current.get(path)
            want = pristine.get(path)
            if have is not None and want is not None and _same(have, *want):
                continue
            original = None
            if want is not None:
                original = _Entry.of(want[0], _blob(baseline, workspace, want[1]))
            if sectioned(path, named):
                shown = _restore_section(root, path, have, original)
                if shown is not None:
                    sections.update({path: shown} if shown else {})
                    continue
            tampered[path] = (original, have)
            if original is None:
                _remove(root, path.split("/"))
            else:
                replaced = _put(root, path.split("/"), original)
                tampered.update({p: (None, None) for p in replaced if p not in tampered})
        _remove_bytecode(root)
    finally:
        os.close(root)
    files = sorted({*tampered, *sections})
    diff = "".join(sections.get(path) or _diff(path, *tampered[path]) for path in files)
    return Tampering(files, diff)


def moves_rootdir(path: str) -> bool:
    """Whether `path`, added below the workspace root, could become pytest's rootdir (and so
    change what the test ids name) by being there: a `pyproject.toml` without a pytest table,
    a `setup.py` when no configuration is found. Removed when the agent added one."""
    return "/" in path and path.rsplit("/", 1)[-1] in ROOTDIR_MARKERS


def sectioned(path: str, named: set[str]) -> bool:
    """Whether only pytest's section of `path` is the task's (outside the test folders)."""
    parts = path.split("/")
    inside = any(part in TEST_FOLDERS for part in parts[:-1])
    return parts[-1] in SECTIONED and not inside and path not in named


def _restore_section(
    root: int, path: str, have: _Entry | None, original: _Entry | None
) -> str | None:
    """Put pytest's section of `path` back as the task had it, keeping the rest of the agent's
    file: the diff of that section ("" when it was the task's already), or None when the
    whole file must be restored (a link, a large file, one that does not parse)."""
    regular = (_FILE, _EXEC)
    if have is not None and (have.mode not in regular or have.data is None):
        return None
    if original is not None and (original.mode not in regular or original.data is None):
        return None
    if original is None and moves_rootdir(path):
        return None  # added below the root: removed whole, as it could move the rootdir
    name = path.rsplit("/", 1)[-1]
    agents = have.data if have is not None else None
    tasks = original.data if original is not None else None
    try:
        before = read_section(name, tasks) if tasks is not None else None
        after = read_section(name, agents) if agents is not None else None
        if before == after:
            return ""  # pytest reads what it read, or the agent removed a file it never read
        if agents is None:
            return None  # the task's pytest configuration was in it: put it back whole
        merged = merge_section(name, agents, tasks)
        body = difflib.unified_diff(
            shown_section(name, tasks), shown_section(name, agents), f"a/{path}", f"b/{path}"
        )
    except Unmerged:
        return None
    parts = path.split("/")
    replaced: list[str] = []
    if merged is None:
        _remove(root, parts)
    else:
        replaced = _put(root, parts, _Entry.of(have.mode if have is not None else _FILE, merged))
    lines = "".join(line if line.endswith("\n") else line + "\n" for line in body)
    lines += "".join(_diff(parent, None, None) for parent in replaced)
    return f"diff a/{path} b/{path} (pytest's section; the rest is the agent's)\n{lines}"


def _remove_bytecode(dir_fd: int) -> None:
    """Remove every `__pycache__` and `.pyc` (none is the task's, none is in a patch): bytecode
    the agent left would be loaded in place of a restored test or conftest."""
    for name in os.listdir(dir_fd):
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if name == "__pycache__" or (name.endswith(".pyc") and not stat.S_ISDIR(info.st_mode)):
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(name, dir_fd=dir_fd)
            else:
                os.unlink(name, dir_fd=dir_fd)
        elif stat.S_ISDIR(info.st_mode) and name != ".git":
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                _remove_bytecode(sub)
            finally:
                os.close(sub)


def _same(have: _Entry, mode: int, blob: str) -> bool:
    """The same content and kind (file or symlink); an exec bit alone is no tampering."""
    return have.mode != 0 and have.blob == blob and (have.mode == _LINK) == (mode == _LINK)


def _baseline_tree(baseline: Path, workspace: Path) -> dict[str, tuple[int, str]]:
    listing = baseline_git(baseline, workspace, "ls-tree", "-r", "-z", "--full-tree", "HEAD")
    tree = {}
    for record in listing.split(b"\0"):
        if not record:
            continue
        info, raw_path = record.split(b"\t", 1)
        mode, kind, sha = info.split()
        if kind == b"blob":
            tree[os.fsdecode(raw_path)] = (int(mode, 8), sha.decode())
    return tree


def _blob(baseline: Path, workspace: Path, sha: str) -> bytes:
    return baseline_git(baseline, workspace, "cat-file", "blob", sha)


def _walk(dir_fd: int, prefix: str, wanted: Callable[[str], bool]) -> Iterator[tuple[str, _Entry]]:
    """(path, entry) of the wanted non-folders under `dir_fd` but the root `.git`; links are
    read, never followed; a wanted folder name yields its entries, not itself."""
    for name in sorted(os.listdir(dir_fd)):
        path = f"{prefix}{name}"
        if path == ".git":
            continue  # the agent's own repository: data, never loaded by pytest
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                yield from _walk(sub, f"{path}/", wanted)
            finally:
                os.close(sub)
        elif not wanted(path):
            continue
        elif stat.S_ISLNK(info.st_mode):
            yield path, _Entry.of(_LINK, os.fsencode(os.readlink(name, dir_fd=dir_fd)))
        elif stat.S_ISREG(info.st_mode):
            yield path, _read(dir_fd, name, _EXEC if info.st_mode & 0o100 else _FILE)
        else:
            yield path, _Entry(0, "", b"")  # a FIFO, socket or device: never the task's


def _read(dir_fd: int, name: str, mode: int) -> _Entry:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fd).st_size
        if size <= SHOWN_BYTES:
            return _Entry.of(mode, fh.read())
        return _Entry(mode, _blob_id(size, iter(lambda: fh.read(1 << 16), b"")), None)


def _remove(root: int, parts: list[str]) -> None:
    """Remove `parts` under `root` whatever it is (a folder whole); a missing one is fine."""
    parent = _open_parent(root, parts, create=False)
    if parent is None:
        return
    try:
        info = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        os.close(parent)
        return
    try:
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(parts[-1], dir_fd=parent)
        else:
            os.unlink(parts[-1], dir_fd=parent)
    finally:
        os.close(parent)


def _put(root: int, parts: list[str], entry: _Entry) -> list[str]:
    """Write the task's version at `parts`; the paths of parents that were not folders."""
    replaced: list[str] = []
    parent = _open_parent(root, parts, create=True, replaced=replaced)
    assert parent is not None
    try:
        with contextlib.suppress(FileNotFoundError):
            info = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(parts[-1], dir_fd=parent)
            else:
                os.unlink(parts[-1], dir_fd=parent)
        data = entry.data or b""
        if entry.mode == _LINK:
            os.symlink(os.fsdecode(data), parts[-1], dir_fd=parent)
            return replaced
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        fd = os.open(parts[-1], flags, 0o755 if entry.mode == _EXEC else 0o644, dir_fd=parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    finally:
        os.close(parent)
    return replaced


def _open_parent(
    root: int, parts: list[str], *, create: bool, replaced: list[str] | None = None
) -> int | None:
    """A descriptor of the folder holding `parts[-1]`, opened component by component without
    following links; with `create`, what is not a folder on the way is replaced by one."""
    fd = os.dup(root)
    for depth, name in enumerate(parts[:-1]):
        try:
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            info = None
        if info is not None and not stat.S_ISDIR(info.st_mode):
            if not create:
                os.close(fd)
                return None
            os.unlink(name, dir_fd=fd)
            if replaced is not None:
                replaced.append("/".join(parts[: depth + 1]))
            info = None
        if info is None:
            if not create:
                os.close(fd)
                return None
            os.mkdir(name, 0o755, dir_fd=fd)
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = sub
    return fd


def _diff(path: str, original: _Entry | None, agents: _Entry | None) -> str:
    if original is None and agents is None:
        return f"{path}: was not a folder; replaced by the task's folder\n"
    before, after = _lines(original), _lines(agents)
    if before is None or after is None:
        return f"Binary or large files a/{path} and b/{path} differ\n"
    body = difflib.unified_diff(
        before,
        after,
        f"a/{path}" if original is not None else "/dev/null",
        f"b/{path}" if agents is not None else "/dev/null",
    )
    lines = "".join(line if line.endswith("\n") else line + "\n" for line in body)
    return f"diff a/{path} b/{path}\n{lines}"


def _lines(entry: _Entry | None) -> list[str] | None:
    """Lines of a version for the diff; None when binary or large. A symlink is its target."""
    if entry is None:
        return []
    if entry.mode == 0:
        return ["(not a file: a FIFO, socket or device)\n"]
    if entry.data is None or b"\0" in entry.data:
        return None
    if entry.mode == _LINK:
        return [f"symlink -> {os.fsdecode(entry.data)}\n"]
    return entry.data.decode(errors="replace").splitlines(keepends=True)
