"""The Superset bundle, imported into a real Superset over real autovibe stores.

A data root gets a state DB and a traffic index filled through their own APIs; the bundle
built by `autovibe dashboards superset` is imported with `superset import-dashboards`; every
chart's data is fetched through Superset's API and compared with what the stores hold; and
headless Chromium takes a screenshot of the dashboard. The Elasticsearch variant is imported
too; its chart data needs a cluster (`ELASTICSEARCH_URL`, `pytest -m live`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import superset_harness as harness
import yaml
from matplotlib import image as mpimg
from typer.testing import CliRunner

from contracts.dataroot import DataRoot
from contracts.records import FlowRecord, Usage
from orchestrator.dashboards_cli import app as dashboards_app
from orchestrator.state import Assignment, Store, Trial
from orchestrator.superset import SOURCE, build
from traffic.spool import Spool
from traffic.sqlite_store import SqliteTrafficStore

UNREACHABLE_ES = "http://127.0.0.1:9"
"""Nothing listens on the discard port: the Elasticsearch variant is imported, not queried."""
START = dt.datetime(2025, 1, 15, 9, 0, tzinfo=dt.UTC).timestamp()

# trial, agent, model pair, grade (None: not graded), metered cost in CAD
ASSIGNMENTS = [
    ("t1", "builtin", "tiny", "resolved", "0.0120"),
    ("t1", "builtin", "tiny", "unresolved", "0.0080"),
    ("t1", "builtin", "tiny:thinking", "resolved", "0.0300"),
    ("t1", "mini-swe-agent", "tiny", "partial", "0.0500"),
    ("t1", "mini-swe-agent", "tiny", "resolved", "0.0400"),
    ("t2", "mini-swe-agent", "tiny:thinking", "unresolved", "0.0700"),
    ("t2", "builtin", "tiny", "resolved", "0.0100"),
    ("t2", "mini-swe-agent", "tiny", None, "0"),
]


def fill_state(root: DataRoot) -> None:
    store = Store(f"sqlite:///{DataRoot.ensure(root.state_db.parent) / root.state_db.name}")
    with store.session() as s:
        for trial in ("t1", "t2"):
            s.add(
                Trial(id=trial, name=f"trial-{trial}", project="p1", status="finished", config={})
            )
        for i, (trial, agent, model, grade, cost) in enumerate(ASSIGNMENTS):
            s.add(
                Assignment(
                    id=f"{trial}-{i:03d}",
                    trial_id=trial,
                    index=i,
                    task_id=f"task-{i % 3}",
                    agent=agent,
                    model=model,
                    state="finished" if grade else "failed",
                    machine=f"m{i % 2}",
                    status=grade,
                    exit_cause="exit" if grade else "infra",
                    result={"cost": cost, "currency": "CAD"},
                )
            )
    store.engine.dispose()


def fill_traffic(root: DataRoot) -> list[FlowRecord]:
    flows = []
    for i in range(12):
        status = [200, 200, 200, 402, None][i % 5]
        tokens = 100 + 37 * i
        start = START + i * 40 * 60
        flows.append(
            FlowRecord(
                id=f"flow-{i:02d}",
                ts_start=start,
                ts_end=start + 2,
                duration_ms=2000,
                method="POST",
                url="http://model/v1/completions",
                host="model",
                path="/v1/completions",
                status=status,
                project="p1",
                trial="t1",
                assignment=f"t1-{i % 5:03d}",
                machine=f"m{i % 2}",
                provider="local",
                model=["tiny", "tiny:thinking"][i % 2],
                usage=Usage(prompt_tokens=tokens - 20, completion_tokens=20, total_tokens=tokens)
                if status == 200
                else None,
                cost_usd=Decimal("0.000123") * tokens if status == 200 else Decimal(0),
                error=None if status else "upstream closed the connection",
            )
        )
    with Spool(root) as spool:
        for flow in flows:
            spool.append(flow)
    with SqliteTrafficStore(root.traffic_index) as index:
        assert index.catch_up(root.traffic_logs) == len(flows)
        return index.flows()


@dataclass
class Site:
    url: str
    api: httpx.Client
    flows: list[FlowRecord]
    home: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    try:
        venv = harness.venv()
    except harness.SupersetUnavailable as exc:
        pytest.skip(f"Superset {harness.SUPERSET_VERSION} cannot be installed here: {exc}")
    tmp = tmp_path_factory.mktemp("superset")
    root = DataRoot.at(tmp / "data")
    fill_state(root)
    flows = fill_traffic(root)
    bundle = tmp / "bundle.zip"
    ran = CliRunner().invoke(
        dashboards_app,
        ["superset", "--out", str(bundle), "--data", str(root.root), "--es", UNREACHABLE_ES],
    )
    assert ran.exit_code == 0, ran.output
    superset = harness.Superset(venv, tmp / "home")
    superset.initialise()
    superset.cli("import-dashboards", "-p", str(bundle), "-u", harness.ADMIN_USER)
    with superset.serve() as url, harness.login(url) as api:
        yield Site(url, api, flows, superset.home)


def _charts(api: httpx.Client) -> dict[str, dict[str, Any]]:
    """Every chart by name, with what the data request needs."""
    q = "(columns:!(id,slice_name,viz_type,params,datasource_id),page_size:100)"
    answer = api.get("/api/v1/chart/", params={"q": q})
    answer.raise_for_status()
    charts = {}
    for chart in answer.json()["result"]:
        chart["params"] = yaml.safe_load(chart["params"])
        charts[chart["slice_name"]] = chart
    return charts


def _chart_data(api: httpx.Client, chart: dict[str, Any]) -> list[dict[str, Any]]:
    """Save the chart's query context as the frontend does, then GET its data."""
    context = harness.query_context(chart, chart["datasource_id"])
    saved = api.put(
        f"/api/v1/chart/{chart['id']}",
        json={"query_context": json.dumps(context), "query_context_generation": True},
    )
    assert saved.status_code == 200, saved.text
    answer = api.get(f"/api/v1/chart/{chart['id']}/data/")
    assert answer.status_code == 200, answer.text
    result = answer.json()["result"]
    assert len(result) == 1 and not result[0].get("error"), result
    return list(result[0]["data"])


