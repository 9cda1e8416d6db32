"""Reconcile, P&L and Fava on a real traffic index (fed from a real spool) and a real ledger."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from contracts.dataroot import DataRoot
from contracts.records import FlowRecord, Usage
from contracts.settings import free_port
from ledger.book import InferenceItem, Ledger
from ledger.check import bean_check
from ledger.cli import app, fava_command
from ledger.pnl import profit_and_loss
from ledger.posting import post_usage
from ledger.reconcile import reconcile
from traffic.spool import Spool
from traffic.sqlite_store import SqliteTrafficStore

FX = {"CAD": Decimal("1.38"), "USD": Decimal("1")}
TODAY = dt.date.today()
# (assignment, machine, provider, model, cost_usd) per flow; a2 mixes two models.
FLOWS = [
    ("a1", "m1", "openai", "gpt-4o-mini", "0.0123"),
    ("a1", "m1", "openai", "gpt-4o-mini", "0.004567"),
    ("a2", "m2", "local", "tiny", "0.000123456"),
    ("a2", "m2", "anthropic", "claude-haiku-4-5", "0.25"),
    ("a3", "m1", "openai", "gpt-4o-mini", "0.031"),
]


def flow(n: int, assignment: str, machine: str, provider: str, model: str, usd: str) -> FlowRecord:
    now = time.time()
    return FlowRecord(
        id=f"f{n}",
        ts_start=now,
        ts_end=now + 1,
        duration_ms=1000,
        method="POST",
        url=f"https://{provider}.example/v1/chat/completions",
        host=f"{provider}.example",
        path="/v1/chat/completions",
        status=200,
        project="demo",
        trial="t1",
        assignment=assignment,
        machine=machine,
        provider=provider,
        model=model,
        usage=Usage(prompt_tokens=100 + n, completion_tokens=20, total_tokens=120 + n),
        cost_usd=Decimal(usd),
    )


@pytest.fixture
def trial(tmp_path: Path) -> Iterator[tuple[DataRoot, Ledger, SqliteTrafficStore]]:
    """A trial under way: a1's and a2's flows indexed and posted, a3's indexed after that."""
    root = DataRoot.at(tmp_path)
    spool = Spool(root)
    for n, f in enumerate(FLOWS[:-1]):
        spool.append(flow(n, *f))
    index = SqliteTrafficStore(root.traffic_index)
    assert index.catch_up(root.traffic_logs) == len(FLOWS) - 1
    ledger = Ledger.of(root, "demo")
    ledger.open("demo", Decimal("50"), "CAD", FX, TODAY, funding="t1")
    post_usage(ledger, index, "demo")
    spool.append(flow(len(FLOWS) - 1, *FLOWS[-1]))
    spool.close()
    assert index.catch_up(root.traffic_logs) == 1
    yield root, ledger, index
    index.close()


def test_ledger_equals_metered_usage(trial: tuple[DataRoot, Ledger, SqliteTrafficStore]) -> None:
    _, ledger, index = trial
    result = reconcile(ledger, index, "demo")
    by_key = {line.key: line for line in result.lines}
    assert by_key["a1"].kind == "match"
    assert by_key["a1"].metered == Decimal("0.023276")  # 0.016867 USD × 1.38
    assert by_key["a2"].kind == "match"
    # a3 has spent but is not posted yet (past the watermark): pending, not a difference.
    assert by_key["a3"].kind == "pending"
    assert by_key["a3"].pending_usd == Decimal("0.031")
    assert result.ok and result.mismatches == []

    post_usage(ledger, index, "demo")
    result = reconcile(ledger, index, "demo")
    assert {line.kind for line in result.lines} == {"match"}
    assert {line.key: line.metered for line in result.lines}["a3"] == Decimal("0.04278")


