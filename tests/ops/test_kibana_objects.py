"""configs/kibana/autovibe.ndjson against the saved-objects format of Kibana 8.15 and against
our Elasticsearch index template; with `KIBANA_URL` set, `pytest -m live` imports it.

Format facts checked (Kibana's saved-objects docs and the dashboard type's schema): one JSON
object a line with `type`, `id`, `attributes`, `references`, `coreMigrationVersion` and
`typeMigrationVersion` no newer than 8.15 knows; dashboards carry only the attributes their
schema admits, their panels name a `panelRefName` whose `<panelIndex>:<panelRefName>`
reference exists; Lens layers reference their data view as
`indexpattern-datasource-layer-<layerId>`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.settings import PROJECT_ROOT

NDJSON = PROJECT_ROOT / "configs/kibana/autovibe.ndjson"
TEMPLATE = PROJECT_ROOT / "configs/elasticsearch/autovibe-traffic-usage.index-template.json"

MIGRATION_VERSIONS = {"index-pattern": "8.0.0", "lens": "8.9.0", "dashboard": "10.2.0"}
"""typeMigrationVersion per type: the newest each type has in Kibana 8.15 (dashboard: model
version 2); a newer one is refused at import."""
DASHBOARD_ATTRIBUTES = {
    "title", "description", "kibanaSavedObjectMeta", "timeRestore", "timeFrom", "timeTo",
    "refreshInterval", "controlGroupInput", "panelsJSON", "optionsJSON", "hits", "version",
}  # fmt: skip
"""Kibana's dashboard attribute schema (v1/v2) forbids unknown keys."""
NUMERIC = {"long", "integer", "short", "byte", "double", "float", "half_float", "scaled_float"}
ACCEPTS = {
    "date_histogram": {"date"},
    "sum": NUMERIC,
    "average": NUMERIC,
    "median": NUMERIC,
    "percentile": NUMERIC,
    "max": NUMERIC,
    "min": NUMERIC,
    "terms": {"keyword", "boolean", *NUMERIC},
    "unique_count": {"keyword", "boolean", "date", *NUMERIC},
}
"""Field types each Lens operation may read (text fields cannot be aggregated)."""


def objects() -> list[dict[str, Any]]:
    lines = NDJSON.read_text().splitlines()
    assert lines and all(line.strip() for line in lines), "no blank lines in NDJSON"
    return [json.loads(line) for line in lines]


def mapped_fields() -> dict[str, str]:
    """Every field of the template's mappings (dotted paths, sub-fields included) → type."""
    out: dict[str, str] = {}

    def walk(props: dict[str, Any], prefix: str) -> None:
        for name, spec in props.items():
            path = f"{prefix}{name}"
            if "properties" in spec:
                walk(spec["properties"], f"{path}.")
            else:
                out[path] = spec["type"]
            for sub, subspec in spec.get("fields", {}).items():
                out[f"{path}.{sub}"] = subspec["type"]

    walk(json.loads(TEMPLATE.read_text())["template"]["mappings"]["properties"], "")
    return out