def test_bundle_without_elasticsearch_points_at_the_data_root(tmp_path: Path) -> None:
    bundle = build(tmp_path / "data")
    uris = sorted(str(c["sqlalchemy_uri"]) for c in bundle.of_kind("databases").values())
    data = (tmp_path / "data").resolve()
    assert uris == [
        f"sqlite:///{data}/state/autovibe.sqlite",
        f"sqlite:///{data}/traffic-logs/index.sqlite",
    ]
    assert {c["slice_name"] for c in bundle.of_kind("charts").values()} == {
        "Spend per agent × model pair",
        "Cost per resolved task",
        "Success rate per agent",
        "Tokens over time",
        "Flows by status",
    }
    assert len(bundle.of_kind("datasets")) == 2 and len(bundle.of_kind("dashboards")) == 1
    source_files = {p.relative_to(SOURCE).as_posix() for p in SOURCE.rglob("*.yaml")}
    assert set(bundle.files) < source_files


def test_cli_refuses_a_url_that_is_not_elasticsearch(tmp_path: Path) -> None:
    ran = CliRunner().invoke(
        dashboards_app, ["superset", "--out", str(tmp_path / "b.zip"), "--es", "es:9200"]
    )
    assert ran.exit_code != 0
    said = " ".join(ran.output.replace("│", " ").split())
    assert "--es 'es:9200': expected http(s)://" in said
    assert not (tmp_path / "b.zip").exists()


