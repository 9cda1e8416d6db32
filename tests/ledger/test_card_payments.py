"""The card method in headless Chromium (Debian's, driven by Playwright) on a merchant's
checkout served locally: an order paid through a confirmation step, a decline, a slow merchant
within and past the timeout, a page asking more than was approved; the receipt's masked
screenshot and final URL; and no card digit in any file written or any log line."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from budget import machine_scope, open_counters, open_project
from contracts.dataroot import DataRoot
from ledger.book import Ledger
from ledger.check import bean_check
from ledger.methods import Charge
from ledger.methods.card import Card, CardSettings, Checkout, MerchantFlow, card_json
from ledger.payments import Broker, PaymentPolicy, PaymentRequest, Requester, TransactionLog
from secretstore.fields import EmbeddedFieldCipher
from secretstore.file import FileSecretStore
from tests.ledger.merchant_stand_in import DECLINED_CARD, FLOW, Merchant, merchant

NUMBER = "5555 5555 5555 4444"
CVC = "737"
FX = {"USD": Decimal(1)}
pytestmark = pytest.mark.slow  # each payment starts a Chromium: ~1.5 s


@pytest.fixture
def shop() -> Iterator[Merchant]:
    with merchant() as running:
        yield running


def make_broker(root: DataRoot, shop: Merchant, *, timeout_s: float = 20) -> Broker:
    if not Ledger.of(root, "demo").path.exists():
        Ledger.of(root, "demo").open("demo", Decimal(100), "USD", FX, dt.date.today(), funding="f")
        store = open_counters("sqlite", path=root.budget_counters)
        open_project(
            store, "demo", ["m1"], amount=Decimal(100), daily_allowance=Decimal(50),
            currency="USD", period="once", now=time.time(),
        )  # fmt: skip
        store.close()
        FileSecretStore(root).put("cards/ops", card_json(NUMBER, "12/30", CVC, "Ops Team"))
    card = {
        "name": "card", "kind": "card", "adapter": "card", "secret": "cards/ops",
        "settings": {"timeout_s": timeout_s, "merchants": {shop.host: FLOW}},
    }  # fmt: skip
    return Broker(
        root,
        PaymentPolicy.model_validate({"approval_threshold": "40", "methods": [card]}),
        counters=lambda: open_counters("sqlite", path=root.budget_counters),
        fx=FX,
        secrets=lambda: FileSecretStore(root),
        fields=lambda: EmbeddedFieldCipher(root),
    )


def buy(broker: Broker, amount: str, url: str) -> dict[str, Any]:
    request = PaymentRequest(
        item="GPU hour", amount=Decimal(amount), currency="USD", justification="benchmark",
        free_alternatives_considered=["no free GPU offers the size"], pay_to=url,
    )  # fmt: skip
    return broker.submit(request, Requester("demo", "m1"))


def masked_pixels(path: Path) -> int:
    """Pixels of Playwright's mask colour (#FF00FF) in a screenshot."""
    with Image.open(path) as image:
        raw = image.convert("RGB").tobytes()
    return sum(1 for i in range(0, len(raw), 3) if raw[i : i + 3] == b"\xff\x00\xff")


def test_card_payments_in_a_real_browser(
    tmp_path: Path, shop: Merchant, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    root = DataRoot.at(tmp_path / "data")
    broker = make_broker(root, shop)

    paid = buy(broker, "12.50", shop.checkout("12.50"))
    assert (paid["status"], paid["method"], paid["charged"]) == ("completed", "card", True)
    assert [(o["order"], o["number"], o["cvc"]) for o in shop.orders] == [
        (paid["receipt"], NUMBER.replace(" ", ""), CVC)
    ]  # the merchant got the card, through its confirmation step
    assert re.fullmatch(r"ORD-[0-9A-F]{8}", paid["receipt"])
    assert paid["destination"] == shop.host
    evidence = json.loads(paid["evidence"])
    assert evidence["final_url"] == f"http://{shop.host}/pay"
    assert evidence["order_id"] == paid["receipt"]
    screenshot = Path(evidence["screenshot"])
    assert screenshot.parent == root.financial("demo") / "receipts"
    assert masked_pixels(screenshot) > 500  # the card summary is painted over
    ledger = Ledger.of(root, "demo")
    assert bean_check(ledger.path) == []
    assert ledger.spent() == Decimal("12.5")

    # A slow merchant within the timeout is paid.
    slow = buy(broker, "2", shop.checkout("2", slow=1.5))
    assert slow["status"] == "completed", slow["detail"]

    # A page that asks more than was approved is not paid.
    more = buy(broker, "3", shop.checkout("30"))
    assert (more["status"], more["detail"]) == (
        "failed", "the page asks 30 USD, 3 was approved: nothing paid",
    )  # fmt: skip
    assert len(shop.orders) == 2

    # Past the timeout: a failed attempt, with its receipt of where the page was.
    impatient = make_broker(root, shop, timeout_s=0.5)
    late = buy(impatient, "2", shop.checkout("2", slow=3))
    assert (late["status"], late["detail"]) == ("failed", "no outcome on the page within 0.5 s")

    # A declined card: the reason, the screenshot, nothing spent.
    FileSecretStore(root).put("cards/ops", card_json(DECLINED_CARD, "12/30", CVC))
    declined = buy(broker, "4", shop.checkout("4"))
    assert (declined["status"], declined["detail"]) == (
        "failed", "declined: Card declined: do not honor",
    )  # fmt: skip
    shown = json.loads(broker.log("demo").reveal(declined)["evidence"])
    assert shown["final_url"] == f"http://{shop.host}/pay"
    assert Path(shown["screenshot"]).exists()

    assert ledger.spent() == Decimal("14.5")
    store = open_counters("sqlite", path=root.budget_counters)
    try:
        assert store.spent(machine_scope("demo", "m1")) == Decimal("14.5")
    finally:
        store.close()
    statuses = [e["status"] for e in TransactionLog(broker.log("demo").path).entries()]
    assert statuses == ["completed", "completed", "failed", "failed", "failed"]

    # No card digit anywhere: every file written (the secret store is encrypted), every log.
    forms = [NUMBER, NUMBER.replace(" ", ""), DECLINED_CARD]
    last4 = re.compile(rb"(?<![0-9A-Za-z])(4444|0002)(?![0-9A-Za-z])")
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        content = path.read_bytes()
        assert not any(f.encode() in content for f in forms), path
        if path.suffix in (".json", ".beancount", ".log", ".jsonl", ".txt"):
            assert not last4.search(content), path
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert not any(f in logged for f in forms)
    assert not re.search(rf"(?<!\d){CVC}(?!\d)", logged)  # a port may hold the digits


def test_scrubbing_takes_the_card_out_and_leaves_other_numbers() -> None:
    """The code is taken out where it stands as a number of its own, never as three digits
    of another: a merchant on port 41737 keeps its receipt URL (it was `41[card]`)."""
    flow = MerchantFlow.model_validate(FLOW)
    card = Card(number=NUMBER, expiry="12/30", cvc=CVC)
    charge = Charge("p1", "item", Decimal(1), "CAD")
    checkout = Checkout(CardSettings(merchants={"shop": flow}), flow, card, charge)
    assert checkout.scrub("http://127.0.0.1:41737/pay") == "http://127.0.0.1:41737/pay"
    assert checkout.scrub(f"card {NUMBER} code {CVC}.") == "card [card] code [card]."
    assert checkout.scrub(f"n={NUMBER.replace(' ', '')}&cvc={CVC}") == "n=[card]&cvc=[card]"