def lens_columns(obj: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    layers = obj["attributes"]["state"]["datasourceStates"]["formBased"]["layers"]
    return {layer: spec["columns"] for layer, spec in layers.items()}


def test_every_line_is_a_saved_object_of_kibana_8_15() -> None:
    objs = objects()
    assert len({(o["type"], o["id"]) for o in objs}) == len(objs), "ids are unique per type"
    for o in objs:
        assert {"type", "id", "attributes", "references"} <= o.keys()
        assert o["coreMigrationVersion"] == "8.8.0"
        assert o["typeMigrationVersion"] == MIGRATION_VERSIONS[o["type"]], o["id"]
        assert o["attributes"]["title"]
        for ref in o["references"]:
            assert set(ref) == {"type", "id", "name"}
    kinds = sorted(o["type"] for o in objs)
    assert kinds.count("index-pattern") == 1 and kinds.count("dashboard") == 2
    assert kinds.count("lens") >= 6


def test_every_reference_resolves_within_the_file() -> None:
    objs = objects()
    present = {(o["type"], o["id"]) for o in objs}
    for o in objs:
        for ref in o["references"]:
            assert (ref["type"], ref["id"]) in present, f"{o['id']}: dangling {ref}"
    for lens in (o for o in objs if o["type"] == "lens"):
        names = {r["name"] for r in lens["references"]}
        for layer in lens_columns(lens):
            assert f"indexpattern-datasource-layer-{layer}" in names, lens["id"]
    for board in (o for o in objs if o["type"] == "dashboard"):
        by_name = {r["name"]: r for r in board["references"]}
        panels = json.loads(board["attributes"]["panelsJSON"])
        assert panels
        for p in panels:
            ref = by_name[f"{p['panelIndex']}:{p['panelRefName']}"]
            assert ref["type"] == p["type"] == "lens"
            assert p["gridData"]["i"] == p["panelIndex"]
            assert p["gridData"]["x"] >= 0 and p["gridData"]["x"] + p["gridData"]["w"] <= 48
        assert len(by_name) == len(panels), "no reference without a panel"


def test_dashboards_use_only_schema_attributes() -> None:
    for board in (o for o in objects() if o["type"] == "dashboard"):
        attrs = board["attributes"]
        assert set(attrs) <= DASHBOARD_ATTRIBUTES, set(attrs) - DASHBOARD_ATTRIBUTES
        for key in ("panelsJSON", "optionsJSON"):
            assert isinstance(json.loads(attrs[key]), list if key == "panelsJSON" else dict)
        json.loads(attrs["kibanaSavedObjectMeta"]["searchSourceJSON"])
        assert isinstance(attrs["refreshInterval"]["value"], int)


def test_the_data_view_and_every_lens_field_exist_in_the_index_template() -> None:
    fields = mapped_fields()
    template = json.loads(TEMPLATE.read_text())
    objs = objects()
    (view,) = (o for o in objs if o["type"] == "index-pattern")
    assert view["attributes"]["title"] in template["index_patterns"]
    assert fields[view["attributes"]["timeFieldName"]] == "date"
    for name in json.loads(view["attributes"]["fieldFormatMap"]):
        assert name in fields
    used = set()
    for lens in (o for o in objs if o["type"] == "lens"):
        for layer, columns in lens_columns(lens).items():
            order = lens["attributes"]["state"]["datasourceStates"]["formBased"]["layers"][layer]
            # Every column once, buckets first (the order of the aggregations).
            assert sorted(order["columnOrder"]) == sorted(columns)
            bucketed = [columns[c]["isBucketed"] for c in order["columnOrder"]]
            assert bucketed == sorted(bucketed, reverse=True), lens["id"]
            for cid, col in columns.items():
                op, field = col["operationType"], col["sourceField"]
                if op == "count":
                    assert field == "___records___"
                    continue
                where = f"{lens['id']}.{cid}: {op}({field})"
                assert field in fields, f"{where}: not in the mapping"
                assert fields[field] in ACCEPTS[op], f"{where}: cannot read a {fields[field]}"
                expected = "date" if fields[field] == "date" else (
                    "number" if fields[field] in NUMERIC else "string"
                )  # fmt: skip
                assert col["dataType"] == expected, where
                if op == "terms":
                    assert col["params"]["orderBy"]["columnId"] in columns, where
                used.add(field)
            _accessors_exist(lens, set(columns))
    assert {"status", "duration_ms", "cost_usd", "project", "model", "machine"} <= used
    assert {"usage.prompt_tokens", "usage.completion_tokens"} <= used


def _accessors_exist(lens: dict[str, Any], columns: set[str]) -> None:
    vis = lens["attributes"]["state"]["visualization"]
    kind = lens["attributes"]["visualizationType"]
    if kind == "lnsXY":
        for layer in vis["layers"]:
            named = {layer["xAccessor"], *layer["accessors"], layer.get("splitAccessor")} - {None}
            assert named <= columns, lens["id"]
    elif kind == "lnsMetric":
        assert vis["metricAccessor"] in columns
    elif kind == "lnsDatatable":
        assert {c["columnId"] for c in vis["columns"]} == columns
    else:
        pytest.fail(f"{lens['id']}: unchecked visualization type {kind}")


# -- the import request --------------------------------------------------------------------------


def import_request(
    kibana_url: str, path: Path = NDJSON, *, overwrite: bool = True
) -> httpx.Request:
    """`POST /api/saved_objects/_import` as the docs describe it: multipart/form-data with the
    NDJSON as the `file` part, the `kbn-xsrf` header, `overwrite` as a query parameter."""
    return httpx.Request(
        "POST",
        f"{kibana_url.rstrip('/')}/api/saved_objects/_import",
        params={"overwrite": "true" if overwrite else "false"},
        headers={"kbn-xsrf": "true"},
        files={"file": (path.name, path.read_bytes(), "application/ndjson")},
    )


def test_the_import_request_is_the_documented_one() -> None:
    request = import_request("http://kibana:5601/")
    assert request.method == "POST"
    assert request.url.path == "/api/saved_objects/_import"
    assert request.url.params["overwrite"] == "true"
    assert request.headers["kbn-xsrf"] == "true"
    content_type = request.headers["content-type"]
    assert content_type.startswith("multipart/form-data; boundary=")
    boundary = content_type.split("boundary=")[1].encode()
    body = request.read()
    parts = [p for p in body.split(b"--" + boundary) if p.strip(b"-\r\n")]
    assert len(parts) == 1
    head, _, content = parts[0].partition(b"\r\n\r\n")
    assert b'Content-Disposition: form-data; name="file"; filename="autovibe.ndjson"' in head
    assert content.removesuffix(b"\r\n") == NDJSON.read_bytes()


@pytest.mark.live
def test_imports_into_a_real_kibana() -> None:
    url = os.environ.get("KIBANA_URL")
    if not url:
        pytest.skip("set KIBANA_URL (with user:password if needed) to import into a real Kibana")
    parsed = httpx.URL(url)
    auth = (parsed.username, parsed.password) if parsed.username else None
    base = str(parsed.copy_with(username=None, password=None))
    with httpx.Client(auth=auth, timeout=60) as client:
        resp = client.send(import_request(base))
        assert resp.status_code == 200, resp.text
        result = resp.json()
        assert result["success"] is True, result.get("errors")
        assert result["successCount"] == len(objects())
        board = client.get(
            f"{base.rstrip('/')}/api/saved_objects/dashboard/autovibe-spend-dashboard"
        )
        assert (
            board.status_code == 200 and board.json()["attributes"]["title"] == "autovibe · spend"
        )
