"""The Elasticsearch traffic store: real elasticsearch-py against the stand-in, or a real cluster.

The scenario tests run twice: against `es_harness.StandInElasticsearch` (every request checked
against the documented API) and, with `pytest -m live` and `ELASTICSEARCH_URL` set, against a
real Elasticsearch 8. Contract tests check the exact bytes the shipper puts on the wire.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from es_harness import COMPAT_JSON, COMPAT_NDJSON, StandInElasticsearch, Target
from mitmproxy import exceptions
from mitmproxy.test import taddons

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))
from proxy_harness import PRICES_YAML

from contracts.adapters import UnknownAdapter
from contracts.dataroot import DataRoot
from contracts.records import Body, FlowRecord, Usage, WebSocket, WebSocketMessage
from contracts.settings import PROJECT_ROOT, Settings, free_port
from proxy.addons.indexer import Indexer
from proxy.launch import mitmdump_argv, wait_ready
from retention.policy import load_policy
from retention.render import ilm_policies
from traffic.elasticsearch_store import (
    DEFAULT_PREFIX,
    GROUPS,
    REGISTRY_FILE,
    TEMPLATES,
    ElasticsearchTrafficStore,
)
from traffic.spool import Spool
from traffic.sqlite_store import SqliteTrafficStore
from traffic.stores import get_store

DAY1 = 1_700_000_000.0  # 2023-11-14 UTC
DAY2 = DAY1 + 86_400.0


def flow(ts_start: float = DAY1, project: str = "p1", **fields: object) -> FlowRecord:
    values: dict[str, object] = {
        "id": uuid.uuid4().hex,
        "ts_start": ts_start,
        "ts_end": ts_start + 0.25,
        "duration_ms": 250.0,
        "method": "POST",
        "url": "https://api.openai.com/v1/chat/completions",
        "host": "api.openai.com",
        "path": "/v1/chat/completions",
        "status": 200,
        "project": project,
        "trial": "t1",
        "assignment": "a1",
        "machine": "m1",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "usage": Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15),
        "cost_usd": Decimal("0.0000045"),
    }
    values.update(fields)
    return FlowRecord.model_validate(values)


# -- targets: the stand-in, or a real cluster ----------------------------------------------


def shipper(target: Target, root: DataRoot, **options: Any) -> ElasticsearchTrafficStore:
    return ElasticsearchTrafficStore.in_root(
        root, target.url, index_prefix=target.prefix, initial_backoff_s=0.01, **options
    )


def spool(root: DataRoot, records: list[FlowRecord]) -> None:
    with Spool(root) as s:
        for record in records:
            s.append(record)


def assert_exactly_once(target: Target, records: list[FlowRecord]) -> None:
    stored = target.stored()
    ids = [doc_id for index, doc_id, _ in stored if "-usage-" in index]
    assert len(ids) == len(set(ids)), "a flow is stored twice"
    assert set(ids) == {r.id for r in records}
    if target.stand_in is not None:
        assert set(target.stand_in.creates.values()) == {1}


# -- the same checks, stand-in and live ------------------------------------------------------


def test_ships_every_line_once_into_its_day(target: Target, tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    records = [flow(DAY1), flow(DAY1, project="p2"), flow(DAY2), flow(DAY2 + 5, error="reset")]
    spool(root, records)
    with shipper(target, root) as es:
        assert es.catch_up(root.traffic_logs) == 4
        assert es.catch_up(root.traffic_logs) == 0
        sizes = {
            p.relative_to(root.traffic_logs).as_posix(): p.stat().st_size
            for p in root.traffic_logs.glob("*/*/flows.jsonl")
        }
        assert es.offsets() == sizes
        assert es.rejects() == []
    assert_exactly_once(target, records)
    by_id = {doc_id: (index, source) for index, doc_id, source in target.stored()}
    index, source = by_id[records[2].id]
    assert index == f"{target.prefix}-usage-2023.11.15"
    assert by_id[records[0].id][0] == f"{target.prefix}-usage-2023.11.14"
    assert source["@timestamp"] == "2023-11-15T22:13:20.000+00:00"
    fields = {k: v for k, v in source.items() if k != "@timestamp"}
    assert FlowRecord.model_validate(fields) == records[2]


def test_a_crash_before_the_registry_commit_duplicates_nothing(
    target: Target, tmp_path: Path
) -> None:
    root = DataRoot.at(tmp_path)
    records = [flow() for _ in range(5)]
    spool(root, records)
    with shipper(target, root) as es:
        assert es.catch_up(root.traffic_logs) == 5
    # Elasticsearch acknowledged, the registry never heard of it: everything is sent again.
    (root.traffic_logs / REGISTRY_FILE).unlink()
    more = [flow() for _ in range(2)]
    spool(root, more)
    with shipper(target, root) as es:
        # Five found already there (409) and two created: all seven now behind the offset.
        assert es.catch_up(root.traffic_logs) == 7
    assert_exactly_once(target, records + more)
    if target.stand_in is not None:
        assert target.stand_in.statuses[409] == 5


def test_a_torn_tail_waits_for_its_newline(target: Target, tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    first, torn = flow(), flow()
    spool(root, [first])
    (path,) = root.traffic_logs.glob("*/*/flows.jsonl")
    line = torn.model_dump_json().encode() + b"\n"
    with path.open("ab") as fh:
        fh.write(line[:40])
    with shipper(target, root) as es:
        assert es.catch_up(root.traffic_logs) == 1
        with path.open("ab") as fh:
            fh.write(line[40:])
        assert es.catch_up(root.traffic_logs) == 1
    assert_exactly_once(target, [first, torn])


def test_unreadable_lines_are_kept_as_rejects_and_never_sent(
    target: Target, tmp_path: Path
) -> None:
    root = DataRoot.at(tmp_path)
    before, after = flow(), flow()
    spool(root, [before])
    (path,) = root.traffic_logs.glob("*/*/flows.jsonl")
    with path.open("ab") as fh:
        fh.write(b'{"id": "half a record"}\n\n')
    spool(root, [after])
    with shipper(target, root) as es:
        assert es.catch_up(root.traffic_logs) == 2
        ((file, offset, error),) = es.rejects()
    assert file == path.relative_to(root.traffic_logs).as_posix()
    assert offset == len(before.model_dump_json()) + 1
    assert "ts_start" in error
    assert_exactly_once(target, [before, after])


# -- the wire, against the stand-in ---------------------------------------------------------


def test_bulk_request_is_create_actions_in_compat_ndjson(
    stand_in: StandInElasticsearch, tmp_path: Path
) -> None:
    root = DataRoot.at(tmp_path)
    record = flow()
    spool(root, [record])
    with ElasticsearchTrafficStore.in_root(root, stand_in.url) as es:
        assert es.catch_up(root.traffic_logs) == 1
    *templates, bulk = stand_in.requests
    assert [(t.method, t.path) for t in templates] == [
        ("PUT", f"/_index_template/autovibe-traffic-{group}") for group in GROUPS
    ]
    for template, group in zip(templates, GROUPS, strict=True):
        assert template.headers["content-type"] == COMPAT_JSON
        body = json.loads(template.body)
        assert body["index_patterns"] == [f"autovibe-traffic-{group}-*"]
        assert body["template"]["settings"]["index.lifecycle.name"] == f"autovibe-traffic-{group}"
    assert (bulk.method, bulk.path) == ("PUT", "/_bulk")
    assert bulk.headers["content-type"] == COMPAT_NDJSON
    assert bulk.headers["accept"] == COMPAT_JSON
    # A schema-1-like record (no headers, no bodies) is one document, in the usage index.
    action, source, end = bulk.body.split(b"\n")
    # expand_action writes `_id` before `_index`; Elasticsearch reads either order.
    assert json.loads(action) == {
        "create": {"_id": record.id, "_index": "autovibe-traffic-usage-2023.11.14"}
    }
    assert action == json.dumps(json.loads(action), separators=(",", ":")).encode()
    assert end == b""
    expected = {
        **record.model_dump(mode="json", exclude={"request_headers", "response_headers"}),
        "@timestamp": "2023-11-14T22:13:20.000+00:00",
        # Where the spool holds it: what the ledger's posting reads back, in spool order.
        "spool_file": "p1/2023-11-14/flows.jsonl",
        "spool_offset": 0,
    }
    del expected["request_body"], expected["response_body"]
    assert json.loads(source) == expected
    assert json.loads(source)["cost_usd"] == "0.0000045"  # exact decimal, never a float


def test_a_record_is_split_by_field_group_with_bodies_cut(
    stand_in: StandInElasticsearch, tmp_path: Path
) -> None:
    """Headers and bodies go to indices of their own (their own ILM retention), bodies cut."""
    root = DataRoot.at(tmp_path)
    body = Body(text="é" * 40, size=80, sha256="ab" * 32)
    message = WebSocketMessage(
        from_client=True, timestamp=DAY1 + 0.1, type="text", content=Body(text="hi", size=2)
    )
    record = flow(
        request_headers=[("Content-Type", "application/json"), ("Cookie", "[REDACTED]")],
        response_headers=[("Set-Cookie", "[REDACTED]"), ("Set-Cookie", "[REDACTED]")],
        request_body=body,
        websocket=WebSocket(messages_from_client=1, bytes_from_client=2, messages=[message]),
    )
    spool(root, [record])
    with ElasticsearchTrafficStore.in_root(root, stand_in.url, body_max=11) as es:
        assert es.catch_up(root.traffic_logs) == 1
    bulk = stand_in.requests[-1]
    lines = [json.loads(line) for line in bulk.body.splitlines()]
    assert [line["create"] for line in lines[::2]] == [
        {"_id": record.id, "_index": f"autovibe-traffic-{group}-2023.11.14"} for group in GROUPS
    ]
    usage, headers, bodies = lines[1::2]
    timestamp = "2023-11-14T22:13:20.000+00:00"
    link = {
        "@timestamp": timestamp,
        "id": record.id,
        "project": "p1",
        "trial": "t1",
        "assignment": "a1",
        "machine": "m1",
    }
    websocket = record.model_dump(mode="json")["websocket"]
    assert usage == {
        **record.model_dump(
            mode="json",
            exclude={"request_headers", "response_headers", "request_body", "response_body"},
        ),
        "websocket": {k: v for k, v in websocket.items() if k != "messages"},
        "@timestamp": timestamp,
        "spool_file": "p1/2023-11-14/flows.jsonl",
        "spool_offset": 0,
    }
    assert headers == {
        **link,
        "request_headers": [["Content-Type", "application/json"], ["Cookie", "[REDACTED]"]],
        "response_headers": [["Set-Cookie", "[REDACTED]"], ["Set-Cookie", "[REDACTED]"]],
    }
    assert bodies == {
        **link,
        "request_body": {
            "text": "é" * 5,  # 11 bytes cut at a whole character
            "encoding": "utf-8",
            "size": 80,
            "sha256": "ab" * 32,
            "truncated": True,
            "decode_error": None,
        },
        "response_body": None,
        "websocket": {"messages": websocket["messages"]},
    }
    assert set(stand_in.creates) == {
        f"autovibe-traffic-{group}-2023.11.14/{record.id}" for group in GROUPS
    }


def test_templates_map_every_record_field() -> None:
    templates = {g: json.loads(path.read_text()) for g, path in TEMPLATES.items()}
    properties = {g: t["template"]["mappings"]["properties"] for g, t in templates.items()}
    fields = {"@timestamp", *FlowRecord.model_fields}
    spool = {"spool_file", "spool_offset"}
    assert set().union(*properties.values()) == fields | spool
    assert set(properties["usage"]) == spool | fields - {
        "request_headers",
        "response_headers",
        "request_body",
        "response_body",
    }
    assert properties["usage"]["spool_file"] == {"type": "keyword"}  # sorted on: doc values
    assert properties["usage"]["spool_offset"] == {"type": "long"}
    assert set(properties["usage"]["usage"]["properties"]) == set(Usage.model_fields)
    assert set(properties["usage"]["websocket"]["properties"]) == set(WebSocket.model_fields) - {
        "messages"
    }
    assert set(properties["bodies"]["request_body"]["properties"]) == set(Body.model_fields)
    message = properties["bodies"]["websocket"]["properties"]["messages"]["properties"]
    assert set(message) == set(WebSocketMessage.model_fields)
    # The policies they name are those `autovibe retention render` writes from the retention
    # file: bodies are kept for less time than headers, usage forever.
    retention = load_policy(PROJECT_ROOT / "configs" / "retention-policies.yaml")
    policies = ilm_policies(retention)
    for group, template in templates.items():
        settings = template["template"]["settings"]
        # Each per-day index ages from the date in its name.
        assert settings["index.lifecycle.parse_origination_date"] is True
        assert settings["index.lifecycle.name"] == f"{DEFAULT_PREFIX}-{group}"
        assert f"{DEFAULT_PREFIX}-{group}" in policies
    days = retention.index_fields
    assert days.bodies is not None and days.headers is not None and days.usage is None
    assert days.bodies < days.headers


def test_a_refused_document_is_a_reject_and_the_rest_ship(
    stand_in: StandInElasticsearch, tmp_path: Path
) -> None:
    root = DataRoot.at(tmp_path)
    records = [flow() for _ in range(3)]
    stand_in.refuse_ids = {records[1].id}
    spool(root, records)
    with ElasticsearchTrafficStore.in_root(root, stand_in.url) as es:
        assert es.catch_up(root.traffic_logs) == 2
        ((_, offset, error),) = es.rejects()
        assert es.catch_up(root.traffic_logs) == 0
    assert offset == len(records[0].model_dump_json()) + 1
    assert "document_parsing_exception" in error
    assert set(stand_in.documents()) == {records[0].id, records[2].id}


def test_a_server_that_is_not_elasticsearch_gets_nothing(
    stand_in: StandInElasticsearch, tmp_path: Path
) -> None:
    stand_in.product_header = False
    root = DataRoot.at(tmp_path)
    spool(root, [flow()])
    with ElasticsearchTrafficStore.in_root(root, stand_in.url) as es:
        assert es.catch_up(root.traffic_logs) == 0
        assert es.offsets() == {}
        assert es.rejects() == []


# -- choosing the store ----------------------------------------------------------------------


def test_stores_are_picked_by_short_name(tmp_path: Path, stand_in: StandInElasticsearch) -> None:
    root = DataRoot.at(tmp_path)
    sqlite = get_store("sqlite", root)
    assert isinstance(sqlite, SqliteTrafficStore)
    sqlite.close()
    es = get_store("elasticsearch", root, url=stand_in.url)
    assert isinstance(es, ElasticsearchTrafficStore)
    es.close()
    with pytest.raises(
        UnknownAdapter, match=r"traffic store 'solr'; allowed: elasticsearch, sqlite"
    ):
        get_store("solr", root)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"autovibe_traffic_store": "solr"}, r"unknown store 'solr': use one of sqlite"),
        ({"autovibe_traffic_store": "elasticsearch"}, r"autovibe_elasticsearch_url .*got ''"),
        (
            {"autovibe_traffic_store": "elasticsearch", "autovibe_elasticsearch_url": "es:9200"},
            r"got 'es:9200'",
        ),
    ],
)
def test_bad_store_options_are_refused(
    tmp_path: Path, options: dict[str, str], message: str
) -> None:
    indexer = Indexer()
    with (
        taddons.context(indexer) as ctx,
        pytest.raises(exceptions.OptionsError, match=message),
    ):
        ctx.configure(indexer, autovibe_data=str(tmp_path), **options)


def test_indexer_ships_to_the_store_it_is_told(
    tmp_path: Path, stand_in: StandInElasticsearch
) -> None:
    root = DataRoot.at(tmp_path)
    record = flow()
    spool(root, [record])
    indexer = Indexer()
    with taddons.context(indexer) as ctx:
        ctx.configure(indexer, autovibe_data=str(tmp_path))
        assert isinstance(indexer.store, SqliteTrafficStore)
        ctx.configure(
            indexer,
            autovibe_traffic_store="elasticsearch",
            autovibe_elasticsearch_url=stand_in.url,
        )
        assert isinstance(indexer.store, ElasticsearchTrafficStore)
        assert indexer.catch_up() == 1
        indexer.done()
    assert set(stand_in.documents()) == {record.id}


def test_mitmdump_ships_its_flows_to_elasticsearch(
    tmp_path: Path, stand_in: StandInElasticsearch
) -> None:
    """The real proxy, told to use Elasticsearch: a refused stranger's flow reaches the index."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "prices.yaml").write_text(PRICES_YAML)
    settings = Settings(
        data=tmp_path / "data", configs=configs, host="127.0.0.1", proxy_port=free_port()
    )
    argv = [
        *mitmdump_argv(settings),
        "--set",
        "autovibe_traffic_store=elasticsearch",
        "--set",
        f"autovibe_elasticsearch_url={stand_in.url}",
    ]
    log = tmp_path / "mitmdump.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(settings.host, settings.proxy_port, timeout=30, process=process)
            proxy = f"http://{settings.host}:{settings.proxy_port}"
            with httpx.Client(proxy=proxy, trust_env=False, timeout=10) as client:
                assert client.get("http://127.0.0.1:9/").status_code == 407
            deadline = time.monotonic() + 10
            while not stand_in.documents() and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            process.terminate()
            process.wait(timeout=15)
    output = log.read_text()
    assert "Traceback" not in output, output
    (source,) = stand_in.documents().values()
    assert source["status"] == 407
    assert (DataRoot.at(settings.data).traffic_logs / REGISTRY_FILE).exists()
