"""The traffic spool keeps no purchase details (issue 24): where the money goes, receipts.

The broker's attempt log encrypts `pay_to`, receipts and evidence; the proxy's spool, kept 30
days and indexed for search, must not hold them in plain beside it. Real: the control API under
uvicorn with the sandbox card method, the real mitmdump with our addons, a worker's client
buying by name through it (`http://broker.autovibe/…`), looking at its payment, and asking for
a project not its own (refused by the proxy, with the body it sent). Every file under the
traffic logs, the SQLite index included, and the proxy's log are then read for the values.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.credentials import MachineIdentity, mint
from contracts.dataroot import DataRoot
from contracts.egress import payments_url
from contracts.records import FlowRecord
from contracts.settings import PROJECT_ROOT, Settings, free_port
from tests.budget.budget_harness import Proxy
from tests.ledger.broker_harness import broker_behind_proxy
from traffic.sqlite_store import SqliteTrafficStore

CHECKOUT = "https://shop.example.com/checkout/ord-7Q2XK9-private?cart=c4f1e2"
SECRET_PART = "ord-7Q2XK9-private"
JUSTIFICATION = "the weather archive the task needs, 1990 to 2020"


@pytest.fixture
def broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Proxy]:
    """The control API (sandbox card method, configs/payments.yaml) and a proxy leading to it."""
    configs = tmp_path / "configs"
    shutil.copytree(PROJECT_ROOT / "configs", configs)
    data = tmp_path / "data"
    settings = Settings(data=data, configs=configs, host="127.0.0.1", api_port=free_port())
    for name, value in settings.as_env().items():
        monkeypatch.setenv(name, value)
    with broker_behind_proxy(settings, {"m1": Decimal(25)}, autovibe_indexer="false") as proxy:
        yield proxy


def _broker_records(root: DataRoot) -> list[FlowRecord]:
    lines = []
    for spool in sorted(root.traffic_logs.rglob("flows.jsonl")):
        lines += spool.read_text().splitlines()
    records = [FlowRecord.model_validate_json(line) for line in lines]
    return [r for r in records if "/payments" in r.path]


@pytest.mark.slow  # an API, a mitmdump and three flows: ~7 s on 2 loaded cores
def test_the_spool_keeps_no_purchase_details(broker: Proxy) -> None:
    proxy, root = broker, broker.root
    identity = MachineIdentity(
        project="demo", trial="t1", assignment="a-m1", machine="m1", expires=time.time() + 3600
    )
    credential = mint(proxy.key, identity)
    auth = {"Authorization": f"Bearer {credential}"}
    purchase: dict[str, Any] = {
        "item": "Weather archive",
        "amount": "10",
        "currency": "USD",
        "justification": JUSTIFICATION,
        "free_alternatives_considered": ["the free tier stops at 1995"],
        "pay_to": CHECKOUT,
    }
    with httpx.Client(proxy=proxy.url(identity), trust_env=False, timeout=60) as worker:
        paid = worker.post(payments_url("demo"), json=purchase, headers=auth)
        assert paid.status_code == 201, paid.text
        receipt = paid.json()["receipt"]
        assert receipt.startswith("sandbox-")  # what the worker is answered, not what is kept
        look = worker.get(f"{payments_url('demo')}/{paid.json()['id']}", headers=auth)
        assert look.status_code == 200, look.text
        other = worker.post(payments_url("other"), json=purchase, headers=auth)
        assert (other.status_code, other.json()["error"]) == (403, "broker_refused")

    deadline = time.monotonic() + 10
    while len(records := _broker_records(root)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [(r.method, r.status) for r in records] == [("POST", 201), ("GET", 200), ("POST", 403)]
    store = SqliteTrafficStore(root.traffic_index)  # the proxy's own indexer is off: no race
    try:
        assert store.catch_up(root.traffic_logs) >= 3
    finally:
        store.close()
    kept = [p for p in root.traffic_logs.rglob("*") if p.is_file()] + [proxy.log]
    for path in kept:
        data = path.read_bytes()
        for value in (SECRET_PART, receipt, JUSTIFICATION):
            assert value.encode() not in data, f"{value!r} is in {path}"
    # What the spool keeps of a broker flow's bodies: their sizes.
    for record in records:
        body = record.request_body
        if record.method == "POST":
            assert body is not None and body.size == len(paid.request.content)
            assert (body.text, body.sha256, body.truncated) == ("", "", True)
        assert record.response_body is not None and record.response_body.size > 0
    assert records[0].response_body is not None and records[0].response_body.text == ""
    # The proxy's own refusal says nothing of the purchase: it is kept, for whoever debugs it.
    assert (
        records[2].response_body is not None and "broker_refused" in records[2].response_body.text
    )
