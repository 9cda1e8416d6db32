"""The read port, `traffic.stores.MeteredFlows`, answered alike by both stores from one spool.

Each reading test runs against the SQLite store and the Elasticsearch store (the stand-in, which
shows a document to searches only after a refresh, or with `pytest -m live` a real cluster),
both fed from the same spool, and checks them against what the spool itself says: the same
spooled list, the same usage to the last decimal of cost, the same failures, the same records.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from es_harness import COMPAT_JSON, StandInElasticsearch, Target
from test_elasticsearch import DAY1, DAY2, flow, spool

from contracts.dataroot import DataRoot
from contracts.records import Body, FlowRecord, Usage, WebSocket, WebSocketMessage
from contracts.settings import Settings
from traffic.elasticsearch_store import ElasticsearchTrafficStore
from traffic.spool import FILE_NAME
from traffic.sqlite_store import DEFAULT_BODY_MAX, SqliteTrafficStore, index_copy
from traffic.stores import (
    CallFailures,
    ErrorCount,
    MeteredFlows,
    ModelUsage,
    ProviderCalls,
    SpooledFlow,
    TrafficUnavailable,
    metered_flows_for,
)

PAGE = 3
"""Hits per search in these tests: every read below takes several pages (`search_after`)."""
TINY = Decimal("0.000000000123456789")
"""Below a `scaled_float`'s 1e-9: a sum in Elasticsearch would lose it; the ledger may not."""


