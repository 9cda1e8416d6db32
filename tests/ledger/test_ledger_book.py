"""The project ledger with real beancount and the real `bean-check`."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest
from beancount import loader
from beancount.core import data

from contracts.dataroot import DataRoot
from ledger.book import InferenceItem, Ledger, LedgerError, account_component
from ledger.check import bean_check

FX = {"CAD": Decimal("1.38"), "USD": Decimal("1"), "EUR": Decimal("0.92")}
OPENED = dt.date(2025, 1, 6)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    book = Ledger.of(DataRoot.at(tmp_path), "demo")
    book.open("demo", Decimal("50"), "CAD", FX, OPENED)
    return book


def items_for(machine: str) -> list[InferenceItem]:
    return [
        InferenceItem("local", "tiny:thinking", machine, Decimal("0.000123456"), 1234, FX["CAD"]),
        InferenceItem("openai", "gpt-4o-mini", machine, Decimal("0.0123"), 5000, FX["CAD"]),
    ]


def prices(path: Path) -> list[tuple[dt.date, str, Decimal | None]]:
    entries, errors, _ = loader.load_file(str(path))
    assert not errors
    return [
        (p.date, p.amount.currency, p.amount.number) for p in entries if isinstance(p, data.Price)
    ]


def test_open_writes_currency_accounts_prices_and_funding(ledger: Ledger, tmp_path: Path) -> None:
    assert ledger.path == tmp_path / "financial" / "demo" / "ledger.beancount"
    assert bean_check(ledger.path) == []
    assert ledger.currency() == "CAD"
    assert ledger.remaining() == Decimal("50")
    assert ledger.spent() == 0
    # One USD buys `rate` of each currency; USD itself has no price against itself.
    assert prices(ledger.path) == [
        (OPENED, "CAD", Decimal("1.38")),
        (OPENED, "EUR", Decimal("0.92")),
    ]
    text = ledger.path.read_text()
    assert 'option "operating_currency" "CAD"' in text
    assert f"{OPENED} open Assets:Budget:Demo CAD" in text
    assert f"{OPENED} open Equity:Budget:Funding CAD" in text


def test_post_two_assignments(ledger: Ledger) -> None:
    a1, a2 = items_for("m1"), items_for("m2")[:1]
    assert ledger.post_inference(
        key="a1", on=OPENED, narration="assignment a1", items=a1, meta={"trial": "t1"}
    )
    assert ledger.post_inference(
        key="a2", on=OPENED + dt.timedelta(days=1), narration="a2", items=a2, meta={"trial": "t1"}
    )
    assert bean_check(ledger.path) == []

    # 0.000123456 USD × 1.38 = 0.00017036928 → 0.000170; 0.0123 × 1.38 = 0.016974.
    assert [i.amount() for i in a1] == [Decimal("0.000170"), Decimal("0.016974")]
    expected = sum((i.amount() for i in a1 + a2), Decimal(0))
    assert ledger.spent() == expected == Decimal("0.017314")
    assert ledger.remaining() == Decimal("50") - expected
    assert ledger.postings_by_key() == {"a1": Decimal("0.017144"), "a2": Decimal("0.000170")}

    before = ledger.path.read_bytes()
    assert not ledger.post_inference(key="a1", on=OPENED, narration="again", items=a2, meta={})
    assert ledger.path.read_bytes() == before

    entries, _ = ledger.load()
    (txn,) = [e for e in entries if isinstance(e, data.Transaction) and e.meta.get("key") == "a1"]
    assert txn.meta["trial"] == "t1"
    first = txn.postings[0]
    assert first.account == "Expenses:Inference:Local:Tiny-thinking"
    assert first.meta is not None
    assert first.meta["model"] == "tiny:thinking"
    assert first.meta["machine"] == "m1"
    assert first.meta["usd"].number == Decimal("0.000123456")
    assert first.meta["tokens"] == 1234
    assert txn.postings[-1].account == "Assets:Budget:Demo"
    # New expense accounts are opened on the ledger's open date, not the posting's.
    opens = {e.account: e.date for e in entries if isinstance(e, data.Open)}
    assert opens["Expenses:Inference:Openai:Gpt-4o-mini"] == OPENED


def test_open_is_idempotent_and_adds_only_what_is_missing(ledger: Ledger) -> None:
    before = ledger.path.read_bytes()
    assert not ledger.open("demo", Decimal("50"), "CAD", FX, OPENED)
    assert not ledger.open("demo", Decimal("50"), "CAD", FX, OPENED + dt.timedelta(days=3))
    assert ledger.path.read_bytes() == before

    later = OPENED + dt.timedelta(days=7)
    assert ledger.open("demo", Decimal("50"), "CAD", {**FX, "CAD": Decimal("1.40")}, later)
    assert prices(ledger.path)[-1] == (later, "CAD", Decimal("1.40"))
    assert len(prices(ledger.path)) == 3
    assert ledger.remaining() == Decimal("50")

    # More budget is a new funding name (a new trial); repeating it changes nothing.
    assert ledger.open("demo", Decimal("20.5"), "CAD", FX, later, funding="trial-2")
    assert not ledger.open("demo", Decimal("20.5"), "CAD", FX, later, funding="trial-2")
    assert ledger.remaining() == Decimal("70.5")
    assert bean_check(ledger.path) == []


def test_open_refuses_conflicts(ledger: Ledger) -> None:
    before = ledger.path.read_bytes()
    with pytest.raises(LedgerError, match="funding 'initial' is recorded as 50 CAD"):
        ledger.open("demo", Decimal("60"), "CAD", FX, OPENED)
    with pytest.raises(LedgerError, match="primary currency is CAD, not EUR"):
        ledger.open("demo", Decimal("50"), "EUR", FX, OPENED)
    with pytest.raises(LedgerError, match="ledger of Assets:Budget:Demo, not Assets:Budget:Other"):
        ledger.open("other", Decimal("50"), "CAD", FX, OPENED)
    with pytest.raises(LedgerError, match="three capital letters"):
        ledger.open("demo", Decimal("50"), 'CAD" X', FX, OPENED)
    with pytest.raises(LedgerError, match="fx rates must be > 0"):
        ledger.open("demo", Decimal("50"), "CAD", {"CAD": Decimal(0)}, OPENED)
    assert ledger.path.read_bytes() == before


def test_invalid_posting_raises_and_leaves_file_unchanged(ledger: Ledger) -> None:
    ledger.post_inference(key="a1", on=OPENED, narration="ok", items=items_for("m1"), meta={})
    before = ledger.path.read_bytes()
    # The budget account is not open yet on that day: beancount rejects the transaction.
    with pytest.raises(LedgerError, match="would not pass bean-check") as err:
        ledger.post_inference(
            key="early",
            on=OPENED - dt.timedelta(days=1),
            narration="x",
            items=items_for("m1"),
            meta={},
        )
    assert "inactive account" in str(err.value).lower()
    assert str(ledger.path) in str(err.value)
    assert ledger.path.read_bytes() == before
    assert "early" not in ledger.postings_by_key()

    with pytest.raises(LedgerError, match="metadata key 'Bad key'"):
        ledger.post_inference(
            key="a3", on=OPENED, narration="x", items=items_for("m1"), meta={"Bad key": "v"}
        )
    assert ledger.path.read_bytes() == before


def test_hostile_strings_cannot_inject_directives(ledger: Ledger) -> None:
    narration = 'quote " backslash \\ newline\n2025-01-06 open Assets:Injected CAD'
    ledger.post_inference(
        key='k"1', on=OPENED, narration=narration, items=items_for('m"1'), meta={"note": narration}
    )
    entries, _ = ledger.load()
    assert not any(isinstance(e, data.Open) and e.account == "Assets:Injected" for e in entries)
    (txn,) = [e for e in entries if isinstance(e, data.Transaction) and "key" in e.meta]
    assert (txn.narration, txn.meta["note"], txn.meta["key"]) == (narration, narration, 'k"1')
    assert (txn.postings[0].meta or {})["machine"] == 'm"1'
    assert bean_check(ledger.path) == []


def test_post_before_open_is_refused(tmp_path: Path) -> None:
    book = Ledger(tmp_path / "ledger.beancount")
    with pytest.raises(LedgerError, match="not opened yet"):
        book.post_inference(key="a", on=OPENED, narration="x", items=items_for("m1"), meta={})
    with pytest.raises(LedgerError, match="no ledger at"):
        book.spent()


def test_hand_broken_ledger_is_reported_not_rewritten(ledger: Ledger) -> None:
    broken = ledger.path.read_text() + '\n2025-01-07 * "unbalanced"\n  Assets:Budget:Demo  1 CAD\n'
    ledger.path.write_text(broken)
    errors = bean_check(ledger.path)
    assert errors and any("balance" in line.lower() for line in errors)
    with pytest.raises(LedgerError, match="does not pass bean-check"):
        ledger.post_inference(key="a", on=OPENED, narration="x", items=items_for("m1"), meta={})
    with pytest.raises(LedgerError, match="does not pass bean-check"):
        ledger.spent()
    assert ledger.path.read_text() == broken


@pytest.mark.parametrize(
    ("name", "component"),
    [
        ("tiny:thinking", "Tiny-thinking"),
        ("gpt-4o-mini", "Gpt-4o-mini"),
        ("Qwen/Qwen2.5-Coder-32B-Instruct", "Qwen-Qwen2-5-Coder-32B-Instruct"),
        ("my_project", "My-project"),
        ("7b", "7b"),
        ("__x__", "X"),
    ],
)
def test_account_component(name: str, component: str) -> None:
    assert account_component(name) == component


def test_account_component_needs_a_letter_or_digit() -> None:
    with pytest.raises(LedgerError, match="cannot make an account name"):
        account_component(":-:")
