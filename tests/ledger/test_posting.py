"""Hourly usage posting and VM-hours, from a real spool and index into a real ledger."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from beancount.core import data
from ledger_harness import FX, at, flow, spool_and_index, write_spec
from typer.testing import CliRunner

from contracts.config import PriceCatalog
from contracts.dataroot import DataRoot
from ledger.book import InferenceItem, Ledger, LedgerError
from ledger.check import bean_check
from ledger.cli import app
from ledger.pnl import profit_and_loss
from ledger.posting import agents_from_artifacts, post_usage, post_vm_hours
from ledger.reconcile import reconcile
from traffic.sqlite_store import SqliteTrafficStore

DAY = dt.date(2025, 1, 6)
SPOOL = "demo/2025-01-06/flows.jsonl"
# hour 10: m1 runs a1 on tiny (twice) and gpt-4o-mini; m2 runs a2 on tiny. hour 11: m1, a1.
FLOWS = [
    flow(0, at(DAY, 10, 5), "a1", "m1", "local", "tiny", "0.000120"),
    flow(1, at(DAY, 10, 6), "a1", "m1", "openai", "gpt-4o-mini", "0.0123"),
    flow(2, at(DAY, 10, 7), "a2", "m2", "local", "tiny", "0.000200"),
    flow(3, at(DAY, 10, 59), "a1", "m1", "local", "tiny", "0.000133"),
    flow(4, at(DAY, 11, 1), "a1", "m1", "local", "tiny", "0.000310"),
]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[DataRoot, Ledger, SqliteTrafficStore]]:
    root = DataRoot.at(tmp_path)
    index = SqliteTrafficStore(root.traffic_index)
    ledger = Ledger.of(root, "demo")
    ledger.open("demo", Decimal("50"), "CAD", FX, DAY, funding="t1")
    write_spec(root, "demo", "t1", "a1", "builtin")
    write_spec(root, "demo", "t1", "a2", "aider")
    yield root, ledger, index
    index.close()


def usage_transactions(ledger: Ledger) -> list[data.Transaction]:
    entries, _ = ledger.load()
    return [e for e in entries if isinstance(e, data.Transaction) and "spool" in e.meta]


def test_hourly_transactions_per_machine_and_model_link_the_flows(
    setup: tuple[DataRoot, Ledger, SqliteTrafficStore],
) -> None:
    root, ledger, index = setup
    spool_and_index(root, index, FLOWS)
    posted = post_usage(ledger, index, "demo", agent_of=agents_from_artifacts(root, "demo"))
    assert (posted.transactions, posted.flows) == (4, 5)
    assert posted.usd == sum((f.cost_usd for f in FLOWS), Decimal(0))
    assert bean_check(ledger.path) == []

    txns = usage_transactions(ledger)
    keys = [(t.meta["hour"], t.meta["machine"], t.postings[0].account) for t in txns]
    assert sorted(keys) == [
        ("2025-01-06T10:00Z", "m1", "Expenses:Inference:Local:Tiny"),
        ("2025-01-06T10:00Z", "m1", "Expenses:Inference:Openai:Gpt-4o-mini"),
        ("2025-01-06T10:00Z", "m2", "Expenses:Inference:Local:Tiny"),
        ("2025-01-06T11:00Z", "m1", "Expenses:Inference:Local:Tiny"),
    ]
    (tiny_m1,) = [
        t
        for t in txns
        if t.meta["hour"] == "2025-01-06T10:00Z"
        and t.meta["machine"] == "m1"
        and t.postings[0].account.endswith("Tiny")
    ]
    assert tiny_m1.date == DAY
    # The links to the traffic: the spool file, the batch's offsets, the flows themselves.
    assert tiny_m1.meta["spool"] == SPOOL
    assert tiny_m1.meta["spool-from"] == 0
    assert tiny_m1.meta["spool-to"] > 0
    assert (tiny_m1.meta["flows"], tiny_m1.meta["first-flow"], tiny_m1.meta["last-flow"]) == (
        2,
        "f0",
        "f3",
    )
    leg, budget = tiny_m1.postings
    assert leg.meta is not None
    assert (leg.meta["assignment"], leg.meta["trial"], leg.meta["agent"]) == ("a1", "t1", "builtin")
    assert leg.meta["usd"].number == Decimal("0.000253")
    assert leg.meta["tokens"] == 120 + 123
    # 0.000253 USD × 1.38 = 0.00034914 → 0.000349 CAD
    assert leg.units is not None and budget.units is not None
    assert leg.units.number == Decimal("0.000349")
    assert budget.account == "Assets:Budget:Demo" and budget.units.number == Decimal("-0.000349")

    result = reconcile(ledger, index, "demo")
    assert result.ok and {line.kind for line in result.lines} == {"match"}
    report = profit_and_loss([("demo", ledger)])
    agents = {name: row.expenses for (_, name), row in report.by_agent.items()}
    machines = {name: row.expenses for (_, name), row in report.by_machine.items()}
    assert agents["aider"] == Decimal("0.000276")  # 0.0002 × 1.38
    assert machines["m2"] == Decimal("0.000276")
    assert agents["builtin"] == machines["m1"] == ledger.spent() - Decimal("0.000276")


def test_exactly_once_across_calls_late_flows_and_an_index_rebuild(
    setup: tuple[DataRoot, Ledger, SqliteTrafficStore],
) -> None:
    root, ledger, index = setup
    spool_and_index(root, index, FLOWS)
    first = post_usage(ledger, index, "demo")
    before = ledger.spent()
    # Again, and from a fresh Ledger object (the watermark is in the ledger, nowhere else).
    assert post_usage(ledger, index, "demo").transactions == 0
    assert post_usage(Ledger(ledger.path), index, "demo").transactions == 0
    assert ledger.spent() == before

    # A flow of hour 10 indexed after hour 10 was posted: posted once, as its own transaction.
    late = flow(5, at(DAY, 10, 30), "a2", "m2", "local", "tiny", "0.000500")
    spool_and_index(root, index, [late])
    again = post_usage(ledger, index, "demo")
    assert (again.transactions, again.flows, again.usd) == (1, 1, Decimal("0.000500"))
    (extra,) = [t for t in usage_transactions(ledger) if t.meta["first-flow"] == "f5"]
    others = [t for t in usage_transactions(ledger) if t.meta["first-flow"] != "f5"]
    first_to = max(t.meta["spool-to"] for t in others)
    assert (extra.meta["hour"], extra.meta["spool-from"]) == ("2025-01-06T10:00Z", first_to)
    assert ledger.spent() == before + Decimal("0.00069")
    assert post_usage(ledger, index, "demo").transactions == 0

    # The index is disposable: rebuilt from the spool, it changes nothing in the ledger.
    index.close()
    root.traffic_index.unlink()
    rebuilt = SqliteTrafficStore(root.traffic_index)
    assert rebuilt.catch_up(root.traffic_logs) == len(FLOWS) + 1
    assert post_usage(ledger, rebuilt, "demo").transactions == 0
    assert reconcile(ledger, rebuilt, "demo").ok
    rebuilt.close()
    assert first.transactions == 4
    assert bean_check(ledger.path) == []


def test_a_tick_posts_closed_hours_only(setup: tuple[DataRoot, Ledger, SqliteTrafficStore]) -> None:
    root, ledger, index = setup
    spool_and_index(root, index, FLOWS)
    posted = post_usage(ledger, index, "demo", until=at(DAY, 11, 30))
    assert (posted.transactions, posted.flows) == (3, 4)  # hour 11 is still open
    result = reconcile(ledger, index, "demo")
    assert result.ok
    (a1,) = [line for line in result.lines if line.key == "a1"]
    assert (a1.kind, a1.pending_usd) == ("pending", Decimal("0.000310"))
    assert post_usage(ledger, index, "demo", until=at(DAY, 12)).flows == 1
    assert {line.kind for line in reconcile(ledger, index, "demo").lines} == {"match"}


def test_reconcile_finds_a_lost_a_changed_and_a_ghost_posting(
    setup: tuple[DataRoot, Ledger, SqliteTrafficStore],
) -> None:
    root, ledger, index = setup
    spool_and_index(root, index, FLOWS)
    post_usage(ledger, index, "demo")
    (segment,) = ledger.segments()
    text = segment.read_text()
    # a2's only transaction removed; one of a1's legs one cent higher (beancount rebalances).
    blocks = text.split("\n\n")
    kept = [b for b in blocks if 'assignment: "a2"' not in b]
    changed = [b.replace(" 0.016974 CAD", " 0.026974 CAD") for b in kept]
    changed = [
        b.replace("Assets:Budget:Demo  -0.016974 CAD", "Assets:Budget:Demo") for b in changed
    ]
    segment.write_text("\n\n".join(changed))
    assert bean_check(ledger.path) == []
    ledger.post_inference(
        key="ghost",
        on=DAY,
        narration="never metered",
        items=[InferenceItem("openai", "gpt-4o-mini", "m9", Decimal("1"), 10, FX["CAD"])],
        meta={},
    )
    result = reconcile(ledger, index, "demo")
    kinds = {line.key: line.kind for line in result.mismatches}
    assert kinds == {"a1": "amount", "a2": "missing", "ghost": "extra"}
    (a1,) = [line for line in result.lines if line.key == "a1"]
    assert a1.difference == Decimal("0.01")


def test_vm_hours_are_posted_once_to_compute(
    setup: tuple[DataRoot, Ledger, SqliteTrafficStore],
) -> None:
    _, ledger, _ = setup
    prices = PriceCatalog.model_validate(
        {"fx": {"USD": "1", "CAD": "1.38"}, "compute": {"vm_hour_usd": {"nomad": "0.50"}}}
    )
    args = {
        "assignment": "a1",
        "trial": "t1",
        "agent": "builtin",
        "machine": "m1",
        "seconds": 1800.0,
        "on": DAY,
    }
    price = prices.compute.vm_hour("nomad")
    assert post_vm_hours(ledger, driver="nomad", usd_per_hour=price, **args)  # type: ignore[arg-type]
    assert not post_vm_hours(ledger, driver="nomad", usd_per_hour=price, **args)  # type: ignore[arg-type]
    # The local driver's VMs cost nothing unless priced: nothing is posted for them.
    local = prices.compute.vm_hour("local")
    assert local == 0
    other = {**args, "assignment": "a2"}
    assert not post_vm_hours(ledger, driver="local", usd_per_hour=local, **other)  # type: ignore[arg-type]

    entries, _ = ledger.load()
    (txn,) = [e for e in entries if isinstance(e, data.Transaction) and "compute" in e.meta]
    vm, _budget = txn.postings
    assert vm.account == "Expenses:Compute:VM:M1" and vm.units is not None
    assert vm.units.number == Decimal("0.345000")  # 0.5 USD/h × 0.5 h × 1.38
    assert vm.meta is not None
    assert (vm.meta["agent"], vm.meta["seconds"], vm.meta["usd"].number) == (
        "builtin",
        Decimal("1800.0"),
        Decimal("0.25"),
    )
    assert bean_check(ledger.path) == []
    report = profit_and_loss([("demo", ledger)])
    assert report.by_machine[("demo", "m1")].expenses == Decimal("0.345")


def test_vm_hour_prices_are_validated() -> None:
    with pytest.raises(ValueError, match="'local', 'nomad', 'vm' or 'default'"):
        PriceCatalog.model_validate({"fx": {"USD": "1"}, "compute": {"vm_hour_usd": {"ec2": "1"}}})
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        PriceCatalog.model_validate({"fx": {"USD": "1"}, "compute": {"vm_hour_usd": {"local": -1}}})
    unpriced = PriceCatalog.model_validate({"fx": {"USD": "1"}})
    with pytest.raises(KeyError, match="no price for driver 'nomad'"):
        unpriced.compute.vm_hour("nomad")
    fallback = {"vm_hour_usd": {"default": "0.3"}}
    assert PriceCatalog.model_validate({"fx": {"USD": "1"}, "compute": fallback}).compute.vm_hour(
        "nomad"
    ) == Decimal("0.3")


def test_balance_assertion_closes_a_day(setup: tuple[DataRoot, Ledger, SqliteTrafficStore]) -> None:
    root, ledger, index = setup
    spool_and_index(root, index, FLOWS[:2])
    post_usage(ledger, index, "demo")
    next_day = DAY + dt.timedelta(days=1)
    assert ledger.assert_budget(next_day)
    assert not ledger.assert_budget(next_day)
    assert f"{next_day} balance Assets:Budget:Demo  49.982860 CAD" in ledger.path.read_text()
    # A flow of the closed day indexed late is dated on the assertion; `hour` keeps the truth.
    spool_and_index(root, index, FLOWS[2:3])
    post_usage(ledger, index, "demo")
    (late,) = [t for t in usage_transactions(ledger) if t.meta["first-flow"] == "f2"]
    assert (late.date, late.meta["hour"]) == (next_day, "2025-01-06T10:00Z")
    assert bean_check(ledger.path) == []
    assert reconcile(ledger, index, "demo").ok
    with pytest.raises(LedgerError, match="would break its balance assertion of 2025-01-07"):
        ledger.post_payment(
            payment="p1",
            on=DAY,
            item="dataset",
            amount=Decimal(1),
            paid=(Decimal(1), "CAD"),
            narration="too early",
            meta={},
            posting_meta={},
        )


def test_cli_post_then_reconcile(
    setup: tuple[DataRoot, Ledger, SqliteTrafficStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _, index = setup
    spool_and_index(root, index, FLOWS)
    monkeypatch.setenv("AUTOVIBE_DATA", str(root.root))
    out = CliRunner().invoke(app, ["post", "demo"])
    assert out.exit_code == 0, out.output
    assert "demo: 4 transaction(s), 5 flow(s)" in out.output
    out = CliRunner().invoke(app, ["post"])
    assert "demo: 0 transaction(s)" in out.output
    out = CliRunner().invoke(app, ["reconcile", "demo"])
    assert out.exit_code == 0, out.output
    assert "a1: matches" in out.output
