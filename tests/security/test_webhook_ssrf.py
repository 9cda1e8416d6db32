"""A budget webhook cannot reach the server's own or private network (issue 17, finding 7).

Real: the control API (TestClient), the SQLite counter store, the alert watch with its webhook
thread, and HTTP servers on loopback standing for the services a hostile trial would probe.
A trial naming a loopback, link-local, private, unspecified or multicast host is refused at
submission; one that got past (the server's allowlist changed, a name that resolved elsewhere)
is refused again at send time and nothing reaches the service; what a viewer reads of a failed
call never says whether a port is open.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import socket
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "orchestrator"))
from trial_runs import operator_api

from budget import project_scope
from contracts.outbound import Allowlist, is_own_address, refusal
from contracts.settings import PROJECT_ROOT, Settings, free_port
from orchestrator.alerts import WEBHOOK_FAILED, BudgetWatch, Webhook
from orchestrator.platform import Platform
from orchestrator.state import BudgetAlert


class Service:
    """An HTTP service on loopback: records every request's path and Host header, answers
    `status` (or sleeps `delay_s` first)."""

    def __init__(self, status: int = 204, delay_s: float = 0.0) -> None:
        self.status, self.delay_s = status, delay_s
        self.seen: list[tuple[str, str]] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                service.seen.append((self.path, self.headers.get("Host", "")))
                time.sleep(service.delay_s)
                self.send_response(service.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def service() -> Iterator[Service]:
    svc = Service()
    yield svc
    svc.close()


@contextlib.contextmanager
def control_api(data: Path, allow: list[str] | None = None) -> Iterator[TestClient]:
    """The control API on `data`; `allow`: its webhook allowlist (none, as shipped)."""
    settings = Settings(data=data, configs=PROJECT_ROOT / "configs", webhook_allow=allow or [])
    with operator_api(settings) as (client, _):
        yield client


def platform_of(client: TestClient) -> Platform:
    platform: Platform = client.app.state.platform  # type: ignore[attr-defined]
    return platform


def submit(client: TestClient, trial: dict[str, Any], url: str, name: str = "demo") -> str:
    resp = client.post("/v1/trials", json=body_with(trial, url, name))
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def body_with(trial: dict[str, Any], url: str, name: str = "demo") -> dict[str, Any]:
    body = copy.deepcopy(trial)
    body["name"] = name
    body["budget"]["alerts"] = {"webhook_url": url}
    return body


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:{port}/hook", "loopback"),
        ("http://localhost:{port}/hook", "loopback"),  # a name, resolved at submission
        ("http://[::1]:{port}/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]:{port}/hook", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),  # cloud metadata
        ("http://10.0.0.7:8500/v1/models", "private"),
        ("http://192.168.1.1/", "private"),
        ("http://0.0.0.0:{port}/hook", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
    ],
)
def test_a_forbidden_webhook_host_is_422_at_submission(
    tmp_path: Path, demo_trial: dict[str, Any], service: Service, url: str, why: str
) -> None:
    with control_api(tmp_path / "data") as client:
        body = body_with(demo_trial, url.format(port=service.port))
        resp = client.post("/v1/trials", json=body)
        assert resp.status_code == 422, resp.text
        (error,) = resp.json()["detail"]
        assert error["loc"] == ["body", "budget", "alerts", "webhook_url"]
        assert f"a {why} address" in error["msg"] and "AUTOVIBE_WEBHOOK_ALLOW" in error["msg"]
        assert client.get("/v1/trials").json() == []


def test_this_hosts_own_address_is_refused_whatever_its_range() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.123", 9))  # no packet is sent: only the route is chosen
        own = ipaddress.ip_address(probe.getsockname()[0])
    assert refusal(own) is not None
    assert is_own_address(own) and not is_own_address(ipaddress.ip_address("93.184.215.14"))
    assert refusal(ipaddress.ip_address("93.184.215.14")) is None  # someone else's, public


def spend_half(platform: Platform) -> None:
    counters = platform.counters()
    try:
        counters.reserve("call-1", (project_scope("demo"),), Decimal("2.5"))
        assert counters.settle("call-1", Decimal("2.5"), "response")
    finally:
        counters.close()


def failures(platform: Platform, trial_id: str) -> list[dict[str, Any]]:
    """The webhook failures as the trial's event stream shows them to any viewer."""
    return [
        e.data
        for e in platform.store.events_after(trial_id, 0)
        if e.kind == "budget_alert_webhook_failed"
    ]


