"""The production traffic store: the spool shipped to Elasticsearch with the bulk helper, and
read back through the search API (`traffic.stores.MeteredFlows`).

(Not `proxy/elasticsearch.py`: `mitmdump -s proxy/addon.py` puts `proxy/` first on sys.path,
where such a module would shadow elasticsearch-py itself.)

Like Filebeat, the shipper keeps a registry (a small SQLite file, `es-registry.sqlite` beside the
spool) of how far each spool file has been shipped. An offset moves only past lines that
Elasticsearch acknowledged, so an outage (connection refused, 5xx, 429) loses nothing: the
same lines are sent again later, with backoff. Each document is sent with `op_type: create` and
the FlowRecord id as `_id` into the index of its UTC day (`<prefix>-<group>-YYYY.MM.DD`, chosen
over a data stream because a retry must reach the very index of the first attempt): a 409 on a
retry means "already there", so a crash between the acknowledgement and the registry commit
never duplicates a flow.

A record is split by field group, one document per group in indices of their own, because ILM
retention is per index: `usage` (everything but headers and bodies, kept longest), `headers`
and `bodies` (cut to `body_max` bytes, kept shortest); each of the latter two is sent only when
the record has something for it. A line is shipped once every document of it is acknowledged.
The usage document also says where the spool holds the line (`spool_file`, `spool_offset`).

Reads page through `_search` with `search_after` on a sort that is a total order of immutable
fields (so no page is cut by `index.max_result_window` and none repeats or skips a hit), and
sum tokens and cost here with Decimal from each hit's `_source`: `cost_usd` is mapped as a
`scaled_float`, whose aggregations are doubles, and the ledger needs it to the cent. A read
refreshes the indices first when a catch-up ran since the last one, so it sees what the
catch-up shipped (Elasticsearch shows new documents only after a refresh).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from elasticsearch import Elasticsearch, helpers
from elasticsearch.exceptions import ApiError, TransportError
from pydantic import ValidationError

from contracts.dataroot import DataRoot
from contracts.records import FlowRecord
from contracts.settings import Settings
from traffic.spool import spool_files
from traffic.sqlite_store import DEFAULT_BODY_MAX, _complete_lines, index_copy
from traffic.stores import (
    CallFailures,
    Closing,
    ModelUsage,
    ProviderCalls,
    SpooledFlow,
    TrafficUnavailable,
    count_provider_calls,
    failure_text,
)

log = logging.getLogger(__name__)

REGISTRY_FILE = "es-registry.sqlite"
"""The registry's file name in `traffic-logs/`."""
DEFAULT_PREFIX = "autovibe-traffic"
"""Index prefix: `<prefix>-<group>` names each group's template, and its ILM policy by default."""
GROUPS = ("usage", "headers", "bodies")
"""Field groups, each in daily indices of its own with its own retention (ILM policy)."""
HEADER_FIELDS = frozenset({"request_headers", "response_headers"})
BODY_FIELDS = frozenset({"request_body", "response_body"})
LINK_FIELDS = ("id", "project", "trial", "assignment", "machine")
"""Copied into the headers and bodies documents, to find them without the usage document."""
TEMPLATES_DIR = Settings.model_fields["configs"].default / "elasticsearch"
TEMPLATES = {
    group: TEMPLATES_DIR / f"autovibe-traffic-{group}.index-template.json" for group in GROUPS
}
"""Index template per field group (mappings of its fields), installed before the first bulk."""
CONFLICT = 409
"""A `create` whose `_id` exists: an earlier attempt got there, which counts as shipped."""
SHIPPED_ONLY = frozenset({"@timestamp", "spool_file", "spool_offset"})
"""Fields of a usage document that are not the record's."""
PAGE_SIZE = 1000
"""Hits per search request; `search_after` pages on, so a read is never capped at 10,000."""
REFUSED = 400
"""The one item status that rejects a document for good (mapping or parse error): any other
failure (429, 5xx, a read-only index, a missing index) is sent again later, so a misconfigured
cluster stalls the shipper loudly instead of dropping flows."""

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS offsets (path TEXT PRIMARY KEY, offset INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS rejects (path TEXT NOT NULL, offset INTEGER NOT NULL, "
    "line TEXT NOT NULL, error TEXT NOT NULL, PRIMARY KEY (path, offset))",
)


class ElasticsearchTrafficStore(Closing):
    """Ships complete spool lines to Elasticsearch exactly once; offsets live in `registry_path`."""

    def __init__(
        self,
        url: str,
        registry_path: Path,
        *,
        index_prefix: str = DEFAULT_PREFIX,
        templates: dict[str, Path] | None = None,
        body_max: int = DEFAULT_BODY_MAX,
        chunk_size: int = 500,
        page_size: int = PAGE_SIZE,
        request_timeout: float = 10.0,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        **client_options: Any,
    ) -> None:
        self.index_prefix = index_prefix
        self.templates = templates or TEMPLATES
        self.body_max = body_max
        """Bytes of each body shipped (traffic.sqlite_store.index_copy)."""
        self.chunk_size = chunk_size
        self.page_size = page_size
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        # Retries are this class's job, with backoff across catch-ups; the transport's own are
        # immediate and would only hammer a node that is already struggling.
        client_options.setdefault("max_retries", 0)
        client_options.setdefault("retry_on_status", ())
        self.client = Elasticsearch(url, request_timeout=request_timeout, **client_options)
        self._template_installed = False
        self._refresh_due = True
        self._failures = 0
        self._retry_at = 0.0
        self._lock = threading.Lock()
        registry_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            registry_path, timeout=30, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        for statement in _SCHEMA:
            self._db.execute(statement)

    @classmethod
    def in_root(cls, root: DataRoot, url: str, **options: Any) -> ElasticsearchTrafficStore:
        """The store at `url` whose registry is `traffic-logs/es-registry.sqlite` of `root`."""
        return cls(url, root.traffic_logs / REGISTRY_FILE, **options)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self.client.close()

    # -- shipping ---------------------------------------------------------------------------

    def catch_up(self, traffic_logs_dir: Path) -> int:
        """Ship every complete spool line not shipped yet; returns the flows now behind the offset.

        A flow counts once, when the registry moves past it: created now, or found already there
        (409) after a lost acknowledgement. While Elasticsearch is unreachable or overloaded this
        returns what it shipped so far and leaves the rest to a later call, which is skipped
        (returns 0) until the backoff ends.
        """
        with self._lock:
            # Another process may have shipped too: the next read refreshes, whatever this does.
            self._refresh_due = True
            if self._clock() < self._retry_at:
                return 0
            shipped = 0
            try:
                self._install_template()
                for spool_file, key in spool_files(traffic_logs_dir):
                    more = True
                    while more:
                        acknowledged, more, failure = self._ship_batch(spool_file, key)
                        shipped += acknowledged
                        if failure is not None:
                            raise _Unavailable(failure)
            except _Unavailable as exc:
                self._back_off(exc)
                return shipped
            self._failures = 0
            return shipped

    def _install_template(self) -> None:
        if self._template_installed:
            return
        for group in GROUPS:
            name = f"{self.index_prefix}-{group}"
            body = json.loads(self.templates[group].read_text())
            body["index_patterns"] = [f"{name}-*"]
            try:
                self.client.indices.put_index_template(name=name, **body)
            except (ApiError, TransportError) as exc:
                raise _Unavailable(f"installing index template {name}: {exc}") from exc
        self._template_installed = True

    def _ship_batch(self, spool_file: Path, key: str) -> tuple[int, bool, str | None]:
        """Ship one read of a spool file: (flows acknowledged, whether more may follow, failure).

        The offset is committed up to the last line before the first failure, so a retry sends
        again only what Elasticsearch did not acknowledge (and what followed it).
        """
        try:
            size = spool_file.stat().st_size
        except FileNotFoundError:
            return 0, False, None
        offset = self._offset(key)
        if size == offset:
            return 0, False, None
        if size < offset:
            # The file was replaced; `create` with the same ids repeats nothing.
            offset = 0
        data = _complete_lines(spool_file, offset)
        if not data:
            return 0, False, None
        lines = _Lines(key, offset, data, lambda record, at: self._actions(record, key, at))
        results = helpers.streaming_bulk(
            self.client,
            lines.actions(),
            chunk_size=self.chunk_size,
            raise_on_error=False,
            raise_on_exception=False,
        )
        failure = None
        try:
            for ok, item in results:
                (result,) = item.values()
                status = int(result.get("status", 500))
                if "exception" in result:
                    # The bulk request itself failed (5xx, 429, 401, not Elasticsearch, ...).
                    failure = f"{key}: {result['exception']}"
                    break
                if status == REFUSED:
                    lines.reject(result.get("_id"), f"{status}: {result.get('error')}")
                elif not ok and status != CONFLICT:
                    failure = f"{key}: flow {result.get('_id')} answered {status}"
                    break
                lines.acknowledge(result.get("_id"))
        except TransportError as exc:
            failure = f"{key}: {exc}"
        self._commit(key, lines)
        more = failure is None and lines.done == offset + len(data) and lines.done < size
        return lines.acknowledged, more, failure

    def _actions(self, record: FlowRecord, key: str, offset: int) -> list[dict[str, Any]]:
        """The bulk `create` actions of the record at `offset` of spool file `key`: one per field
        group it has data for."""
        return [
            {
                "_op_type": "create",
                "_index": f"{self.index_prefix}-{group}-{day}",
                "_id": record.id,
                "_source": source,
            }
            for group, source, day in documents(record, self.body_max, key, offset)
        ]

    def _commit(self, key: str, lines: _Lines) -> None:
        """Store the new offset and the rejects behind it in one transaction."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for offset, line, error in lines.rejects_before_done():
                self._db.execute(
                    "INSERT OR IGNORE INTO rejects (path, offset, line, error) VALUES (?, ?, ?, ?)",
                    (key, offset, line, error),
                )
            self._db.execute(
                "INSERT INTO offsets (path, offset) VALUES (?, ?) "
                "ON CONFLICT (path) DO UPDATE SET offset = excluded.offset",
                (key, lines.done),
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _offset(self, key: str) -> int:
        row = self._db.execute("SELECT offset FROM offsets WHERE path = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _back_off(self, exc: _Unavailable) -> None:
        self._failures += 1
        delay = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (self._failures - 1))
        self._retry_at = self._clock() + delay
        log.warning("elasticsearch unavailable, retrying in %.3g s: %s", delay, exc)

    # -- inspection -------------------------------------------------------------------------

    def offsets(self) -> dict[str, int]:
        """Spool file (relative to traffic-logs) → bytes shipped."""
        with self._lock:
            rows = self._db.execute("SELECT path, offset FROM offsets ORDER BY path").fetchall()
        return {path: int(offset) for path, offset in rows}

    def rejects(self) -> list[tuple[str, int, str]]:
        """Spool lines Elasticsearch or the schema refused: (spool file, byte offset, error)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT path, offset, error FROM rejects ORDER BY path, offset"
            ).fetchall()
        return [(path, int(offset), error) for path, offset, error in rows]

    # -- reading (traffic.stores.MeteredFlows) -----------------------------------------------

    def spooled(self, project: str) -> list[SpooledFlow]:
        """The project's flows in spool order (by spool file, then offset): what the ledger posts.

        Only flows behind the registry's offset of their spool file: Elasticsearch may already
        hold a later line whose earlier neighbour waits for a retry (a 429 on one item of a
        bulk), and the ledger's watermark must never pass a flow it has not seen.
        """
        shipped = self.offsets()
        self._refresh(always=True)  # everything behind those offsets is acknowledged: show it
        fields = [*_SPOOLED_FIELDS, "usage.total_tokens"]
        sort = ["spool_file", "spool_offset", "id"]
        flows = []
        for source in self._hits("usage", _scope(project=project), sort, fields):
            key, offset = source.get("spool_file"), source.get("spool_offset")
            if key is None or offset is None:
                raise TrafficUnavailable(
                    f"flow {source.get('id')} in {self.index_prefix}-usage-* has no spool_file: "
                    "shipped before documents said where the spool holds them; delete the "
                    f"{self.index_prefix}-* indices and {REGISTRY_FILE} to ship the spool again"
                )
            if offset >= shipped.get(key, 0):
                continue
            flows.append(
                SpooledFlow(
                    key,
                    source["id"],
                    offset,
                    source["ts_start"],
                    source.get("trial"),
                    source.get("assignment"),
                    source.get("machine"),
                    source.get("provider"),
                    source.get("model"),
                    (source.get("usage") or {}).get("total_tokens") or 0,
                    Decimal(source.get("cost_usd", "0")),
                )
            )
        return flows

    def usage(
        self,
        *,
        project: str | None = None,
        trial: str | None = None,
        assignment: str | None = None,
    ) -> list[ModelUsage]:
        """Metered LLM calls grouped by provider and model, optionally for one scope."""
        self._refresh()
        metered = [{"exists": {"field": "usage.prompt_tokens"}}]
        scope = _scope(project=project, trial=trial, assignment=assignment) + metered
        fields = ["provider", "model", "usage", "cost_usd"]
        sums: dict[tuple[Any, Any], list[Any]] = defaultdict(lambda: [0, 0, 0, 0, Decimal(0), 0])
        for source in self._hits("usage", scope, ["id"], fields):
            used = source["usage"]
            total = sums[(source.get("provider"), source.get("model"))]
            total[0] += 1
            total[1] += used.get("prompt_tokens", 0)
            total[2] += used.get("completion_tokens", 0)
            total[3] += used.get("total_tokens", 0)
            total[4] += Decimal(source.get("cost_usd", "0"))
            total[5] += int(bool(used.get("estimated")))
        return [
            ModelUsage(provider, model, *total)
            for (provider, model), total in sorted(sums.items(), key=_nulls_first)
        ]

    def call_failures(self, assignment: str) -> CallFailures:
        """How many of one assignment's calls failed on the upstream's or the proxy's side."""
        self._refresh()
        calls = failed = 0
        last: dict[str, Any] | None = None
        scope, fields = _scope(assignment=assignment), ["id", "ts_start", "status", "error"]
        for source in self._hits("usage", scope, ["ts_start", "id"], fields):
            calls += 1
            failed += _failed(source)
            last = source
        if last is None or not _failed(last):
            return CallFailures(calls, failed, False, None)
        error = failure_text(last.get("status"), last.get("error"))
        return CallFailures(calls, failed, True, error)

    def provider_calls(
        self,
        *,
        project: str | None = None,
        trial: str | None = None,
        assignment: str | None = None,
    ) -> list[ProviderCalls]:
        """Calls per provider and those whose answer fell short, by status and error."""
        self._refresh()
        scope = _scope(project=project, trial=trial, assignment=assignment)
        scope.append({"exists": {"field": "provider"}})
        fields = ["provider", "status", "upstream_error"]
        return count_provider_calls(
            (source["provider"], source.get("status"), source.get("upstream_error"))
            for source in self._hits("usage", scope, ["id"], fields)
        )

    def flows(
        self,
        *,
        project: str | None = None,
        trial: str | None = None,
        assignment: str | None = None,
    ) -> list[FlowRecord]:
        """Stored flows in the order they started, optionally for one scope: each usage document
        with its headers and bodies (cut to `body_max`), as long as retention keeps them."""
        self._refresh()
        scope = _scope(project=project, trial=trial, assignment=assignment)
        parts: dict[str, dict[str, Any]] = defaultdict(dict)
        for group, names in (("headers", HEADER_FIELDS), ("bodies", _BODY_PARTS)):
            for source in self._hits(group, scope, ["id"], ["id", *sorted(names)]):
                part = {name: source[name] for name in names if name in source}
                messages = (part.pop("websocket", None) or {}).get("messages")
                if messages:
                    parts[source["id"]]["messages"] = messages
                parts[source["id"]].update(part)
        records = []
        for source in self._hits("usage", scope, ["ts_start", "id"], None):
            fields = {k: v for k, v in source.items() if k not in SHIPPED_ONLY}
            part = parts.get(source["id"], {})
            messages = part.pop("messages", None)
            if messages is not None and fields.get("websocket") is not None:
                fields["websocket"] = {**fields["websocket"], "messages": messages}
            records.append(FlowRecord.model_validate({**fields, **part}))
        return records

    def _hits(
        self, group: str, scope: list[dict[str, Any]], sort: list[str], fields: list[str] | None
    ) -> Iterator[dict[str, Any]]:
        """The `_source` (only `fields`; None: all) of every document of `group` in `scope`, by
        `sort` ascending, which must end in a field unique per document (`id`)."""
        index = f"{self.index_prefix}-{group}-*"
        query = {"bool": {"filter": scope}} if scope else {"match_all": {}}
        after: list[Any] | None = None
        while True:
            try:
                answer = self.client.search(
                    index=index,
                    query=query,
                    sort=[{name: "asc"} for name in sort],
                    size=self.page_size,
                    source=True if fields is None else {"includes": fields},
                    search_after=after,
                    track_total_hits=False,
                )
            except (ApiError, TransportError) as exc:
                raise TrafficUnavailable(f"searching {index}: {exc}") from exc
            hits = answer["hits"]["hits"]
            for hit in hits:
                yield hit["_source"]
            if len(hits) < self.page_size:
                return
            after = hits[-1]["sort"]

    def _refresh(self, *, always: bool = False) -> None:
        """Make what was shipped searchable, when a catch-up ran since the last refresh."""
        if not (always or self._refresh_due):
            return
        self._refresh_due = False
        try:
            self.client.indices.refresh(
                index=f"{self.index_prefix}-*", allow_no_indices=True, ignore_unavailable=True
            )
        except (ApiError, TransportError) as exc:
            self._refresh_due = True
            raise TrafficUnavailable(f"refreshing {self.index_prefix}-*: {exc}") from exc


