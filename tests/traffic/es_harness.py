"""A stand-in for the part of Elasticsearch's HTTP API that the traffic store calls.

Elasticsearch cannot run here. This server accepts only what the store sends, checked against
the documented API and what elasticsearch-py 8 puts on the wire:

- `PUT /_index_template/<name>` (docs: indices-put-template), answered `{"acknowledged": true}`;
- `PUT|POST /_bulk` (docs: docs-bulk) with `Content-Type:
  application/vnd.elasticsearch+x-ndjson; compatible-with=8`, an NDJSON body of
  `{"create": {"_index", "_id"}}` action lines each followed by its source line, answered with
  the documented bulk response (`took`, `errors`, `items` of `{"create": {..., "status"}}`):
  201 `created`, 409 `version_conflict_engine_exception` for an `_id` already in the index.
  Each source may hold only fields its index template maps (the templates are `dynamic: false`,
  so Elasticsearch would silently drop any other), and must be a FlowRecord (a `usage` document)
  or a part of one (a `headers` or `bodies` document).
- `POST /<index pattern>/_refresh` (docs: indices-refresh): what was created becomes searchable,
  as on a real node, where a new document is seen by searches only after a refresh;
- `POST /<index pattern>/_search` (docs: search-search, paginate-search-results) with a body of
  `query` (`match_all`, or `bool.filter` of `term` and `exists`), `sort` (field → `asc`/`desc`
  on fields the template maps with doc values, never `text`), `size` (≤ 10,000, the default
  `index.max_result_window`), `search_after` (the last hit's `sort` values), `_source`
  (`true` or `{"includes": [...]}`) and `track_total_hits: false`, answered with the documented
  response (`took`, `timed_out`, `_shards`, `hits.hits` of `_index`, `_id`, `_score: null`,
  `_source`, `sort`), only refreshed documents.

Every 2xx answer carries `X-Elastic-Product: Elasticsearch`, which the 8.x client checks on
each response (it sends no `GET /` first). Anything else is a contract violation: answered 400
and listed in `violations`. `down()`/`up()` close and reopen the port (connection refused);
`fail_with(503)` answers every request with an error; `throttle_every` answers 429 to some items.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote

from pydantic import ValidationError

from contracts.records import FlowRecord
from tests.http_double import HttpDouble, read_body, reply

COMPAT_JSON = "application/vnd.elasticsearch+json; compatible-with=8"
COMPAT_NDJSON = "application/vnd.elasticsearch+x-ndjson; compatible-with=8"
TEMPLATE_FIELDS = {
    "index_patterns",
    "composed_of",
    "template",
    "data_stream",
    "priority",
    "version",
    "_meta",
    "allow_auto_create",
    "ignore_missing_component_templates",
    "deprecated",
}
"""Body fields of PUT _index_template (elasticsearch-specification, IndicesPutIndexTemplate)."""
SEARCH_FIELDS = {"query", "sort", "size", "search_after", "_source", "track_total_hits"}
"""The body fields of a search the store sends (all in the API's search request body)."""
MAX_RESULT_WINDOW = 10_000
"""`index.max_result_window`'s default: `from + size` of one search may not exceed it."""
SORTABLE = {"keyword", "long", "integer", "short", "double", "date", "boolean", "scaled_float"}
"""Field types with doc values that a search may sort on (a `text` field is refused)."""
ERROR_TYPES = {
    429: "es_rejected_execution_exception",
    500: "exception",
    503: "unavailable_shards_exception",
}


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class StandInElasticsearch(HttpDouble):
    methods: ClassVar[tuple[str, ...]] = ("GET", "POST", "PUT", "DELETE", "HEAD")
    product_header: bool = True
    """Whether answers say `X-Elastic-Product: Elasticsearch`; without it the client refuses."""
    throttle_every: int = 0
    """When > 0, every n-th item of a bulk request is answered 429 and not stored."""
    refuse_ids: set[str] = field(default_factory=set)
    """`_id`s answered 400 `document_parsing_exception`, as a mapping conflict would be."""
    templates: dict[str, dict[str, Any]] = field(default_factory=dict)
    indices: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """Index name → `_id` → source."""
    creates: Counter[str] = field(default_factory=Counter)
    """`<index>/<_id>` → times it was created (answered 201): exactly-once means every count
    is 1."""
    statuses: Counter[int] = field(default_factory=Counter)
    """Item and request statuses answered, for asserting a scenario happened."""
    unrefreshed: set[tuple[str, str]] = field(default_factory=set)
    """(index, `_id`) created since the last refresh of its index: not searchable yet."""
    requests: list[Request] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    _failing: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- lifecycle ---------------------------------------------------------------------------

    def down(self) -> None:
        """Close the port: the client's connections are refused until `up()`."""
        self.stop()

    def up(self) -> None:
        """Listen again on the same port, with everything stored so far."""
        self.start(self._port)

    def fail_with(self, status: int | None) -> None:
        """Answer every request with `status` and the documented error body; None heals."""
        self._failing = status

    def documents(self, group: str = "usage") -> dict[str, dict[str, Any]]:
        """Every stored document of one field group (`usage`, `headers`, `bodies`) by `_id`."""
        with self._lock:
            return {
                i: doc
                for index, docs in self.indices.items()
                if f"-{group}-" in index
                for i, doc in docs.items()
            }

    # -- the API -----------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        request = Request(
            handler.command,
            handler.path,
            {k.lower(): v for k, v in handler.headers.items()},
            read_body(handler),
        )
        with self._lock:
            self.requests.append(request)
            status, answer = self._route(request)
            self.statuses[status] += 1
        product = [("X-Elastic-Product", "Elasticsearch")] if self.product_header else []
        kind = "application/vnd.elasticsearch+json;compatible-with=8"
        reply(handler, status, json.dumps(answer).encode(), kind, product)

    def _route(self, request: Request) -> tuple[int, dict[str, Any]]:
        if request.headers.get("accept") != COMPAT_JSON:
            return self._violation(f"Accept {request.headers.get('accept')!r} on {request.path}")
        if self._failing is not None:
            return self._failing, _error(self._failing, "the stand-in is told to fail")
        if request.method == "PUT" and request.path.startswith("/_index_template/"):
            return self._put_template(request)
        if request.method in {"PUT", "POST"} and request.path == "/_bulk":
            return self._bulk(request)
        path, _, query = request.path.partition("?")
        target, _, api = path.removeprefix("/").partition("/")
        if request.method == "POST" and api == "_refresh":
            return self._refresh(unquote(target), parse_qs(query))
        if request.method == "POST" and api == "_search" and not query:
            return self._search(unquote(target), request)
        return self._violation(f"{request.method} {request.path} is not what the shipper calls")

    def _violation(self, message: str) -> tuple[int, dict[str, Any]]:
        self.violations.append(message)
        return 400, _error(400, message, "illegal_argument_exception")

    def _put_template(self, request: Request) -> tuple[int, dict[str, Any]]:
        name = request.path.removeprefix("/_index_template/")
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
            return self._violation(f"template name {name!r}")
        if request.headers.get("content-type") != COMPAT_JSON:
            return self._violation(f"template Content-Type {request.headers.get('content-type')!r}")
        try:
            body = json.loads(request.body)
        except ValueError:
            return self._violation("template body is not JSON")
        unknown = set(body) - TEMPLATE_FIELDS
        patterns = body.get("index_patterns")
        if unknown:
            return self._violation(f"template fields {sorted(unknown)} are not in the API")
        if not (
            isinstance(patterns, list) and patterns and all(isinstance(p, str) for p in patterns)
        ):
            return self._violation(f"index_patterns {patterns!r}")
        if not isinstance(body.get("template", {}).get("mappings", {}).get("properties"), dict):
            return self._violation("template.mappings.properties missing")
        self.templates[name] = body
        return 200, {"acknowledged": True}

    def _bulk(self, request: Request) -> tuple[int, dict[str, Any]]:
        started = time.monotonic()
        if request.headers.get("content-type") != COMPAT_NDJSON:
            return self._violation(f"bulk Content-Type {request.headers.get('content-type')!r}")
        if not request.body.endswith(b"\n"):
            return self._violation("bulk body does not end with a newline")
        lines = request.body[:-1].split(b"\n")
        if len(lines) % 2:
            return self._violation("bulk body has an action line without its source line")
        items = []
        for n, (action_line, source_line) in enumerate(zip(lines[::2], lines[1::2], strict=True)):
            checked = self._check_pair(action_line, source_line)
            if isinstance(checked, str):
                return self._violation(checked)
            index, doc_id, source = checked
            items.append({"create": self._create(n, index, doc_id, source)})
        took = int((time.monotonic() - started) * 1000)
        errors = any(item["create"]["status"] >= 300 for item in items)
        return 200, {"took": took, "errors": errors, "items": items}

    def _check_pair(
        self, action_line: bytes, source_line: bytes
    ) -> tuple[str, str, dict[str, Any]] | str:
        try:
            action = json.loads(action_line)
            source = json.loads(source_line)
        except ValueError:
            return f"bulk line is not JSON: {action_line[:80]!r} / {source_line[:80]!r}"
        if not (isinstance(action, dict) and list(action) == ["create"]):
            return f"action line {action!r} is not a create"
        meta = action["create"]
        if not (isinstance(meta, dict) and set(meta) == {"_index", "_id"}):
            return f"create {meta!r} must name exactly _index and _id"
        index, doc_id = meta["_index"], meta["_id"]
        matching = [
            t
            for t in self.templates.values()
            if any(re.fullmatch(p.replace("*", ".*"), index) for p in t["index_patterns"])
        ]
        if not matching:
            return f"index {index!r} matches no installed template: template first"
        if not isinstance(source, dict) or "@timestamp" not in source:
            return f"source of {doc_id!r} has no @timestamp"
        unmapped = _unmapped(source, matching[0]["template"]["mappings"]["properties"])
        if unmapped:
            return f"source of {doc_id!r} has fields its template does not map: {unmapped}"
        fields = {k: v for k, v in source.items() if k != "@timestamp"}
        if "ts_start" not in fields:  # a headers or bodies document: a part of a record
            fields = {**_REQUIRED, **fields}
        try:
            record = FlowRecord.model_validate(fields)
        except ValidationError as exc:
            return f"source of {doc_id!r} is not (part of) a FlowRecord: {exc}"
        if record.id != doc_id:
            return f"_id {doc_id!r} is not the record id {record.id!r}"
        return index, doc_id, source

    def _create(self, n: int, index: str, doc_id: str, source: dict[str, Any]) -> dict[str, Any]:
        if self.throttle_every and n % self.throttle_every == self.throttle_every - 1:
            self.statuses[429] += 1
            return {
                "_index": index,
                "_id": doc_id,
                "status": 429,
                "error": _cause(
                    "es_rejected_execution_exception",
                    "rejected execution of coordinating operation",
                ),
            }
        if doc_id in self.refuse_ids:
            self.statuses[400] += 1
            return {
                "_index": index,
                "_id": doc_id,
                "status": 400,
                "error": _cause(
                    "document_parsing_exception", "[1:2] failed to parse field [status]"
                ),
            }
        docs = self.indices.setdefault(index, {})
        if doc_id in docs:
            self.statuses[409] += 1
            return {
                "_index": index,
                "_id": doc_id,
                "status": 409,
                "error": {
                    **_cause(
                        "version_conflict_engine_exception",
                        f"[{doc_id}]: version conflict, document already exists "
                        "(current version [1])",
                    ),
                    "index_uuid": uuid.uuid5(uuid.NAMESPACE_URL, index).hex[:22],
                    "shard": "0",
                    "index": index,
                },
            }
        docs[doc_id] = source
        self.unrefreshed.add((index, doc_id))
        self.creates[f"{index}/{doc_id}"] += 1
        self.statuses[201] += 1
        return {
            "_index": index,
            "_id": doc_id,
            "_version": 1,
            "result": "created",
            "_shards": {"total": 2, "successful": 1, "failed": 0},
            "_seq_no": len(docs) - 1,
            "_primary_term": 1,
            "status": 201,
        }

    def _refresh(self, pattern: str, params: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        if not set(params) <= {"allow_no_indices", "ignore_unavailable"} or any(
            v not in (["true"], ["false"]) for v in params.values()
        ):
            return self._violation(f"refresh parameters {params!r}")
        indices = [name for name in self.indices if _matches(pattern, name)]
        if not indices and params.get("allow_no_indices") != ["true"]:
            return 404, _error(404, f"no such index [{pattern}]", "index_not_found_exception")
        self.unrefreshed = {(i, d) for i, d in self.unrefreshed if i not in indices}
        shards = {"total": 2 * len(indices), "successful": len(indices), "failed": 0}
        return 200, {"_shards": shards}

    def _search(self, pattern: str, request: Request) -> tuple[int, dict[str, Any]]:
        started = time.monotonic()
        if request.headers.get("content-type") != COMPAT_JSON:
            return self._violation(f"search Content-Type {request.headers.get('content-type')!r}")
        try:
            body = json.loads(request.body)
        except ValueError:
            return self._violation("search body is not JSON")
        if not isinstance(body, dict) or not set(body) <= SEARCH_FIELDS:
            return self._violation(f"search body fields {sorted(body)}: not what the store sends")
        mapped = [t for t in self.templates.values() if pattern in t["index_patterns"]]
        if len(mapped) > 1:
            return self._violation(f"search of {pattern!r}: the pattern of several templates")
        # Before the first catch-up there is no template and no index: a search finds nothing,
        # and only the shape of the request can be checked.
        properties = mapped[0]["template"]["mappings"]["properties"] if mapped else None
        checked = _search_plan(body, properties)
        if isinstance(checked, str):
            return self._violation(f"search of {pattern!r}: {checked}")
        matches, sort, size, after, includes = checked
        hits = []
        for index in sorted(i for i in self.indices if _matches(pattern, i)):
            for doc_id, source in self.indices[index].items():
                if (index, doc_id) not in self.unrefreshed and matches(source):
                    values = [_value(source, name) for name, _ in sort]
                    hits.append((_sort_key(values, sort), values, index, doc_id, source))
        hits.sort(key=lambda hit: hit[0])
        if after is not None:
            hits = [hit for hit in hits if hit[0] > _sort_key(after, sort)]
        shards = len({hit[2] for hit in hits}) or 1
        return 200, {
            "took": int((time.monotonic() - started) * 1000),
            "timed_out": False,
            "_shards": {"total": shards, "successful": shards, "skipped": 0, "failed": 0},
            "hits": {
                "max_score": None,
                "hits": [
                    {
                        "_index": index,
                        "_id": doc_id,
                        "_score": None,
                        "_source": source if includes is None else _include(source, includes),
                        "sort": values,
                    }
                    for _, values, index, doc_id, source in hits[:size]
                ],
            },
        }


Plan = tuple[
    Callable[[dict[str, Any]], bool], list[tuple[str, str]], int, list[Any] | None, set[str] | None
]


def _search_plan(body: dict[str, Any], properties: dict[str, Any] | None) -> Plan | str:
    """(matches, sort, size, search_after, `_source` includes) of a search body, or what is
    wrong with it. Only what the store sends is understood; anything else is a violation.
    Fields are checked against the template's `properties` (None: no template, no check)."""
    if body.get("track_total_hits") is not False:
        return "track_total_hits must be false (the store pages on; a total is not needed)"
    size = body.get("size")
    if not isinstance(size, int) or not 0 < size <= MAX_RESULT_WINDOW:
        return f"size {size!r} is not 1 to {MAX_RESULT_WINDOW}"
    query = body.get("query")
    if query == {"match_all": {}}:
        filters: list[Any] = []
    elif isinstance(query, dict) and list(query) == ["bool"] and list(query["bool"]) == ["filter"]:
        filters = query["bool"]["filter"]
    else:
        return f"query {query!r} is neither match_all nor bool.filter"
    tests: list[Callable[[dict[str, Any]], bool]] = []
    for clause in filters if isinstance(filters, list) else [None]:
        if not (isinstance(clause, dict) and len(clause) == 1):
            return f"filter clause {clause!r}"
        ((kind, spec),) = clause.items()
        if kind == "term" and isinstance(spec, dict) and len(spec) == 1:
            ((name, value),) = spec.items()
            if _mapping(properties, name).get("type") not in SORTABLE:
                return f"term on {name!r}, not a keyword or numeric field of the template"
            tests.append(lambda s, n=name, v=value: _value(s, n) == v)
        elif kind == "exists" and isinstance(spec, dict) and list(spec) == ["field"]:
            if not _mapping(properties, spec["field"]):
                return f"exists on {spec['field']!r}, which the template does not map"
            tests.append(lambda s, n=spec["field"]: _value(s, n) not in (None, []))
        else:
            return f"filter clause {clause!r} is neither term nor exists"
    sort = []
    for item in body.get("sort", []):
        ((name, order),) = item.items() if isinstance(item, dict) and len(item) == 1 else [(0, 0)]
        order = order.get("order") if isinstance(order, dict) else order
        if order not in ("asc", "desc") or not isinstance(name, str):
            return f"sort {item!r}"
        if _mapping(properties, name).get("type") not in SORTABLE:
            return f"sort on {name!r}, which has no doc values in the template (text, unmapped)"
        sort.append((name, order))
    after = body.get("search_after")
    if after is not None and not (isinstance(after, list) and len(after) == len(sort) > 0):
        return f"search_after {after!r} does not match the sort {sort!r}"
    source = body.get("_source", True)
    if source is True:
        includes = None
    elif isinstance(source, dict) and list(source) == ["includes"]:
        includes = set(source["includes"])
    else:
        return f"_source {source!r}"
    return (lambda s: all(test(s) for test in tests)), sort, size, after, includes


def _mapping(properties: dict[str, Any] | None, path: str) -> dict[str, Any]:
    """The mapping of dotted field `path`, {} when the template does not map it (any sortable
    mapping when there is no template to check against)."""
    if properties is None:
        return {"type": "keyword"}
    mapping: dict[str, Any] = {"properties": properties}
    for name in path.split("."):
        mapping = mapping.get("properties", {}).get(name, {})
    return mapping


def _value(source: dict[str, Any], path: str) -> Any:
    value: Any = source
    for name in path.split("."):
        value = value.get(name) if isinstance(value, dict) else None
    return value


def _sort_key(values: list[Any], sort: list[tuple[str, str]]) -> tuple[Any, ...]:
    """Missing values last, whatever the order (Elasticsearch's default `missing: _last`)."""
    key: list[Any] = []
    for value, (_, order) in zip(values, sort, strict=True):
        if value is None:
            key.append((1, 0))
        elif order == "asc":
            key.append((0, value))
        else:  # the store sorts ascending only; descending numbers are enough for the checks
            key.append((0, -value))
    return tuple(key)


def _include(source: dict[str, Any], paths: set[str], prefix: str = "") -> dict[str, Any]:
    """`_source` filtering: the fields named by `paths`, objects kept for the paths inside."""
    kept = {}
    for name, value in source.items():
        path = prefix + name
        if path in paths:
            kept[name] = value
        elif isinstance(value, dict) and any(p.startswith(path + ".") for p in paths):
            inner = _include(value, paths, path + ".")
            if inner:
                kept[name] = inner
    return kept


def _matches(pattern: str, index: str) -> bool:
    """Whether `index` is named by a comma-separated list of wildcard patterns."""
    return any(re.fullmatch(re.escape(p).replace(r"\*", ".*"), index) for p in pattern.split(","))


_REQUIRED = {
    "ts_start": 0.0,
    "ts_end": 0.0,
    "duration_ms": 0.0,
    "method": "GET",
    "url": "http://x/",
    "host": "x",
    "path": "/",
}
"""FlowRecord fields without a default, to check a part of a record against the model."""


def _unmapped(source: Any, properties: dict[str, Any], path: str = "") -> list[str]:
    """Fields of `source` (objects and lists of objects, recursively) with no mapping."""
    found = []
    items = source if isinstance(source, list) else [source]
    for item in items:
        if not isinstance(item, dict):
            continue
        for name, value in item.items():
            mapping = properties.get(name)
            if mapping is None:
                found.append(path + name)
            elif "properties" in mapping:
                found += _unmapped(value, mapping["properties"], f"{path}{name}.")
    return sorted(set(found))


def _cause(kind: str, reason: str) -> dict[str, Any]:
    return {"type": kind, "reason": reason}


def _error(status: int, reason: str, kind: str | None = None) -> dict[str, Any]:
    """The documented error body: `{"error": {"root_cause": [...], "type", "reason"}, "status"}`."""
    cause = _cause(kind or ERROR_TYPES.get(status, "exception"), reason)
    return {"error": {"root_cause": [cause], **cause}, "status": status}


@dataclass
class Target:
    """Where an Elasticsearch test runs: the stand-in, or a real cluster (`pytest -m live`)."""

    url: str
    prefix: str
    stored: Callable[[], list[tuple[str, str, dict[str, Any]]]]
    """Every stored document as (index, _id, source)."""
    stand_in: StandInElasticsearch | None = None
