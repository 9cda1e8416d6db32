"""The traffic spool: one JSON line per flow, the source of truth the index is rebuilt from.

`traffic-logs/<project>/<YYYY-MM-DD>/flows.jsonl`, the day in UTC of the flow's start. Lines are
appended with one `write` on an O_APPEND descriptor, so concurrent writers (threads or
processes) never interleave inside a line and a reader sees only whole lines or a torn tail.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path

from contracts.dataroot import DataRoot
from contracts.records import FlowRecord

UNATTRIBUTED = "_unattributed"
"""Project folder for flows with no verified machine identity (refusals, errors)."""
FILE_NAME = "flows.jsonl"
ID_PREFIX_MAX = 256
"""Bytes at the start of a line that hold its `id` (after `schema_version`)."""


def spool_files(traffic_logs: Path) -> list[tuple[Path, str]]:
    """Every spool file under `traffic_logs` with its key (`<project>/<YYYY-MM-DD>/flows.jsonl`),
    in key order: the order the stores take them in."""
    files = sorted(traffic_logs.glob(f"*/*/{FILE_NAME}"))
    return [(path, path.relative_to(traffic_logs).as_posix()) for path in files]


class Spool:
    """Appends FlowRecords to the data root's spool; safe to share between threads."""

    def __init__(self, root: DataRoot) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._files: dict[Path, int] = {}
        self._paths: dict[tuple[str, dt.date], Path] = {}

    def path_for(self, record: FlowRecord) -> Path:
        project = record.project or UNATTRIBUTED
        if project in {".", ".."} or "/" in project or os.sep in project:
            raise ValueError(f"project {project!r} cannot name a spool folder")
        day = dt.datetime.fromtimestamp(record.ts_start, dt.UTC).date()
        key = (project, day)
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = self.root.spool_dir(project, day) / FILE_NAME
        return path

    def append(self, record: FlowRecord) -> Path:
        """Write the record as one line; returns the spool file it went to."""
        path = self.path_for(record)
        line = (record.model_dump_json() + "\n").encode()
        with self._lock:
            fd = self._files.get(path)
            if fd is None:
                fd = self._open(path)
            written = os.write(fd, line)
            if written != len(line):
                # A short write on a regular file means the disk is full: say so, loudly.
                raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
        return path

    def find(self, record: FlowRecord) -> FlowRecord | None:
        """The line already spooled for `record.id` in the file `record` would go to, or None.

        Reads the whole day's file: for rare checks (the budget's orphan sweep), not per flow.
        """
        path = self.path_for(record)
        needle = f'"id":{json.dumps(record.id)},'.encode()
        try:
            with path.open("rb") as lines:
                for line in lines:
                    # The id is the second key of every line; a body quoting it is escaped.
                    if needle in line[:ID_PREFIX_MAX] and line.endswith(b"\n"):
                        found = FlowRecord.model_validate_json(line)
                        if found.id == record.id:
                            return found
        except FileNotFoundError:
            return None
        return None

    def _open(self, path: Path) -> int:
        # Flows of past days stop arriving; keep only the current files open.
        if len(self._files) >= 64:
            self._close_all()
        DataRoot.ensure(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._files[path] = fd
        return fd

    def close(self) -> None:
        with self._lock:
            self._close_all()

    def _close_all(self) -> None:
        for fd in self._files.values():
            os.fsync(fd)
            os.close(fd)
        self._files.clear()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