class _Unavailable(Exception):
    """Elasticsearch could not take a batch now; what it did not acknowledge is sent again."""


class _Lines:
    """One read of a spool file: its bulk actions, and how far the acknowledged prefix reaches."""

    def __init__(
        self,
        key: str,
        offset: int,
        data: bytes,
        actions_of: Callable[[FlowRecord, int], list[dict[str, Any]]],
    ) -> None:
        self.key = key
        self.done = offset
        """Byte offset up to which every line is acknowledged, refused or blank."""
        # Per line, in file order: [end offset, record id or None, line offset, line, error,
        # documents not yet answered].
        self._lines: list[list[Any]] = []
        self._actions: list[dict[str, Any]] = []
        position = offset
        for line in data.splitlines(keepends=True):
            end = position + len(line)
            if not line.strip():
                self._lines.append([end, None, position, line, None, 0])
            else:
                try:
                    record = FlowRecord.model_validate_json(line)
                except ValidationError as exc:
                    self._lines.append([end, None, position, line, str(exc), 0])
                else:
                    actions = actions_of(record, position)
                    self._lines.append([end, record.id, position, line, None, len(actions)])
                    self._actions += actions
            position = end
        self.acknowledged = 0
        """Flows now in Elasticsearch, created or found there, behind `done`."""
        self._cursor = 0
        self._skip_unsent()

    def actions(self) -> Iterator[dict[str, Any]]:
        yield from self._actions

    def acknowledge(self, record_id: object) -> None:
        """The next sent document is settled (created, already there, or refused)."""
        current = self._lines[self._cursor]
        end, expected, _, _, error, _ = current
        if record_id != expected:
            raise RuntimeError(f"bulk answer for {record_id!r} where {expected!r} was due")
        current[5] -= 1
        if current[5] > 0:
            return  # the record's other documents are still to be answered
        if error is None:
            self.acknowledged += 1
        self.done = end
        self._cursor += 1
        self._skip_unsent()

    def reject(self, record_id: object, error: str) -> None:
        self._lines[self._cursor][4] = error
        log.error("elasticsearch refused flow %s of %s: %s", record_id, self.key, error)

    def _skip_unsent(self) -> None:
        # Blank and unreadable lines are settled as soon as everything before them is.
        while self._cursor < len(self._lines) and self._lines[self._cursor][1] is None:
            self.done = self._lines[self._cursor][0]
            self._cursor += 1

    def rejects_before_done(self) -> Iterator[tuple[int, str, str]]:
        for end, _, position, line, error, _ in self._lines:
            if end > self.done:
                break
            if error is not None:
                yield position, line.decode("utf-8", errors="replace"), error


