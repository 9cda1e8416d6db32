"""The crypto method on a real EVM (py-evm through eth-tester) with a deployed ERC-20: the broker
pays in the preferred asset, records the transaction and its fee, posts the fee as its own leg;
a short wallet and a reverted transfer are failed attempts, the reverted one with its gas posted;
the fallback order tries the next asset when the preferred one fails."""

from __future__ import annotations

import datetime as dt
import json
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from budget import machine_scope, open_counters, open_project
from contracts.dataroot import DataRoot
from ledger.book import Ledger
from ledger.check import bean_check
from ledger.cli import app as ledger_app
from ledger.payments import (
    Broker,
    PaymentError,
    PaymentPolicy,
    PaymentRequest,
    Requester,
    TransactionLog,
)
from ledger.reconcile import reconcile_payments
from secretstore.fields import EmbeddedFieldCipher
from secretstore.file import FileSecretStore
from tests.ledger.chain_harness import DevChain, new_wallet

FX = {"CAD": Decimal("1.38"), "USD": Decimal("1")}
ZERO_ADDRESS = "0x" + "0" * 40


@pytest.fixture
def chain() -> DevChain:
    return DevChain(coin="1", tokens="50")


def make_broker(tmp_path: Path, chain: DevChain, **policy: Any) -> Broker:
    root = DataRoot.at(tmp_path / "data")
    Ledger.of(root, "demo").open("demo", Decimal(100), "USD", FX, dt.date.today(), funding="f")
    counters = root.root / "counters.sqlite"
    store = open_counters("sqlite", path=counters)
    open_project(
        store, "demo", ["m1"], amount=Decimal(100), daily_allowance=Decimal(60),
        currency="USD", period="once", now=time.time(),
    )  # fmt: skip
    store.close()
    secrets = FileSecretStore(root)
    secrets.put("wallets/eth", chain.payer_key)
    rules = {
        "approval_threshold": "1000",
        "preferred_crypto": "USDC",
        "crypto_order": ["ETH"],
        "asset_rates": {"USDC": "1", "ETH": "0.0005"},
        "methods": [
            chain.method("eth", "ETH", token=False),
            chain.method("usdc", "USDC", token=True),
        ],
        **policy,
    }
    return Broker(
        root,
        PaymentPolicy.model_validate(rules),
        counters=lambda: open_counters("sqlite", path=counters),
        fx=FX,
        secrets=lambda: secrets,
        fields=lambda: EmbeddedFieldCipher(root),
    )


def request(amount: str, currency: str, pay_to: str) -> PaymentRequest:
    return PaymentRequest(
        item="GPU hour", amount=Decimal(amount), currency=currency, justification="benchmark",
        free_alternatives_considered=["the free tier is exhausted"], pay_to=pay_to,
    )  # fmt: skip


def test_erc20_and_native_payments_are_mined_and_posted(tmp_path: Path, chain: DevChain) -> None:
    broker = make_broker(tmp_path, chain)
    shop = new_wallet()
    paid = broker.submit(request("12.5", "USDC", shop), Requester("demo", "m1"))
    assert (paid["status"], paid["method"], paid["charged"]) == ("completed", "usdc", True)
    assert chain.tokens_of(shop) == Decimal("12.5")
    mined = chain.receipt(paid["receipt"])
    assert mined["status"] == 1
    fee_eth = Decimal(mined["gasUsed"] * mined["effectiveGasPrice"]).scaleb(-18)
    assert (Decimal(paid["fee"]), paid["fee_currency"]) == (fee_eth, "ETH")
    assert Decimal(paid["fee_primary"]) == (fee_eth / Decimal("0.0005")).quantize(Decimal("1e-6"))

    coin = broker.submit(request("1", "USD", shop), Requester("demo", "m1"))
    assert coin["method"] == "usdc"  # the preferred asset first, whatever the currency asked
    eth_only = make_broker(tmp_path / "b", chain, preferred_crypto="ETH")
    native = eth_only.submit(request("0.001", "ETH", shop), Requester("demo", "m1"))
    assert (native["status"], native["method"]) == ("completed", "eth")
    assert chain.coin_of(shop) == Decimal("0.001")

    ledger = Ledger.of(broker.root, "demo")
    assert bean_check(ledger.path) == []
    text = ledger.text()
    assert "Expenses:Purchases:GPU-hour  12.500000 USD" in text
    assert f"Expenses:Fees:Usdc  {Decimal(paid['fee_primary']):f} USD" in text
    assert "paid: 12.5 USDC" in text
    fees = Decimal(paid["fee_primary"]) + Decimal(coin["fee_primary"])
    assert ledger.spent() == Decimal("13.5") + fees


