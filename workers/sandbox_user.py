"""Start bubblewrap as an unprivileged host user when the runner is root.

`python -m workers.sandbox_user --uid U --gid G [--writable P]... [--visible P]... -- bwrap …`

Run by root, this program stages the paths bubblewrap will bind, gives the writable ones to
U:G, drops to U:G (no groups, no capabilities, no_new_privs) and execs bubblewrap. The
sandbox's uid 1000 then maps to U on the host, not to root: a process that gets out of the
sandbox (a kernel bug, a leaked descriptor) is a user without a home, who owns nothing but
the workspace and output folders, and RLIMIT_NPROC applies to it.

Staging: bubblewrap opens every bind source itself, as U, so each must be reachable by U.
Our interpreter may live under /root (0700) and the data root is 0700. In a private mount
namespace of its own (nothing of it reaches the host's), this program mounts a small tmpfs
(0755) over the topmost folder U cannot search above each source, and binds the sources
back at their own paths inside it: the same paths resolve for bubblewrap, everything else
under that folder is hidden from it. Nothing is chmod-ed or moved on the host.

Not root (a developer's laptop): not used; bubblewrap already runs as the caller.

It starts every sandbox, so it is run as a script of the standard library alone (`python -I
-S`, `workers.sandbox.SANDBOX_USER`) and imports neither argparse nor pathlib: ~10 ms, not ~40.
"""

from __future__ import annotations

import ctypes
import os
import stat
import sys

CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_NO_NEW_PRIVS = 38
EXIT_STAGE_FAILED = 71
"""Exit status when staging fails; the message on stderr says what failed."""
EXIT_USAGE = 64
USAGE = "workers.sandbox_user --uid U --gid G [--writable P]... [--visible P]... -- ARGV"

_libc = ctypes.CDLL(None, use_errno=True)
"""The C library, as linked into the interpreter (ctypes.util.find_library runs ldconfig)."""


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source or fstype} on {target}",
    )


def parents(path: str) -> list[str]:
    """The folders above absolute `path`, nearest first, "/" last (as pathlib's `parents`)."""
    above = []
    while path != "/":
        path = os.path.dirname(path)
        above.append(path)
    return above


def searchable(info: os.stat_result, uid: int, gid: int) -> bool:
    """Whether uid:gid (no supplementary groups, no capabilities) may search this folder."""
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == gid:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def blocking_folder(path: str, uid: int, gid: int) -> str | None:
    """The topmost folder above `path` (a resolved path) that uid:gid cannot search."""
    for parent in reversed(parents(path)):  # "/" first
        if not searchable(os.stat(parent), uid, gid):
            return parent
    return None


def _resolved(path: str) -> str:
    os.stat(path)  # as Path.resolve(strict=True): a missing source is an error
    return os.path.realpath(path)


def stage(sources: list[str], uid: int, gid: int) -> list[str]:
    """Make every path of `sources` reachable by uid:gid in this (private) mount namespace; the
    folders covered by a tmpfs."""
    groups: dict[str, list[str]] = {}
    for source in sorted({_resolved(path) for path in sources}):
        folder = blocking_folder(source, uid, gid)
        if folder is not None:
            groups.setdefault(folder, []).append(source)
    for folder, inside in groups.items():
        # Opened before the tmpfs covers them; bound back from the descriptors.
        kept: list[tuple[str, int]] = []
        for source in inside:  # sorted: a source inside an earlier one comes with it
            if not any(other in parents(source) for other, _ in kept):
                kept.append((source, os.open(source, os.O_PATH | os.O_NOFOLLOW)))
        _mount("tmpfs", folder, "tmpfs", 0, "mode=0755,size=1m")
        for source, fd in kept:
            for step in reversed(parents(source)):
                if step != folder and folder in parents(step) and not os.path.exists(step):
                    os.mkdir(step, 0o755)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.mkdir(source, 0o755)
            else:
                os.close(os.open(source, os.O_WRONLY | os.O_CREAT, 0o644))
            _mount(f"/proc/self/fd/{fd}", source, None, MS_BIND | MS_REC, "")
            os.close(fd)
    return list(groups)


def give(path: str, uid: int, gid: int) -> None:
    """`path` and everything below it owned by uid:gid; symlinks themselves, never followed."""
    os.chown(path, uid, gid, follow_symlinks=False)
    if os.path.islink(path) or not os.path.isdir(path):
        return
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)


def drop(uid: int, gid: int) -> None:
    """Become uid:gid for good: no supplementary groups, no capabilities, no setuid gains."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def parse(argv: list[str]) -> tuple[int, int, list[str], list[str], list[str]]:
    """(uid, gid, writable, visible, command) from `USAGE`; ValueError naming what is wrong."""
    ids: dict[str, int] = {}
    paths: dict[str, list[str]] = {"--writable": [], "--visible": []}
    rest = list(argv)
    while rest and rest[0] != "--":
        option = rest.pop(0)
        if not rest:
            raise ValueError(f"{option} needs a value")
        value = rest.pop(0)
        if option in ("--uid", "--gid"):
            ids[option] = int(value)
        elif option in paths:
            paths[option].append(os.path.abspath(value))
        else:
            raise ValueError(f"unknown option {option}")
    if "--uid" not in ids or "--gid" not in ids or len(rest) < 2:
        raise ValueError("--uid, --gid and a command after -- are required")
    return ids["--uid"], ids["--gid"], paths["--writable"], paths["--visible"], rest[1:]


def main(argv: list[str]) -> int:
    try:
        uid, gid, writable, visible, command = parse(argv)
    except ValueError as exc:
        print(f"autovibe sandbox: {exc}\nusage: {USAGE}", file=sys.stderr)
        return EXIT_USAGE
    if uid == 0 or gid == 0:
        print("autovibe sandbox: the sandbox's host uid and gid may not be 0", file=sys.stderr)
        return EXIT_STAGE_FAILED
    try:
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _mount(None, "/", None, MS_REC | MS_PRIVATE, "")
        for path in writable:
            give(path, uid, gid)
        stage([*writable, *visible], uid, gid)
        drop(uid, gid)
    except OSError as exc:
        print(f"autovibe sandbox: cannot start as uid {uid}: {exc}", file=sys.stderr)
        return EXIT_STAGE_FAILED
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
