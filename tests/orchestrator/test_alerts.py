"""Budget alerts: each threshold once per scope and period, remembered across restarts, on the
SSE stream, POSTed to a webhook (retried, never blocking) and counted for Prometheus.

Real: the SQLite counter store the proxy reserves in, the control API (TestClient) and a
local HTTP server as the webhook receiver (on loopback, so the server allows 127.0.0.1:
AUTOVIBE_WEBHOOK_ALLOW).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from trial_runs import operator_api

from budget import iso, machine_scope, project_scope
from contracts.outbound import Allowlist
from contracts.settings import Settings, free_port
from orchestrator.alerts import BudgetWatch, Webhook
from orchestrator.platform import Platform
from orchestrator.scheduler import Scheduler
from orchestrator.state import BudgetAlert

ROOT = Path(__file__).resolve().parents[2]
DAY = 86_400
LOCAL = ["127.0.0.1"]
"""The receiver's host, on the server's webhook allowlist."""


@dataclass
class Receiver:
    """A webhook receiver: records every POST; answers 500 to the first `fail` of them, and
    holds each answer `delay_s`."""

    server: ThreadingHTTPServer
    fail: int = 0
    delay_s: float = 0.0
    posts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/budget"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            assert self.path == "/hooks/budget"
            assert self.headers["Content-Type"] == "application/json"
            doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(hook.delay_s)
            failing = hook.fail > 0
            hook.fail -= 1
            hook.posts.append(doc)
            self.send_response(500 if failing else 204)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    hook = Receiver(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield hook
    server.shutdown()
    server.server_close()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, Platform]]:
    settings = Settings(data=tmp_path / "data", configs=ROOT / "configs", webhook_allow=LOCAL)
    with operator_api(settings) as api:
        yield api


def submit(client: TestClient, demo_trial: dict[str, Any], **alerts: Any) -> str:
    body = copy.deepcopy(demo_trial)
    body["budget"]["alerts"] = alerts
    resp = client.post("/v1/trials", json=body)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def spend(platform: Platform, amount: str, *scopes: str) -> None:
    """Charge `amount` CAD to the scopes, as the proxy does: reserve, then settle."""
    counters = platform.counters()
    try:
        rid = f"call-{time.monotonic_ns()}"
        counters.reserve(rid, scopes or (project_scope("demo"),), Decimal(amount))
        assert counters.settle(rid, Decimal(amount), "response")
    finally:
        counters.close()


def alerts_of(platform: Platform, trial_id: str) -> list[dict[str, Any]]:
    return [e.data for e in platform.store.events_after(trial_id, 0) if e.kind == "budget_alert"]


def wait_for(predicate: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_thresholds_alert_once_each_and_survive_a_restart(
    api: tuple[TestClient, Platform], demo_trial: dict[str, Any]
) -> None:
    client, platform = api
    trial_id = submit(client, demo_trial)  # defaults: 0.5, 0.8, 1.0; budget 5 CAD biweekly
    watch = Scheduler(platform).alerts
    assert watch.check([trial_id], force=True) == []

    spend(platform, "2.49")
    assert watch.check([trial_id], force=True) == []
    spend(platform, "0.01")  # 2.50 of 5: 50 %
    assert len(watch.check([trial_id], force=True)) == 1
    assert watch.check([trial_id], force=True) == []
    spend(platform, "1.50")  # 80 %
    assert len(watch.check([trial_id], force=True)) == 1

    # A new orchestrator remembers what was raised.
    restarted = Scheduler(Platform.from_settings(platform.settings)).alerts
    assert restarted.check([trial_id], force=True) == []
    spend(platform, "1")  # 100 %
    assert len(restarted.check([trial_id], force=True)) == 1
    assert restarted.check([trial_id], force=True) == []
    assert watch.check([trial_id], force=True) == []

    raised = alerts_of(platform, trial_id)
    assert [(a["scope"], a["threshold"], a["used"], a["limit"]) for a in raised] == [
        ("project:demo", "0.5", "2.500000", "5.000000"),
        ("project:demo", "0.8", "4.000000", "5.000000"),
        ("project:demo", "1.0", "5.000000", "5.000000"),
    ]
    state = platform.counters().describe(project_scope("demo"))
    assert state is not None
    assert {a["currency"] for a in raised} == {"CAD"}
    assert {a["period_ends"] for a in raised} == {iso(state.resets_at)}

    # The same events on the SSE stream (it ends with the trial's final event).
    client.post(f"/v1/trials/{trial_id}/cancel")
    with client.stream("GET", f"/v1/trials/{trial_id}/events") as resp:
        body = "".join(resp.iter_text())
    sse = [
        json.loads(block.split("data: ", 1)[1])
        for block in body.split("\n\n")
        if "event: budget_alert\n" in block
    ]
    assert [(a["scope"], a["threshold"]) for a in sse] == [
        (a["scope"], a["threshold"]) for a in raised
    ]


def test_jump_past_two_thresholds_raises_both_and_machine_scopes_count(
    api: tuple[TestClient, Platform], demo_trial: dict[str, Any]
) -> None:
    client, platform = api
    trial_id = submit(client, demo_trial, thresholds=[0.5, 0.8])
    spend(platform, "0.9", project_scope("demo"), machine_scope("demo", "m2"))
    Scheduler(platform).alerts.check([trial_id], force=True)
    assert sorted((a["scope"], a["threshold"]) for a in alerts_of(platform, trial_id)) == [
        ("machine:demo:m2", "0.5"),
        ("machine:demo:m2", "0.8"),
    ]


def test_daily_spend_above_sums_the_machines_once_a_day(
    api: tuple[TestClient, Platform], demo_trial: dict[str, Any]
) -> None:
    client, platform = api
    trial_id = submit(client, demo_trial, daily_spend_above="0.5", thresholds=[1.0])
    watch = BudgetWatch(platform)
    spend(platform, "0.3", project_scope("demo"), machine_scope("demo", "m1"))
    assert watch.check([trial_id], force=True) == []
    spend(platform, "0.3", project_scope("demo"), machine_scope("demo", "m2"))
    assert len(watch.check([trial_id], force=True)) == 1
    spend(platform, "0.3", project_scope("demo"), machine_scope("demo", "m2"))
    assert watch.check([trial_id], force=True) == []
    [alert] = alerts_of(platform, trial_id)
    midnight = (int(time.time()) // DAY + 1) * DAY
    assert {k: alert[k] for k in ("scope", "threshold", "used", "limit", "period_ends")} == {
        "scope": "daily:demo",
        "threshold": "daily_spend_above",
        "used": "0.600000",
        "limit": "0.5",
        "period_ends": iso(midnight),
    }


def test_webhook_receives_the_alert_and_a_failure_is_retried(
    api: tuple[TestClient, Platform], demo_trial: dict[str, Any], receiver: Receiver
) -> None:
    client, platform = api
    receiver.fail = 1
    trial_id = submit(client, demo_trial, webhook_url=receiver.url)
    webhook = Webhook(platform.store, allow=Allowlist.parse(LOCAL), backoff_s=0.05)
    watch = BudgetWatch(platform, webhook=webhook)
    try:
        spend(platform, "2.5")
        [alert_id] = watch.check([trial_id], force=True)
        wait_for(lambda: len(receiver.posts) == 2)
        wait_for(lambda: _delivery(platform, alert_id) == ("delivered", 2))
    finally:
        webhook.close()
    first, second = receiver.posts
    assert first == second
    assert set(first) == {
        "event", "alert", "trial", "project", "scope", "threshold", "used", "limit",
        "currency", "period_ends", "ts",
    }  # fmt: skip
    assert {k: first[k] for k in ("event", "alert", "trial", "project", "scope")} == {
        "event": "budget_alert",
        "alert": alert_id,
        "trial": trial_id,
        "project": "demo",
        "scope": "project:demo",
    }
    assert (first["threshold"], first["used"], first["limit"], first["currency"]) == (
        "0.5",
        "2.500000",
        "5.000000",
        "CAD",
    )
    kinds = [
        (e.kind, e.data.get("attempt"))
        for e in platform.store.events_after(trial_id, 0)
        if e.kind.startswith("budget_alert_")
    ]
    assert kinds == [("budget_alert_webhook_failed", 1), ("budget_alert_delivered", 2)]


def test_a_down_or_slow_webhook_never_blocks_and_gives_up_recorded(
    api: tuple[TestClient, Platform], demo_trial: dict[str, Any], receiver: Receiver
) -> None:
    client, platform = api
    receiver.delay_s = 2.0  # longer than the webhook's timeout
    slow = submit(client, demo_trial, webhook_url=receiver.url)
    down_trial = copy.deepcopy(demo_trial)
    down_trial["name"] = "demo-down"
    down = submit(client, down_trial, webhook_url=f"http://127.0.0.1:{free_port()}/hook")
    webhook = Webhook(
        platform.store, allow=Allowlist.parse(LOCAL), timeout_s=0.3, attempts=2, backoff_s=0.05
    )
    watch = BudgetWatch(platform, webhook=webhook)
    try:
        spend(platform, "2.5")
        started = time.monotonic()
        raised = watch.check([slow, down], force=True)
        assert time.monotonic() - started < 1.0  # deliveries run on their own thread
        assert len(raised) == 2
        wait_for(lambda: all(_delivery(platform, i) == ("failed", 2) for i in raised))
    finally:
        webhook.close()
    for trial_id in (slow, down):
        failures = [
            e.data
            for e in platform.store.events_after(trial_id, 0)
            if e.kind == "budget_alert_webhook_failed"
        ]
        assert [(f["attempt"], f["retry_in_s"]) for f in failures] == [(1, 0.05), (2, None)]
        assert all(f["error"] for f in failures)


def test_pending_delivery_is_resumed_by_a_restarted_orchestrator(
    api: tuple[TestClient, Platform], demo_trial: dict[str, Any], receiver: Receiver
) -> None:
    client, platform = api
    trial_id = submit(client, demo_trial, webhook_url=receiver.url)
    spend(platform, "2.5")
    stopped = Webhook(platform.store, allow=Allowlist.parse(LOCAL))
    stopped.close()  # an orchestrator that stops before delivering
    [alert_id] = BudgetWatch(platform, webhook=stopped).check([trial_id], force=True)
    assert _delivery(platform, alert_id) == ("pending", 0)
    webhook = Webhook(platform.store, allow=Allowlist.parse(LOCAL))
    try:
        BudgetWatch(platform, webhook=webhook).check([trial_id], force=True)
        wait_for(lambda: _delivery(platform, alert_id) == ("delivered", 1))
    finally:
        webhook.close()
    assert [p["alert"] for p in receiver.posts] == [alert_id]


def test_metrics_show_used_ratio_and_alert_counter(
    api: tuple[TestClient, Platform], demo_trial: dict[str, Any]
) -> None:
    client, platform = api
    trial_id = submit(client, demo_trial)
    text = client.get("/metrics").text
    assert 'autovibe_budget_used_ratio{project="demo",scope="project:demo"} 0.0' in text
    assert (
        'autovibe_budget_alerts_total{project="demo",scope="project:demo",threshold="0.5"} 0.0'
        in text
    )
    spend(platform, "4", project_scope("demo"))
    Scheduler(platform).alerts.check([trial_id], force=True)
    text = client.get("/metrics").text
    assert 'autovibe_budget_used_ratio{project="demo",scope="project:demo"} 0.8' in text
    assert 'autovibe_budget_used_ratio{project="demo",scope="machine:demo:m1"} 0.0' in text
    for threshold, n in (("0.5", 1.0), ("0.8", 1.0), ("1.0", 0.0)):
        sample = (
            f'autovibe_budget_alerts_total{{project="demo",scope="project:demo",'
            f'threshold="{threshold}"}} {n}'
        )
        assert sample in text, threshold


def _delivery(platform: Platform, alert_id: int) -> tuple[str, int]:
    with platform.store.session() as s:
        row = s.scalars(select(BudgetAlert).where(BudgetAlert.id == alert_id)).one()
        return row.delivery, row.delivery_attempts