@pytest.mark.superset
def test_chart_data_equals_the_stores(site: Site) -> None:
    charts = _charts(site.api)

    spend: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    count: Counter[tuple[str, str]] = Counter()
    resolved: Counter[str] = Counter()
    for _, agent, model, grade, cost in ASSIGNMENTS:
        spend[agent, model] += Decimal(cost)
        count[agent, model] += 1
        resolved[f"{agent} × {model}"] += grade == "resolved"

    rows = _chart_data(site.api, charts["Spend per agent × model pair"])
    assert {(r["agent"], r["model"]): r["assignments"] for r in rows} == dict(count)
    for r in rows:
        assert r["spend"] == pytest.approx(float(spend[r["agent"], r["model"]]), abs=1e-9)

    rows = _chart_data(site.api, charts["Cost per resolved task"])
    assert {r["pair"] for r in rows} == {f"{a} × {m}" for a, m in spend}
    for r in rows:
        agent, model = r["pair"].split(" × ")
        expected = spend[agent, model] / resolved[r["pair"]] if resolved[r["pair"]] else None
        assert r["cost_per_resolved"] == (
            None if expected is None else pytest.approx(float(expected), abs=1e-9)
        )

    scored: Counter[str] = Counter()
    won: Counter[str] = Counter()
    for _, agent, _, grade, _ in ASSIGNMENTS:
        scored[agent] += grade is not None
        won[agent] += grade == "resolved"
    rows = _chart_data(site.api, charts["Success rate per agent"])
    assert {r["agent"]: pytest.approx(r["success_rate"]) for r in rows} == {
        a: won[a] / scored[a] for a in scored
    }

    tokens: dict[tuple[int, str], int | None] = {}
    for f in site.flows:
        hour = int(f.ts_start // 3600 * 3600 * 1000)
        key = (hour, str(f.model))
        used = f.usage.total_tokens if f.usage else None
        tokens[key] = used if tokens.get(key) is None else (tokens[key] or 0) + (used or 0)
    rows = _chart_data(site.api, charts["Tokens over time"])
    assert {(r["ts"], r["model"]): r["tokens"] for r in rows} == tokens
    assert sum(r["tokens"] or 0 for r in rows) == sum(
        f.usage.total_tokens for f in site.flows if f.usage
    )

    rows = _chart_data(site.api, charts["Flows by status"])
    assert {r["status"]: r["count"] for r in rows} == Counter(f.status for f in site.flows)


@pytest.mark.superset
def test_dashboard_screenshot(site: Site, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("the Debian package `chromium` is missing (make system-deps installs it)")
    # The browser builds each chart's query itself (POST /api/v1/chart/data), so this does
    # not depend on the query contexts the API test saves.
    shot = tmp_path / "dashboard.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1600,1000",
            "--virtual-time-budget=60000",
            f"--screenshot={shot}",
            f"{site.url}/superset/dashboard/autovibe/?standalone=1",
        ],
        check=True,
        capture_output=True,
        timeout=240,
    )
    shutil.copyfile(shot, site.home / "dashboard.png")
    assert shot.stat().st_size > 30_000
    pixels = (mpimg.imread(shot)[..., :3] * 255).round().astype(int)
    assert pixels.shape[:2] == (1000, 1600)
    colors = {tuple(p) for p in pixels.reshape(-1, 3)[::7]}
    assert len(colors) > 200, "the screenshot is nearly blank"
    # Series colours of Superset's default scheme (supersetColors) fill the bars and the pie;
    # no page chrome (login form, error page, spinner) draws in them.
    palette = [(0x1F, 0xA8, 0xC9), (0x45, 0x4E, 0x7C), (0x5A, 0xC1, 0x89), (0xFF, 0x7F, 0x44)]
    palette += [(0xE0, 0x43, 0x55), (0xFC, 0xC7, 0x00), (0xA8, 0x68, 0xB7), (0x3C, 0xCC, 0xCB)]
    drawn = [c for c in palette if (np.abs(pixels - np.array(c)).sum(axis=-1) < 24).sum() > 2000]
    assert len(drawn) >= 3, f"charts not drawn ({drawn}); see {site.home / 'dashboard.png'}"


@pytest.mark.superset
def test_elasticsearch_variant_is_imported(site: Site) -> None:
    answer = site.api.get("/api/v1/dashboard/autovibe-elasticsearch")
    assert answer.status_code == 200, answer.text
    dashboard = answer.json()["result"]
    assert dashboard["id"] and dashboard["dashboard_title"].endswith("(Elasticsearch traffic)")
    charts = site.api.get(f"/api/v1/dashboard/{dashboard['id']}/charts").json()["result"]
    names = sorted(c["slice_name"] for c in charts)
    assert names == sorted(
        [
            "Spend per agent × model pair",
            "Cost per resolved task",
            "Success rate per agent",
            "Tokens over time (Elasticsearch)",
            "Flows by status (Elasticsearch)",
        ]
    )
    databases = site.api.get("/api/v1/database/").json()["result"]
    by_name = {d["database_name"]: d for d in databases}
    es_id = by_name["autovibe traffic (Elasticsearch)"]["id"]
    es = site.api.get(f"/api/v1/database/{es_id}/connection").json()["result"]
    assert es["sqlalchemy_uri"] == "elasticsearch+http://127.0.0.1:9/"
    assert es["backend"] == "elasticsearch"
    assert es["uuid"] == "c4c3d669-e3ba-4ddf-a8f8-6f9af9180f7c"


@pytest.mark.live
def test_elasticsearch_chart_data_live(tmp_path: Path) -> None:
    """Against the cluster at ELASTICSEARCH_URL, holding traffic shipped by the proxy."""
    es_url = os.environ.get("ELASTICSEARCH_URL")
    if not es_url:
        pytest.skip("set ELASTICSEARCH_URL to a cluster holding autovibe-traffic-usage-* indices")
    venv = harness.venv()
    bundle = build(tmp_path / "data", es_url=es_url).write(tmp_path / "bundle.zip")
    superset = harness.Superset(venv, tmp_path / "home")
    superset.initialise()
    superset.cli("import-dashboards", "-p", str(bundle), "-u", harness.ADMIN_USER)
    with superset.serve() as url, harness.login(url) as api:
        charts = _charts(api)
        for name in ("Tokens over time (Elasticsearch)", "Flows by status (Elasticsearch)"):
            rows = _chart_data(api, charts[name])
            assert all("count" in r or "tokens" in r for r in rows)
