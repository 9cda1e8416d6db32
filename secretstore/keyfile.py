"""The embedded stores' key files (the file store's Fernet key, the field cipher's AES keys):
the lock their writers take, and the refusal of a key file that others can read."""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from contracts.dataroot import DataRoot


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (0600, in a 0700 folder made if absent) for the
    block, so two processes never make or rewrite a key at once."""
    DataRoot.ensure(lock_path.parent, mode=0o700)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def check_private(key_path: Path, error: type[Exception]) -> None:
    """Raise `error` when group or others have any permission on `key_path`, naming the fix."""
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        raise error(
            f"{key_path} is readable by others (mode {mode:04o}): run `chmod 600 {key_path}`"
        )