def documents(
    record: FlowRecord, body_max: int, spool_file: str, spool_offset: int
) -> list[tuple[str, dict[str, Any], str]]:
    """(field group, `_source`, UTC day) of each document a record is shipped as; the record is
    line `spool_offset` (in bytes) of spool file `spool_file`."""
    record = index_copy(record, body_max)
    day = dt.datetime.fromtimestamp(record.ts_start, dt.UTC)
    timestamp = day.isoformat(timespec="milliseconds")
    source = record.model_dump(mode="json")
    link = {"@timestamp": timestamp, **{name: source[name] for name in LINK_FIELDS}}
    usage = {k: v for k, v in source.items() if k not in HEADER_FIELDS | BODY_FIELDS}
    usage["@timestamp"] = timestamp
    usage["spool_file"] = spool_file
    usage["spool_offset"] = spool_offset
    messages = None
    if usage.get("websocket") is not None:
        messages = usage["websocket"].pop("messages")
    docs = [("usage", usage, f"{day:%Y.%m.%d}")]
    if record.request_headers or record.response_headers:
        headers = {**link, **{name: source[name] for name in sorted(HEADER_FIELDS)}}
        docs.append(("headers", headers, f"{day:%Y.%m.%d}"))
    if record.request_body is not None or record.response_body is not None or messages:
        bodies = {**link, **{name: source[name] for name in sorted(BODY_FIELDS)}}
        if messages:
            bodies["websocket"] = {"messages": messages}
        docs.append(("bodies", bodies, f"{day:%Y.%m.%d}"))
    return docs


_SPOOLED_FIELDS = [
    "id", "spool_file", "spool_offset", "ts_start", "trial", "assignment", "machine", "provider",
    "model", "cost_usd",
]  # fmt: skip
_BODY_PARTS = BODY_FIELDS | {"websocket"}


def _scope(**filters: str | None) -> list[dict[str, Any]]:
    """`term` filters on the link fields that are given (keywords: exact match)."""
    return [{"term": {name: value}} for name, value in filters.items() if value is not None]


def _failed(source: dict[str, Any]) -> bool:
    """A 5xx, or no response at all with an error: the model plane's or the proxy's failure."""
    status = source.get("status")
    return status >= 500 if status is not None else source.get("error") is not None


def _nulls_first(item: tuple[tuple[Any, Any], Any]) -> tuple[object, ...]:
    """SQL's `ORDER BY provider, model` (NULLs first), for the same order as the SQLite store."""
    (provider, model), _ = item
    return (provider is not None, provider or "", model is not None, model or "")