def traffic() -> list[FlowRecord]:
    """Two projects over two days, two providers, priced, estimated, failed and unmetered calls,
    one with headers, bodies and websocket messages; enough for several pages of every read."""
    message = WebSocketMessage(
        from_client=True, timestamp=DAY1 + 0.1, type="text", content=Body(text="hi", size=2)
    )
    records = [
        flow(DAY1 + n, cost_usd=Decimal("0.0000045") + n * TINY, usage=Usage(
            prompt_tokens=10 + n, completion_tokens=n, total_tokens=10 + 2 * n
        ))
        for n in range(7)
    ]  # fmt: skip
    records += [
        flow(DAY1 + 10, provider="anthropic", model="claude-3-5-haiku", cost_usd=Decimal("0.25")),
        flow(DAY1 + 11, assignment="a2", trial="t2", cost_usd=TINY, usage=Usage(
            prompt_tokens=100, total_tokens=100, estimated=True
        )),
        flow(DAY1 + 12, status=502, usage=None, cost_usd=Decimal(0), error="bad gateway",
             upstream_error="http_502"),
        flow(DAY1 + 13, status=None, usage=None, provider=None, model=None, error="reset"),
        flow(DAY1 + 14, status=407, usage=None, provider=None, model=None, project=None,
             trial=None, assignment=None, machine=None),
        flow(
            DAY1 + 15,
            request_headers=[("Content-Type", "application/json"), ("Cookie", "[REDACTED]")],
            response_headers=[("Set-Cookie", "[REDACTED]")],
            request_body=Body(text='{"model": "gpt-4o-mini"}', size=24),
            response_body=Body(text="é" * (DEFAULT_BODY_MAX // 2 + 5), size=DEFAULT_BODY_MAX + 10),
            websocket=WebSocket(messages_from_client=1, bytes_from_client=2, messages=[message]),
        ),
        flow(DAY1 + 16, provider="anthropic", model="claude-3-5-haiku", status=529, usage=None,
             cost_usd=Decimal(0), upstream_error="overloaded_error"),
        flow(DAY1 + 17, provider="anthropic", model="claude-3-5-haiku", cost_usd=Decimal("0.01"),
             error="peer closed connection", upstream_error="stream_cut"),
        flow(DAY2, project="p2", assignment="b1", cost_usd=Decimal("1.1")),
        flow(DAY2 + 1, machine="m2", cost_usd=Decimal("0.1") + TINY),
    ]  # fmt: skip
    # The same ids on every call, so a test may compare the stores with a fresh copy.
    return [r.model_copy(update={"id": f"flow-{n:02d}"}) for n, r in enumerate(records)]


@pytest.fixture(params=["sqlite", "elasticsearch"])
def reader(
    request: pytest.FixtureRequest, target: Target, tmp_path: Path
) -> Iterator[MeteredFlows]:
    """The store named by the parameter, caught up with a spool of `traffic()`."""
    if request.param == "sqlite" and target.stand_in is None:
        pytest.skip("the SQLite store is the same with or without a cluster")
    root = DataRoot.at(tmp_path)
    spool(root, traffic())
    store: MeteredFlows
    if request.param == "sqlite":
        store = SqliteTrafficStore.in_root(root)
    else:
        store = ElasticsearchTrafficStore.in_root(
            root, target.url, index_prefix=target.prefix, page_size=PAGE
        )
    store.catch_up(root.traffic_logs)
    yield store
    store.close()


# -- what the spool says, worked out here without either store ---------------------------------


def spool_lines(traffic_logs: Path) -> list[tuple[str, int, FlowRecord]]:
    """(spool file, byte offset, record) of every line, in spool order."""
    lines = []
    for path in sorted(traffic_logs.glob(f"*/*/{FILE_NAME}")):
        offset = 0
        for line in path.read_bytes().splitlines(keepends=True):
            key = path.relative_to(traffic_logs).as_posix()
            lines.append((key, offset, FlowRecord.model_validate_json(line)))
            offset += len(line)
    return lines


def expected_usage(records: list[FlowRecord]) -> list[ModelUsage]:
    sums: dict[tuple[str, str], list[object]] = defaultdict(lambda: [0, 0, 0, 0, Decimal(0), 0])
    for r in records:
        if r.usage is not None:
            total = sums[(r.provider or "", r.model or "")]
            total[0] += 1  # type: ignore[operator]
            total[1] += r.usage.prompt_tokens  # type: ignore[operator]
            total[2] += r.usage.completion_tokens  # type: ignore[operator]
            total[3] += r.usage.total_tokens  # type: ignore[operator]
            total[4] += r.cost_usd  # type: ignore[operator]
            total[5] += int(r.usage.estimated)  # type: ignore[operator]
    return [ModelUsage(p, m, *t) for (p, m), t in sorted(sums.items())]  # type: ignore[arg-type]


def in_order(records: list[FlowRecord]) -> list[FlowRecord]:
    return [
        index_copy(r, DEFAULT_BODY_MAX) for r in sorted(records, key=lambda r: (r.ts_start, r.id))
    ]


# -- the same assertions, both stores ----------------------------------------------------------


def test_spooled_is_the_spool_in_order(reader: MeteredFlows, tmp_path: Path) -> None:
    lines = spool_lines(DataRoot.at(tmp_path).traffic_logs)
    for project in ("p1", "p2", "nobody"):
        assert reader.spooled(project) == [
            SpooledFlow(
                key, r.id, offset, r.ts_start, r.trial, r.assignment, r.machine, r.provider,
                r.model, r.usage.total_tokens if r.usage else 0, r.cost_usd,
            )
            for key, offset, r in lines
            if r.project == project
        ]  # fmt: skip


def test_usage_is_summed_to_the_last_decimal(reader: MeteredFlows) -> None:
    records = traffic()
    usage = reader.usage()
    assert usage == expected_usage(records)
    assert [u.cost_usd for u in usage if u.provider == "openai"] == [
        Decimal("0.0000045") * 8 + Decimal("0.1") + Decimal("1.1") + 23 * TINY
    ]
    assert reader.usage(project="p2") == expected_usage([r for r in records if r.project == "p2"])
    assert reader.usage(trial="t2") == expected_usage([r for r in records if r.trial == "t2"])
    assert reader.usage(assignment="a2") == reader.usage(trial="t2")
    assert reader.usage(project="p1", assignment="b1") == []


def test_call_failures_are_the_assignments_5xx_and_dropped_calls(reader: MeteredFlows) -> None:
    calls = sum(r.assignment == "a1" for r in traffic())
    assert reader.call_failures("a1") == CallFailures(calls, 3, False, None)  # 502, reset, 529
    assert reader.call_failures("b1") == CallFailures(1, 0, False, None)
    assert reader.call_failures("none") == CallFailures(0, 0, False, None)


def test_provider_calls_count_what_fell_short_by_status_and_error(reader: MeteredFlows) -> None:
    records = traffic()
    openai_t1 = sum(r.provider == "openai" and r.trial == "t1" for r in records)
    assert reader.provider_calls(trial="t1") == [
        ProviderCalls("anthropic", 3, (
            ErrorCount(200, "stream_cut", 1), ErrorCount(529, "overloaded_error", 1),
        )),
        ProviderCalls("openai", openai_t1, (ErrorCount(502, "http_502", 1),)),
    ]  # fmt: skip
    assert reader.provider_calls(project="p2") == [ProviderCalls("openai", 1, ())]
    assert reader.provider_calls(assignment="none") == []


def test_flows_come_back_as_records(reader: MeteredFlows) -> None:
    records = traffic()
    assert reader.flows() == in_order(records)
    assert reader.flows(assignment="a1") == in_order([r for r in records if r.assignment == "a1"])
    assert reader.flows(project="p2") == in_order([r for r in records if r.project == "p2"])
    (whole,) = [f for f in reader.flows(trial="t1") if f.websocket is not None]
    assert whole.request_headers[0] == ("Content-Type", "application/json")
    assert whole.response_body is not None and whole.response_body.truncated
    assert whole.websocket is not None and whole.websocket.messages[0].content.text == "hi"


def test_the_last_failed_call_is_named(target: Target, tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    spool(root, [flow(DAY1), flow(DAY1 + 1, status=503, error="overloaded")])
    spool(root, [flow(DAY1 + 2, status=None, usage=None, error="connection reset")])
    with (
        SqliteTrafficStore.in_root(root) as sqlite,
        ElasticsearchTrafficStore.in_root(root, target.url, index_prefix=target.prefix) as es,
    ):
        for store in (sqlite, es):
            store.catch_up(root.traffic_logs)
            assert store.call_failures("a1") == CallFailures(3, 2, True, "connection reset")
        spool(root, [flow(DAY1 + 3, status=502, error="upstream")])
        for store in (sqlite, es):
            store.catch_up(root.traffic_logs)
            assert store.call_failures("a1") == CallFailures(4, 3, True, "HTTP 502: upstream")


# -- Elasticsearch only ------------------------------------------------------------------------


def test_spooled_stops_where_the_registry_does(
    stand_in: StandInElasticsearch, tmp_path: Path
) -> None:
    """A 429 on one item: the flows after it are in Elasticsearch, behind no offset yet. The
    ledger's watermark may not pass the missing one, so they are not spooled until it lands."""
    root = DataRoot.at(tmp_path)
    records = [flow(DAY1 + n) for n in range(4)]
    spool(root, records)
    stand_in.throttle_every = 2  # the second item of the bulk is answered 429
    with ElasticsearchTrafficStore.in_root(root, stand_in.url, initial_backoff_s=0) as es:
        assert es.catch_up(root.traffic_logs) == 1
        assert set(stand_in.documents()) == {records[0].id, records[2].id}
        assert [f.id for f in es.spooled("p1")] == [records[0].id]
        assert len(es.flows()) == 2  # a plain read shows what is there
        stand_in.throttle_every = 0
        assert es.catch_up(root.traffic_logs) == 3
        assert [f.id for f in es.spooled("p1")] == [r.id for r in records]


def test_reads_page_with_search_after_in_the_documented_shape(
    stand_in: StandInElasticsearch, tmp_path: Path
) -> None:
    root = DataRoot.at(tmp_path)
    records = [flow(DAY1 + n) for n in range(5)]
    spool(root, records)
    with ElasticsearchTrafficStore.in_root(root, stand_in.url, page_size=2) as es:
        es.catch_up(root.traffic_logs)
        del stand_in.requests[:]
        assert [f.id for f in es.spooled("p1")] == [r.id for r in records]
    refresh, *searches = stand_in.requests
    assert (refresh.method, refresh.path) == (
        "POST",
        "/autovibe-traffic-*/_refresh?allow_no_indices=true&ignore_unavailable=true",
    )
    # Five hits, two a page: three searches, each after the last hit of the one before.
    assert [(s.method, s.path) for s in searches] == [
        ("POST", "/autovibe-traffic-usage-*/_search")
    ] * 3
    bodies = [json.loads(s.body) for s in searches]
    assert all(s.headers["content-type"] == COMPAT_JSON for s in searches)
    first = bodies[0]
    assert first == {
        "query": {"bool": {"filter": [{"term": {"project": "p1"}}]}},
        "sort": [{"spool_file": "asc"}, {"spool_offset": "asc"}, {"id": "asc"}],
        "size": 2,
        "_source": {"includes": [
            "id", "spool_file", "spool_offset", "ts_start", "trial", "assignment", "machine",
            "provider", "model", "cost_usd", "usage.total_tokens",
        ]},
        "track_total_hits": False,
    }  # fmt: skip
    offset = len(records[0].model_dump_json()) + 1
    after = ["p1/2023-11-14/flows.jsonl", offset, records[1].id]
    assert bodies[1] == {**first, "search_after": after}
    assert "search_after" in bodies[2]


def test_a_read_refreshes_only_after_a_catch_up(
    stand_in: StandInElasticsearch, tmp_path: Path
) -> None:
    root = DataRoot.at(tmp_path)
    spool(root, [flow()])
    with ElasticsearchTrafficStore.in_root(root, stand_in.url) as es:
        es.catch_up(root.traffic_logs)
        assert len(es.flows()) == 1
        es.usage()
        es.call_failures("a1")
        es.catch_up(root.traffic_logs)
        es.usage()
    refreshes = [r for r in stand_in.requests if "/_refresh" in r.path]
    assert len(refreshes) == 2


def test_a_cluster_that_does_not_answer_is_named(
    stand_in: StandInElasticsearch, tmp_path: Path
) -> None:
    root = DataRoot.at(tmp_path)
    with ElasticsearchTrafficStore.in_root(root, stand_in.url) as es:
        stand_in.fail_with(503)
        with pytest.raises(TrafficUnavailable, match=r"refreshing autovibe-traffic-\*"):
            es.usage()
        stand_in.fail_with(None)
        assert es.usage() == []
        stand_in.down()
        with pytest.raises(TrafficUnavailable, match=r"searching autovibe-traffic-\w+-\*"):
            es.flows()
        stand_in.up()


# -- picking the reader ------------------------------------------------------------------------


def test_readers_read_the_store_the_settings_name(
    stand_in: StandInElasticsearch, tmp_path: Path
) -> None:
    settings = Settings(data=tmp_path)
    sqlite = metered_flows_for(settings)
    assert isinstance(sqlite, SqliteTrafficStore)
    sqlite.close()
    es_settings = settings.model_copy(
        update={
            "traffic_store": "elasticsearch",
            "elasticsearch_url": stand_in.url,
            "index_body_max": 100,
        }
    )
    es = metered_flows_for(es_settings)
    assert isinstance(es, ElasticsearchTrafficStore)
    assert es.body_max == 100
    es.close()
    with pytest.raises(ValueError, match="AUTOVIBE_ELASTICSEARCH_URL must be set"):
        metered_flows_for(es_settings.model_copy(update={"elasticsearch_url": " "}))