def test_tampered_posting_and_extra_posting_are_reported(
    trial: tuple[DataRoot, Ledger, SqliteTrafficStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, ledger, index = trial
    post_usage(ledger, index, "demo")
    # Tamper a2: one posting 1 cent higher, the budget posting left for beancount to balance.
    (segment,) = ledger.segments()
    text = segment.read_text()
    block = re.search(r"(\S+ \* \"Usage [^\n]*claude-haiku-4-5\"\n(?:  .*\n)+)", text)
    assert block is not None
    tampered = block.group(1).replace("0.345000 CAD", "0.355000 CAD")
    tampered = re.sub(r"(  Assets:Budget:Demo)  -\S+ CAD", r"\1", tampered)
    segment.write_text(text.replace(block.group(1), tampered))
    assert bean_check(ledger.path) == []
    ledger.post_inference(
        key="ghost",
        on=TODAY,
        narration="never metered",
        items=[InferenceItem("openai", "gpt-4o-mini", "m9", Decimal("1"), 10, FX["CAD"])],
        meta={},
    )

    result = reconcile(ledger, index, "demo")
    kinds = {line.key: line.kind for line in result.mismatches}
    assert kinds == {"a2": "amount", "ghost": "extra"}
    a2 = next(line for line in result.lines if line.key == "a2")
    assert a2.difference == Decimal("0.01")

    monkeypatch.setenv("AUTOVIBE_DATA", str(root.root))
    out = CliRunner().invoke(app, ["reconcile", "demo"])
    assert out.exit_code == 1, out.output
    assert "a2: amount differs" in out.output
    assert "ghost: posted but never metered" in out.output
    assert "a1: matches" in out.output


def test_reconcile_cli_passes_on_a_true_ledger(
    trial: tuple[DataRoot, Ledger, SqliteTrafficStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, ledger, index = trial
    post_usage(ledger, index, "demo")
    monkeypatch.setenv("AUTOVIBE_DATA", str(root.root))
    out = CliRunner().invoke(app, ["reconcile", "demo"])
    assert out.exit_code == 0, out.output
    assert "ledger = metered usage" in out.output


def test_pnl_per_project_machine_and_agent(tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    demo = Ledger.of(root, "demo")
    demo.open("demo", Decimal("100"), "CAD", FX, TODAY)
    demo.post_inference(
        key="a1",
        on=TODAY,
        narration="a1",
        items=[
            InferenceItem("openai", "gpt-4o-mini", "m1", Decimal("1"), 10, FX["CAD"]),
            InferenceItem("local", "tiny", "m2", Decimal("0.5"), 10, FX["CAD"]),
        ],
        meta={"agent": "aider"},
    )
    demo.post_payment(
        payment="pay_1",
        on=TODAY,
        item="dataset",
        amount=Decimal("10"),
        paid=(Decimal("10"), "CAD"),
        narration="Purchase: dataset",
        meta={"agent": "builtin"},
        posting_meta={"machine": "m1"},
    )
    demo.post_revenue(
        revenue="r1",
        on=TODAY,
        source="bounty",
        amount=Decimal("20"),
        received=(Decimal("20"), "CAD"),
        narration="bug bounty",
        meta={},
    )
    other = Ledger.of(root, "other")
    other.open("other", Decimal("5"), "USD", FX, TODAY)
    assert bean_check(demo.path) == []

    report = profit_and_loss([("demo", demo), ("other", other)])
    demo_row, other_row = report.by_project
    # 1 USD × 1.38 + 0.5 USD × 1.38 + 10 CAD = 12.07 CAD spent; 20 CAD earned.
    assert (demo_row.revenue, demo_row.expenses, demo_row.profit) == (
        Decimal("20"),
        Decimal("12.07"),
        Decimal("7.93"),
    )
    assert (other_row.currency, other_row.profit) == ("USD", 0)
    machines = {k: (r.revenue, r.expenses) for k, r in report.by_machine.items()}
    assert machines == {
        ("demo", "-"): (Decimal("20"), 0),
        ("demo", "m1"): (0, Decimal("11.38")),
        ("demo", "m2"): (0, Decimal("0.69")),
    }
    agents = {k: r.expenses for k, r in report.by_agent.items()}
    assert agents == {("demo", "-"): 0, ("demo", "aider"): Decimal("2.07"), ("demo", "builtin"): 10}


def test_fava_serves_the_ledger(trial: tuple[DataRoot, Ledger, SqliteTrafficStore]) -> None:
    _, ledger, _ = trial
    port = free_port()
    proc = subprocess.Popen(
        fava_command(ledger.path, "127.0.0.1", port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/", follow_redirects=True)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "fava did not start in 30 s"
                time.sleep(0.2)
        assert response.status_code == 200
        assert "demo" in response.text
    finally:
        proc.terminate()
        proc.wait(timeout=10)