def deliver(platform: Platform, trial_ids: list[str], webhook: Webhook) -> None:
    """Raise the trials' 50 % alert and wait until the webhook thread is done with each."""
    try:
        spend_half(platform)
        raised = BudgetWatch(platform, webhook=webhook).check(trial_ids, force=True)
        assert len(raised) == len(trial_ids)
        deadline = time.monotonic() + 15
        while True:
            with platform.store.session() as s:
                states = s.scalars(select(BudgetAlert.delivery)).all()
            if all(state in ("delivered", "failed") for state in states):
                return
            assert time.monotonic() < deadline, f"deliveries still {states}"
            time.sleep(0.05)
    finally:
        webhook.close()


def test_a_webhook_that_got_past_submission_is_refused_at_send_time(
    tmp_path: Path, demo_trial: dict[str, Any], service: Service
) -> None:
    """Accepted while the server allowed loopback; by the time an alert fires it no longer
    does (as when a name resolves elsewhere by then): nothing is sent, the refusal is
    recorded, and not retried."""
    with control_api(tmp_path / "data", allow=["127.0.0.1"]) as client:
        trial_id = submit(client, demo_trial, f"http://127.0.0.1:{service.port}/a")
        platform = platform_of(client)
        deliver(platform, [trial_id], Webhook(platform.store, backoff_s=0.01))
    assert service.seen == []
    (failure,) = failures(platform, trial_id)
    assert failure["error"] == f"{WEBHOOK_FAILED}: address not allowed"
    assert failure["retry_in_s"] is None


def test_failures_never_tell_a_viewer_whether_a_port_is_open(
    tmp_path: Path, demo_trial: dict[str, Any]
) -> None:
    """Closed port, open port answering 500, open port that never answers in time: a viewer
    reads 'webhook call failed', with the HTTP status only when a response came."""
    erroring, slow = Service(status=500), Service(delay_s=2.0)
    ports = {"closed": free_port(), "erroring": erroring.port, "slow": slow.port}
    allow = ["127.0.0.1"]
    try:
        with control_api(tmp_path / "data", allow=allow) as client:
            ids = {
                name: submit(client, demo_trial, f"http://127.0.0.1:{port}/hook", name)
                for name, port in ports.items()
            }
            platform = platform_of(client)
            webhook = Webhook(
                platform.store, allow=Allowlist.parse(allow), timeout_s=0.5, attempts=1
            )
            deliver(platform, list(ids.values()), webhook)
    finally:
        erroring.close()
        slow.close()
    errors = {name: [f["error"] for f in failures(platform, t)] for name, t in ids.items()}
    assert errors == {
        "closed": [WEBHOOK_FAILED],
        "erroring": [f"{WEBHOOK_FAILED}: HTTP 500"],
        "slow": [WEBHOOK_FAILED],
    }


def test_an_allowed_host_is_called_at_its_checked_address_with_its_own_name(
    tmp_path: Path, demo_trial: dict[str, Any], service: Service
) -> None:
    """`localhost` on the allowlist: the call goes to the address checked before connecting,
    and the service still sees the name the trial gave (virtual hosts, TLS names work)."""
    allow = ["localhost"]
    with control_api(tmp_path / "data", allow=allow) as client:
        url = f"http://localhost:{service.port}/hooks/budget"
        trial_id = submit(client, demo_trial, url)
        platform = platform_of(client)
        deliver(platform, [trial_id], Webhook(platform.store, allow=Allowlist.parse(allow)))
    assert service.seen == [("/hooks/budget", f"localhost:{service.port}")]
    assert failures(platform, trial_id) == []
