"""The embedded traffic store: SQLite (WAL, FTS5) fed from the spool.

The spool is the source of truth; this index can be deleted and rebuilt from it at any time.
`catch_up` reads each spool file from the byte offset it stored, and stores the new offset in
the same transaction as the rows, so concurrent indexers or a crash never lose or repeat a
flow. Money is kept as decimal TEXT and summed with Python's Decimal, never SQL floats.

Bodies are indexed cut to `body_max` bytes (`index_copy`), and searched with FTS5 together with
the url, model, error and websocket messages. An index of an older layout (`LAYOUT`) is dropped
and rebuilt from the spool when opened.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from contracts.dataroot import DataRoot
from contracts.records import Body, FlowRecord, WebSocket
from traffic.spool import spool_files
from traffic.stores import (
    CallFailures,
    Closing,
    ModelUsage,
    ProviderCalls,
    SpooledFlow,
    count_provider_calls,
    failure_text,
)

READ_CHUNK = 4 * 1024 * 1024
"""Bytes of a spool file read per transaction, so one catch-up never holds the lock for long."""
DEFAULT_BODY_MAX = 64 * 1024
"""Bytes of each body (and of each websocket's messages) kept in the index."""
LAYOUT = 2
"""`PRAGMA user_version` of the tables below; an index with another is rebuilt from the spool."""
_OLD_TABLES = (
    "DROP TRIGGER IF EXISTS flows_fts_insert",
    "DROP TRIGGER IF EXISTS flows_fts_delete",
    "DROP TABLE IF EXISTS flows_fts",
    "DROP TABLE IF EXISTS flows",
    "DROP TABLE IF EXISTS offsets",
    "DROP TABLE IF EXISTS rejects",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS flows (
    id TEXT PRIMARY KEY,
    schema_version INTEGER NOT NULL,
    ts_start REAL NOT NULL,
    ts_end REAL NOT NULL,
    duration_ms REAL NOT NULL,
    ttfb_ms REAL,
    method TEXT NOT NULL,
    url TEXT NOT NULL,
    host TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER,
    request_bytes INTEGER NOT NULL,
    response_bytes INTEGER NOT NULL,
    project TEXT,
    trial TEXT,
    assignment TEXT,
    machine TEXT,
    provider TEXT,
    model TEXT,
    response_id TEXT,
    streamed INTEGER NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    total_tokens INTEGER,
    estimated INTEGER,
    cost_usd TEXT NOT NULL,
    error TEXT,
    request_headers TEXT NOT NULL,
    response_headers TEXT NOT NULL,
    request_body TEXT,
    response_body TEXT,
    messages TEXT,
    spool_file TEXT NOT NULL,
    spool_offset INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS flows_by_ts ON flows (ts_start);
CREATE INDEX IF NOT EXISTS flows_by_trial ON flows (trial, assignment);
CREATE INDEX IF NOT EXISTS flows_by_assignment ON flows (assignment);
CREATE INDEX IF NOT EXISTS flows_by_spool ON flows (project, spool_file, spool_offset);
CREATE VIRTUAL TABLE IF NOT EXISTS flows_fts USING fts5(
    url, model, error, request_body, response_body, messages,
    content='flows', content_rowid='rowid'
);
CREATE TRIGGER IF NOT EXISTS flows_fts_insert AFTER INSERT ON flows BEGIN
    INSERT INTO flows_fts (rowid, url, model, error, request_body, response_body, messages)
    VALUES (new.rowid, new.url, new.model, new.error, new.request_body, new.response_body,
            new.messages);
END;
CREATE TRIGGER IF NOT EXISTS flows_fts_delete AFTER DELETE ON flows BEGIN
    INSERT INTO flows_fts (
        flows_fts, rowid, url, model, error, request_body, response_body, messages
    )
    VALUES ('delete', old.rowid, old.url, old.model, old.error, old.request_body,
            old.response_body, old.messages);
END;
CREATE TABLE IF NOT EXISTS offsets (
    path TEXT PRIMARY KEY,
    offset INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rejects (
    path TEXT NOT NULL,
    offset INTEGER NOT NULL,
    line TEXT NOT NULL,
    error TEXT NOT NULL,
    PRIMARY KEY (path, offset)
);
"""

_COLUMNS = (
    "id, schema_version, ts_start, ts_end, duration_ms, ttfb_ms, method, url, host, path, "
    "status, request_bytes, response_bytes, project, trial, assignment, machine, provider, "
    "model, response_id, streamed, prompt_tokens, completion_tokens, total_tokens, estimated, "
    "cost_usd, error, request_headers, response_headers, request_body, response_body, messages, "
    "spool_file, spool_offset, record"
)
_INSERT = (
    f"INSERT OR IGNORE INTO flows ({_COLUMNS}) "
    f"VALUES ({', '.join('?' for _ in _COLUMNS.split(','))})"
)


def _spooled_flow(
    spool: str, flow_id: str, offset: int, ts: float, trial: str | None, assignment: str | None,
    machine: str | None, provider: str | None, model: str | None, tokens: int | None, cost: str,
) -> SpooledFlow:  # fmt: skip
    return SpooledFlow(
        spool, flow_id, offset, ts, trial, assignment, machine, provider, model, tokens or 0,
        Decimal(cost),
    )  # fmt: skip


class _DecimalSum:
    """SQL aggregate `decimal_sum(text)`: exact sum of decimal strings, as a decimal string."""

    def __init__(self) -> None:
        self.total = Decimal(0)

    def step(self, value: str | None) -> None:
        if value is not None:
            self.total += Decimal(value)

    def finalize(self) -> str:
        return format(self.total, "f")


class SqliteTrafficStore(Closing):
    """The SQLite traffic store at `path`; safe to share between threads and processes."""

    @classmethod
    def in_root(cls, root: DataRoot, *, body_max: int = DEFAULT_BODY_MAX) -> SqliteTrafficStore:
        """The traffic stores' one constructor (`traffic.stores`): `traffic-index.sqlite` of
        `root`."""
        return cls(root.traffic_index, body_max=body_max)

    def __init__(self, path: Path, *, body_max: int = DEFAULT_BODY_MAX) -> None:
        self.path = path
        self.body_max = body_max
        """Bytes of each body indexed; takes effect for flows indexed from now on."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Autocommit mode: every transaction below is opened explicitly.
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        # typeshed types aggregates as int → int; SQLite passes and takes any value.
        self._db.create_aggregate("decimal_sum", 1, _DecimalSum)  # type: ignore[arg-type]
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._lock, self._transaction():
            (layout,) = self._db.execute("PRAGMA user_version").fetchone()
            if layout != LAYOUT:
                # Another layout (or a new file): the spool is the truth, read it all again.
                for statement in _OLD_TABLES:
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {LAYOUT}")
            for statement in _statements(_SCHEMA):
                self._db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- feeding ----------------------------------------------------------------------------

    def catch_up(self, traffic_logs_dir: Path) -> int:
        """Index every complete spool line not indexed yet; returns the number of new flows."""
        added = 0
        for spool_file, key in spool_files(traffic_logs_dir):
            while True:
                count, more = self._catch_up_file(spool_file, key)
                added += count
                if not more:
                    break
        return added

    def _catch_up_file(self, spool_file: Path, key: str) -> tuple[int, bool]:
        """Index one batch of lines; returns (flows added, whether more lines may follow)."""
        try:
            size = spool_file.stat().st_size
        except FileNotFoundError:
            return 0, False
        with self._lock:
            if size == self._offset(key):
                return 0, False
        with self._lock, self._transaction():
            # Read the offset again under the write lock: another indexer may have moved it.
            offset = self._offset(key)
            if size < offset:
                # The file was replaced; ids are unique, so reading it again repeats nothing.
                offset = 0
            data = _complete_lines(spool_file, offset)
            added = 0
            position = offset
            for line in data.splitlines(keepends=True):
                added += self._index_line(key, position, line)
                position += len(line)
            self._db.execute(
                "INSERT INTO offsets (path, offset) VALUES (?, ?) "
                "ON CONFLICT (path) DO UPDATE SET offset = excluded.offset",
                (key, position),
            )
        return added, bool(data) and position < size

    def _offset(self, key: str) -> int:
        row = self._db.execute("SELECT offset FROM offsets WHERE path = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _index_line(self, key: str, offset: int, line: bytes) -> int:
        if not line.strip():
            return 0
        try:
            record = FlowRecord.model_validate_json(line)
        except ValidationError as exc:
            # Keep what cannot be read where a person can see it, and move on.
            self._db.execute(
                "INSERT OR IGNORE INTO rejects (path, offset, line, error) VALUES (?, ?, ?, ?)",
                (key, offset, line.decode("utf-8", errors="replace"), str(exc)),
            )
            return 0
        record = index_copy(record, self.body_max)
        usage = record.usage
        cursor = self._db.execute(
            _INSERT,
            (
                record.id,
                record.schema_version,
                record.ts_start,
                record.ts_end,
                record.duration_ms,
                record.ttfb_ms,
                record.method,
                record.url,
                record.host,
                record.path,
                record.status,
                record.request_bytes,
                record.response_bytes,
                record.project,
                record.trial,
                record.assignment,
                record.machine,
                record.provider,
                record.model,
                record.response_id,
                int(record.streamed),
                usage.prompt_tokens if usage else None,
                usage.completion_tokens if usage else None,
                usage.total_tokens if usage else None,
                int(usage.estimated) if usage else None,
                format(record.cost_usd, "f"),
                record.error,
                json.dumps(record.request_headers),
                json.dumps(record.response_headers),
                _searchable(record.request_body),
                _searchable(record.response_body),
                _messages_text(record.websocket),
                key,
                offset,
                record.model_dump_json(),
            ),
        )
        return cursor.rowcount

    # -- queries ----------------------------------------------------------------------------

    def spooled(self, project: str) -> list[SpooledFlow]:
        """The project's flows in spool order (by spool file, then offset): what the ledger
        posts."""
        rows = self._query(
            "SELECT spool_file, id, spool_offset, ts_start, trial, assignment, machine, provider, "
            "model, total_tokens, cost_usd FROM flows WHERE project = ? "
            "ORDER BY spool_file, spool_offset",
            (project,),
        )
        return [_spooled_flow(*row) for row in rows]

    def usage(
        self,
        *,
        project: str | None = None,
        trial: str | None = None,
        assignment: str | None = None,
    ) -> list[ModelUsage]:
        """Metered LLM calls grouped by provider and model, optionally for one scope."""
        where, params = _scope(project=project, trial=trial, assignment=assignment)
        rows = self._query(
            "SELECT provider, model, count(*), sum(prompt_tokens), sum(completion_tokens), "
            "sum(total_tokens), decimal_sum(cost_usd), sum(estimated) FROM flows "
            f"WHERE prompt_tokens IS NOT NULL{where} "
            "GROUP BY provider, model ORDER BY provider, model",
            params,
        )
        return [
            ModelUsage(
                provider=provider,
                model=model,
                calls=calls,
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=total,
                cost_usd=Decimal(cost),
                estimated_calls=estimated,
            )
            for provider, model, calls, prompt, completion, total, cost, estimated in rows
        ]

    def call_failures(self, assignment: str) -> CallFailures:
        """How many of one assignment's calls failed on the upstream's or the proxy's side."""
        failed = "(status >= 500 OR (status IS NULL AND error IS NOT NULL))"
        rows = self._query(
            f"SELECT count(*), coalesce(sum({failed}), 0) FROM flows WHERE assignment = ?",
            (assignment,),
        )
        last = self._query(
            f"SELECT {failed}, status, error FROM flows WHERE assignment = ? "
            "ORDER BY ts_start DESC, id DESC LIMIT 1",
            (assignment,),
        )
        calls, count = rows[0]
        last_failed = bool(last and last[0][0])
        error = failure_text(last[0][1], last[0][2]) if last_failed else None
        return CallFailures(calls, count, last_failed, error)

    def provider_calls(
        self,
        *,
        project: str | None = None,
        trial: str | None = None,
        assignment: str | None = None,
    ) -> list[ProviderCalls]:
        """Calls per provider and those whose answer fell short, by status and error."""
        where, params = _scope(project=project, trial=trial, assignment=assignment)
        rows = self._query(
            "SELECT provider, status, json_extract(record, '$.upstream_error') FROM flows "
            f"WHERE provider IS NOT NULL{where}",
            params,
        )
        return count_provider_calls(rows)

    def flows(
        self,
        *,
        project: str | None = None,
        trial: str | None = None,
        assignment: str | None = None,
    ) -> list[FlowRecord]:
        """Indexed flows in the order they started, optionally for one scope."""
        where, params = _scope(project=project, trial=trial, assignment=assignment)
        rows = self._query(
            f"SELECT record FROM flows WHERE 1 = 1{where} ORDER BY ts_start, id", params
        )
        return [FlowRecord.model_validate_json(record) for (record,) in rows]

    def search(
        self, query: str, *, limit: int = 100, project: str | None = None
    ) -> list[FlowRecord]:
        """Full-text search (FTS5 syntax) over url, model, error, text bodies and websocket
        messages as indexed (cut to `body_max`); best matches first."""
        where, params = _scope(project=project)
        rows = self._query(
            "SELECT flows.record FROM flows_fts JOIN flows ON flows.rowid = flows_fts.rowid "
            f"WHERE flows_fts MATCH ?{where} ORDER BY rank LIMIT ?",
            (query, *params, limit),
        )
        return [FlowRecord.model_validate_json(record) for (record,) in rows]

    def rejects(self) -> list[tuple[str, int, str]]:
        """Spool lines that could not be read: (spool file, byte offset, error)."""
        return [
            (path, offset, error)
            for path, offset, error in self._query(
                "SELECT path, offset, error FROM rejects ORDER BY path, offset", ()
            )
        ]

    # -- plumbing ---------------------------------------------------------------------------

    def _query(self, sql: str, params: tuple[object, ...]) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """`BEGIN IMMEDIATE` … `COMMIT`, or `ROLLBACK` on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def _complete_lines(spool_file: Path, offset: int) -> bytes:
    """The bytes from `offset` up to and including the last newline (a torn tail waits)."""
    with spool_file.open("rb") as fh:
        fh.seek(offset)
        data = fh.read(READ_CHUNK)
        while b"\n" not in data:
            more = fh.read(READ_CHUNK)
            if not more:
                return b""
            data += more
    return data[: data.rfind(b"\n") + 1]


def _scope(**filters: str | None) -> tuple[str, tuple[object, ...]]:
    used = {column: value for column, value in filters.items() if value is not None}
    return "".join(f" AND {column} = ?" for column in used), tuple(used.values())


def _statements(script: str) -> list[str]:
    """Split the schema into statements; triggers contain `;` inside BEGIN … END."""
    statements, current = [], ""
    for line in script.strip().splitlines():
        current += line + "\n"
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return statements


# -- what the index keeps of a record ---------------------------------------------------------


def index_copy(record: FlowRecord, body_max: int) -> FlowRecord:
    """`record` with each body, and its websocket messages together, cut to `body_max` bytes.

    Sizes and hashes stay those of the whole bodies, so the spool line can be checked against
    the index. A schema-1 record has no bodies and comes back as it is.
    """
    if record.request_body is None and record.response_body is None and record.websocket is None:
        return record
    update: dict[str, object] = {
        "request_body": cut_body(record.request_body, body_max),
        "response_body": cut_body(record.response_body, body_max),
    }
    if record.websocket is not None:
        update["websocket"] = _cut_messages(record.websocket, body_max)
    return record.model_copy(update=update)


def cut_body(body: Body | None, limit: int) -> Body | None:
    """`body` with at most `limit` bytes of content (a whole UTF-8 character at the end)."""
    if body is None:
        return None
    if body.encoding == "base64":
        if len(body.text) <= limit * 4 // 3:
            return body
        data = base64.b64decode(body.text)
        if len(data) <= limit:
            return body
        text = base64.b64encode(data[:limit]).decode("ascii")
    else:
        if len(body.text) * 4 <= limit:  # four bytes a character at most: surely short enough
            return body
        data = body.text.encode()
        if len(data) <= limit:
            return body
        text = data[:limit].decode("utf-8", errors="ignore")
    return body.model_copy(update={"text": text, "truncated": True})


def _cut_messages(websocket: WebSocket, limit: int) -> WebSocket:
    kept, room = [], limit
    for message in websocket.messages:
        if room <= 0 and message.content.size:
            break
        content = cut_body(message.content, room)
        assert content is not None
        room -= len(content.text) if content.encoding == "utf-8" else len(content.text) * 3 // 4
        kept.append(message.model_copy(update={"content": content}))
    if len(kept) == len(websocket.messages):
        return websocket.model_copy(update={"messages": kept})
    omitted = websocket.messages_omitted + len(websocket.messages) - len(kept)
    return websocket.model_copy(update={"messages": kept, "messages_omitted": omitted})


def _searchable(body: Body | None) -> str | None:
    return body.text if body is not None and body.encoding == "utf-8" else None


def _messages_text(websocket: WebSocket | None) -> str | None:
    if websocket is None:
        return None
    return "\n".join(m.content.text for m in websocket.messages if m.content.encoding == "utf-8")
