"""Prometheus metrics from real stores, JSON logs, and the Grafana dashboard over them."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from contracts.config import TrialConfig
from contracts.records import FlowRecord, Usage
from contracts.settings import Settings
from orchestrator.logging import JsonFormatter, configure
from orchestrator.metrics import EXPORTED, Metrics
from orchestrator.platform import Platform
from orchestrator.state import Assignment, Trial
from proxy.addons import metrics as proxy_metrics
from traffic.spool import Spool

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "configs" / "grafana" / "autovibe.json"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _flow(i: int) -> FlowRecord:
    now = time.time()
    return FlowRecord(
        id=f"f{i}",
        ts_start=now,
        ts_end=now + 0.1,
        duration_ms=100,
        method="POST",
        url="http://127.0.0.1:8500/v1/chat/completions",
        host="127.0.0.1",
        path="/v1/chat/completions",
        status=200,
        project="demo",
        trial="t1",
        assignment="t1-000",
        machine="m1",
        provider="local",
        model="tiny",
        usage=Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15),
        cost_usd="0.25",
    )


def test_metrics_from_real_stores(tmp_path: Path, demo_trial: dict[str, Any]) -> None:
    platform = Platform.from_settings(Settings(data=tmp_path / "data", configs=REPO / "configs"))
    config = TrialConfig.model_validate(demo_trial)
    with platform.store.session() as s:
        s.add(Trial(id="t1", name="demo", project="demo", config=config.model_dump(mode="json")))
        for i, state in enumerate(("queued", "queued", "running", "finished")):
            s.add(
                Assignment(
                    id=f"t1-{i:03d}",
                    trial_id="t1",
                    index=i,
                    task_id="mathkit-basics",
                    agent="builtin",
                    model="tiny",
                    state=state,
                    machine="m1" if state == "running" else None,
                )
            )
    platform.open_ledger(config, "t1")
    spool = Spool(platform.root)
    path = spool.append(_flow(1))
    spool.append(_flow(2))
    metrics = Metrics()

    first = _samples(metrics.render(platform).decode())
    assert first[("autovibe_index_lag_bytes", ())] == path.stat().st_size
    assert first[("autovibe_index_lag_files", ())] == 1
    assert first[("autovibe_queue_depth", ())] == 2
    assert first[("autovibe_assignments", (("state", "running"),))] == 1
    assert first[("autovibe_workers_busy", (("machine", "m1"),))] == 1
    usage = (("model", "tiny"), ("provider", "local"))
    assert first[("autovibe_proxy_requests_total", usage)] == 2
    assert first[("autovibe_proxy_spend_usd_total", usage)] == 0.5
    assert first[("autovibe_proxy_tokens_total", (("kind", "prompt"), *usage))] == 20
    assert first[("autovibe_spend_usd", ())] == 0.5
    assert first[("autovibe_budget_store_up", ())] == 1
    project = (("currency", "CAD"), ("scope", "project:demo"))
    assert first[("autovibe_budget_limit", project)] == 5.0
    assert first[("autovibe_budget_remaining", project)] == 5.0
    machine = (("currency", "CAD"), ("scope", "machine:demo:m1"))
    assert first[("autovibe_budget_remaining", machine)] == 1.0

    # The scrape caught the index up: the next one sees no lag.
    second = _samples(metrics.render(platform).decode())
    assert second[("autovibe_index_lag_bytes", ())] == 0
    names = {name for name, _ in first} | {f"{n}_total" for n, _ in first}
    assert set(EXPORTED) <= names, set(EXPORTED) - names
    metrics.trials.inc()
    assert "autovibe_trials_submitted_total 1.0" in metrics.render(platform).decode()


def test_json_logs_one_object_per_line() -> None:
    stream = io.StringIO()
    handler = configure("debug", stream)
    try:
        log = logging.getLogger("autovibe.test")
        log.info("trial %s submitted", "t1", extra={"trial": "t1", "cost": 1.5})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        logging.getLogger("uvicorn.access").info("GET /healthz 200")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [x["msg"] for x in lines] == ["trial t1 submitted", "failed", "GET /healthz 200"]
    first = lines[0]
    assert (first["level"], first["logger"], first["trial"], first["cost"]) == (
        "info",
        "autovibe.test",
        "t1",
        1.5,
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["ts"])
    assert "ValueError: boom" in lines[1]["exc"]
    record = logging.LogRecord("x", logging.INFO, "", 0, "%s", (object(),), None)
    assert json.loads(JsonFormatter().format(record))["msg"].startswith("<object")


def test_dashboard_queries_only_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    for field in ("uid", "title", "schemaVersion", "panels", "time", "templating", "annotations"):
        assert field in dash, field
    # `${DS_PROMETHEUS}` resolves when imported (__inputs) and when provisioned (this variable).
    [variable] = [v for v in dash["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    # The API's series and the proxy's (scraped from each process by Prometheus).
    exported = set(EXPORTED) | set(proxy_metrics.EXPORTED)
    used: set[str] = set()
    for panel in dash["panels"]:
        assert panel["type"] in {"timeseries", "stat", "gauge", "table"}
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        for target in panel["targets"]:
            names = set(re.findall(r"\bautovibe_[a-z_]+\b", target["expr"]))
            assert names, f"panel {panel['title']!r} queries no autovibe metric"
            assert names <= exported, names - exported
            used |= names
    assert used == exported, exported - used