def test_short_wallet_and_reverted_transfer_are_failed_attempts(
    tmp_path: Path, chain: DevChain
) -> None:
    usdc_only = make_broker(
        tmp_path / "b", chain, methods=[chain.method("usdc", "USDC", token=True)]
    )
    short = usdc_only.submit(request("55", "USDC", new_wallet()), Requester("demo", "m1"))
    assert (short["status"], short["reason"]) == ("failed", "method_failed")
    assert short["detail"].startswith("insufficient funds: wallet 0x")
    assert "holds 50.000000 USDC, needs 55.000000" in short["detail"]
    assert "fee" not in short  # nothing was sent

    reverted = usdc_only.submit(request("1", "USDC", ZERO_ADDRESS), Requester("demo", "m1"))
    assert (reverted["status"], reverted["reason"]) == ("failed", "method_failed")
    assert reverted["detail"].startswith("the transfer reverted in block")
    evidence = json.loads(usdc_only.log("demo").reveal(reverted)["evidence"])
    mined = chain.receipt(evidence["tx_hash"])
    assert mined["status"] == 0  # on chain, and it paid its gas
    gas = Decimal(mined["gasUsed"] * mined["effectiveGasPrice"]).scaleb(-18)
    assert Decimal(reverted["fee"]) == gas > 0

    ledger = Ledger.of(usdc_only.root, "demo")
    assert bean_check(ledger.path) == []
    fee = Decimal(reverted["fee_primary"])
    assert ledger.spent() == fee  # the reverted transfer's gas, and nothing else
    assert f'payment: "{reverted["id"]}/1"' in ledger.text()
    store = usdc_only._counters()
    try:
        assert store.remaining(machine_scope("demo", "m1")) == Decimal(60) - fee
    finally:
        store.close()
    statuses = [e["status"] for e in TransactionLog(usdc_only.log("demo").path).entries()]
    assert statuses == ["failed", "failed"]


def test_the_fallback_order_pays_with_the_next_asset(tmp_path: Path, chain: DevChain) -> None:
    broker = make_broker(tmp_path, chain)
    shop = new_wallet()
    # 55 USD: more USDC than the wallet holds (50), and 0.0275 ETH, which it has.
    entry = broker.submit(request("55", "USD", shop), Requester("demo", "m1"))
    assert (entry["status"], entry["method"], entry["attempt"]) == ("completed", "eth", 2)
    assert chain.coin_of(shop) == Decimal("0.0275")
    attempts = TransactionLog(broker.log("demo").path).entries()
    assert [(a["method"], a["status"]) for a in attempts] == [
        ("usdc", "failed"),
        ("eth", "completed"),
    ]


def test_reconcile_checks_payments_against_the_attempt_log(
    tmp_path: Path, chain: DevChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    methods = [
        chain.method("usdc", "USDC", token=True),
        {"name": "sandbox", "kind": "card", "adapter": "sandbox"},
    ]
    broker = make_broker(tmp_path, chain, methods=methods)
    who = Requester("demo", "m1")
    assert broker.submit(request("5", "USDC", new_wallet()), who)["status"] == "completed"
    assert broker.submit(request("1", "USDC", ZERO_ADDRESS), who)["status"] == "failed"
    sandbox = broker.submit(request("3", "USD", "https://shop.example/checkout"), who)
    assert (sandbox["status"], sandbox["charged"]) == ("completed", False)
    attempts = TransactionLog(broker.log("demo").path).entries()
    ledger = Ledger.of(broker.root, "demo")
    lines = reconcile_payments(ledger.load()[0], attempts)
    assert [(line.key, line.kind) for line in lines] == sorted(
        [(attempts[0]["id"], "match"), (f"{attempts[1]['id']}/1", "match"),
         (sandbox["id"], "match")]
    )  # fmt: skip

    monkeypatch.setenv("AUTOVIBE_DATA", str(broker.root.root))
    out = CliRunner().invoke(ledger_app, ["reconcile", "demo"])
    assert out.exit_code == 0, out.output
    assert "3 payment(s), ledger = attempt" in out.output
    # An attempt log that says more was paid than the ledger shows, and a payment it never made.
    forged = [{**attempts[0], "amount_primary": "6"}, *attempts[1:]]
    (broker.log("demo").path).write_text(json.dumps(forged))
    ledger.post_payment(
        payment="pay_ghost", on=dt.date.today(), item="ghost", amount=Decimal(1),
        paid=(Decimal(1), "USD"), narration="x", meta={}, posting_meta={},
    )  # fmt: skip
    out = CliRunner().invoke(ledger_app, ["reconcile", "demo"])
    assert out.exit_code == 1
    assert f"{attempts[0]['id']}: amount differs" in out.output
    assert "pay_ghost: posted but not in the attempt log" in out.output


def test_two_parts_sent_at_once_cannot_both_pass_the_threshold(
    tmp_path: Path, chain: DevChain
) -> None:
    broker = make_broker(tmp_path, chain, approval_threshold="25")
    shop = new_wallet()
    with ThreadPoolExecutor(2) as pool:
        parts = list(
            pool.map(
                lambda _: broker.submit(request("15", "USDC", shop), Requester("demo", "m1")),
                range(2),
            )
        )
    assert sorted(p["status"] for p in parts) == ["completed", "pending_approval"]
    assert chain.tokens_of(shop) == Decimal(15)
    # Every attempt shows where the money was to go, masked, whatever its outcome.
    assert {p["destination"] for p in parts} == {f"{shop[:6]}…{shop[-4:]}"}


def test_two_approvals_at_once_pay_once(tmp_path: Path, chain: DevChain) -> None:
    broker = make_broker(tmp_path, chain, approval_threshold="25")
    shop = new_wallet()
    held = broker.submit(request("30", "USDC", shop), Requester("demo", "m1"))
    assert held["status"] == "pending_approval"

    def approve(_: int) -> str:
        try:
            return str(broker.approve("demo", held["id"])["status"])
        except PaymentError as exc:
            return str(exc)

    with ThreadPoolExecutor(2) as pool:
        outcomes = sorted(pool.map(approve, range(2)))
    assert outcomes == ["completed", f"payment {held['id']!r} is completed, not pending_approval"]
    assert chain.tokens_of(shop) == Decimal(30)
