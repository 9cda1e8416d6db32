"""The payment broker and revenue, through the real router on a tiny FastAPI app."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import yaml
from fastapi import FastAPI, Header
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from budget import machine_scope, open_project, project_scope
from contracts.secrets import FieldCipherError
from contracts.settings import PROJECT_ROOT, Settings
from ledger import cli as ledger_cli
from ledger import methods
from ledger.book import Ledger
from ledger.check import bean_check
from ledger.cli import app as ledger_app
from ledger.cli import payments_app
from ledger.methods import Charge, Receipt
from ledger.payments import (
    Broker,
    PaymentPolicy,
    PaymentRequest,
    Requester,
    TransactionLog,
    masked,
)
from orchestrator.payments_api import router
from orchestrator.platform import Platform
from secretstore import store_from_env
from tests.ledger.chain_harness import DevChain, new_wallet

POLICY: dict[str, Any] = {
    "require_free_alternatives": True,
    "approval_threshold": "25.00",
    "preferred_crypto": "USDC",
    "asset_rates": {"USDC": "1", "ETH": "0.0005"},
    "methods": [
        {"name": "btc", "kind": "crypto", "adapter": "sandbox", "asset": "BTC"},
        {"name": "usdc", "kind": "crypto", "adapter": "sandbox", "asset": "USDC"},
        {"name": "card", "kind": "card", "adapter": "sandbox"},
    ],
}


def paying_policy(chain: DevChain) -> dict[str, Any]:
    """POLICY whose USDC method pays on `chain`, from the wallet at `wallets/eth`."""
    usdc = chain.method("usdc", "USDC", token=True)
    return {**POLICY, "methods": [POLICY["methods"][0], usdc, POLICY["methods"][2]]}


def principal(x_principal: str = Header("operator")) -> Any:
    """A stand-in for the API's token guard: the operator, or `machine:<project>:<machine>`."""
    if x_principal == "operator":
        return None
    _, project, machine = x_principal.split(":")
    return SimpleNamespace(project=project, machine=machine)


@pytest.fixture
def chain() -> DevChain:
    return DevChain()


@pytest.fixture
def setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chain: DevChain
) -> tuple[TestClient, Platform]:
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("models.yaml", "prices.yaml"):
        shutil.copy(PROJECT_ROOT / "configs" / name, configs / name)
    (configs / "payments.yaml").write_text(yaml.safe_dump(paying_policy(chain)))
    settings = Settings(data=tmp_path / "data", configs=configs)
    monkeypatch.setenv("AUTOVIBE_DATA", str(settings.data))
    monkeypatch.setenv("AUTOVIBE_CONFIGS", str(configs))
    platform = Platform.from_settings(settings)
    store_from_env(settings=settings).put("wallets/eth", chain.payer_key)
    platform.ledger("demo").open(
        "demo", Decimal("100"), "CAD", platform.catalog.prices.fx, dt.date.today(), funding="t1"
    )
    store = platform.counters()
    open_project(
        store,
        "demo",
        ["m1"],
        amount=Decimal("100"),
        daily_allowance=Decimal("30"),
        currency="CAD",
        period="once",
        now=time.time(),
    )
    store.close()
    app = FastAPI()
    app.include_router(router(platform, principal))
    return TestClient(app), platform


def ask(client: TestClient, who: str = "machine:demo:m1", **overrides: Any) -> Any:
    body = {
        "project": "demo",
        "item": "Dataset license",
        "amount": "10.00",
        "currency": "CAD",
        "justification": "needed to run the benchmark",
        "free_alternatives_considered": ["public mirror (outdated)"],
        **overrides,
    }
    return client.post("/v1/payments", json=body, headers={"X-Principal": who})


def approve_args(payment_id: str) -> list[str]:
    """`autovibe payments approve ID`: typer drops the command name while it is the only one."""
    return ["approve", payment_id] if len(payments_app.registered_commands) > 1 else [payment_id]


def test_each_refusal_reason(setup: tuple[TestClient, Platform]) -> None:
    client, platform = setup
    r = ask(client, free_alternatives_considered=[])
    assert (r.status_code, r.json()["reason"]) == (403, "no_free_alternative")
    r = ask(client, free_alternatives_considered=["  "])
    assert r.json()["reason"] == "no_free_alternative"
    r = ask(client, currency="XYZ")
    assert (r.status_code, r.json()["reason"]) == (403, "unknown_currency")
    r = ask(client, amount="40")
    assert (r.status_code, r.json()["reason"]) == (402, "machine_allowance")
    assert "30.000000 CAD left" in r.json()["detail"]
    r = ask(client, who="operator", amount="150")  # no machine: the project budget alone
    assert (r.status_code, r.json()["reason"]) == (402, "project_budget")
    r = ask(client, project="nope", who="operator")
    assert (r.status_code, r.json()["reason"]) == (403, "no_ledger")
    r = client.post(
        "/v1/projects/demo/payments",
        json={
            "item": "x",
            "amount": "1",
            "currency": "CAD",
            "justification": "y",
            "free_alternatives_considered": [],
        },
        headers={"X-Principal": "machine:demo:m1"},
    )
    assert r.json()["reason"] == "no_free_alternative"
    # A machine token acts only for its own project and as its own machine.
    assert ask(client, who="machine:other:m1").status_code == 403
    assert ask(client, machine="m2").status_code == 403

    attempts = TransactionLog(platform.root.financial("demo") / "transactions.json").entries()
    assert [a["reason"] for a in attempts] == [
        "no_free_alternative",
        "no_free_alternative",
        "unknown_currency",
        "machine_allowance",
        "project_budget",
        "no_free_alternative",
    ]
    assert all(a["status"] == "refused" for a in attempts)
    assert Ledger.of(platform.root, "demo").spent() == 0


def test_sandbox_charges_are_booked_apart(setup: tuple[TestClient, Platform]) -> None:
    client, platform = setup
    r = ask(client, agent="aider")  # no destination: the card first, here the sandbox's
    assert r.status_code == 201, r.text
    entry = r.json()
    assert entry["status"] == "completed"
    assert entry["method"] == "card"  # card before the preferred crypto before other crypto
    assert entry["receipt"].startswith("sandbox-") and entry["charged"] is False

    ledger = Ledger.of(platform.root, "demo")
    assert bean_check(ledger.path) == []
    assert ledger.spent() == 0 and ledger.remaining() == Decimal("100")
    text = ledger.text()
    assert "Expenses:Sandbox:Dataset-license  10.000000 CAD" in text
    assert "Equity:Sandbox  -10.000000 CAD" in text
    assert f'payment: "{entry["id"]}"' in text
    store = platform.counters()
    try:  # nothing moved: settled at zero
        assert store.remaining(project_scope("demo")) == Decimal("100")
        assert store.remaining(machine_scope("demo", "m1")) == Decimal("30")
    finally:
        store.close()
    out = CliRunner().invoke(ledger_app, ["pnl", "demo"])
    assert out.exit_code == 0 and "10.00" not in out.output, out.output


def test_crypto_payment_moves_money_once_with_its_fee(
    setup: tuple[TestClient, Platform], chain: DevChain
) -> None:
    client, platform = setup
    shop = new_wallet()
    r = ask(client, agent="aider", pay_to=shop)
    assert r.status_code == 201, r.text
    entry = r.json()
    assert (entry["status"], entry["method"], entry["charged"]) == ("completed", "usdc", True)
    assert chain.tokens_of(shop) == Decimal("7.246377")  # 10 CAD / 1.38 per USD, 1 USDC per USD
    mined = chain.receipt(entry["receipt"])
    assert mined["status"] == 1 and mined["to"] == chain.token_address
    fee_eth = Decimal(mined["gasUsed"] * mined["effectiveGasPrice"]).scaleb(-18)
    assert Decimal(entry["fee"]) == fee_eth and entry["fee_currency"] == "ETH"
    fee = Decimal(entry["fee_primary"])  # ETH at 0.0005 per USD, USD at 1.38 CAD
    assert fee == (fee_eth / Decimal("0.0005") * Decimal("1.38")).quantize(Decimal("0.000001"))
    assert entry["destination"] == f"{shop[:6]}…{shop[-4:]}"

    ledger = Ledger.of(platform.root, "demo")
    assert bean_check(ledger.path) == []
    assert ledger.spent() == Decimal("10") + fee
    text = ledger.text()
    assert "Expenses:Purchases:Dataset-license  10.000000 CAD" in text
    assert f"Expenses:Fees:Usdc  {fee:f} CAD" in text
    store = platform.counters()
    try:  # reserved with its max fee, settled at price + fee
        assert store.remaining(project_scope("demo")) == Decimal("90") - fee
        assert store.remaining(machine_scope("demo", "m1")) == Decimal("20") - fee
    finally:
        store.close()
    # The allowance now left is under 20: a 20 CAD request is refused for it.
    assert ask(client, amount="20", pay_to=shop).json()["reason"] == "machine_allowance"


def test_method_preference_without_card() -> None:
    policy = PaymentPolicy.model_validate({**POLICY, "methods": POLICY["methods"][:2]})
    assert [m.name for m in policy.preferred_methods()] == ["usdc", "btc"]


def test_approval_flow(setup: tuple[TestClient, Platform], chain: DevChain) -> None:
    client, platform = setup
    shop = new_wallet()
    r = ask(client, amount="20", currency="USD", pay_to=shop)  # 27.60 CAD: above 25 CAD
    assert r.status_code == 202, r.text
    pending = r.json()
    assert pending["status"] == "pending_approval"
    assert pending["amount_primary"] == "27.600000"
    ledger = Ledger.of(platform.root, "demo")
    assert ledger.spent() == 0

    # Approved by the operator, it is paid then: the allowance (30 CAD) covers it.
    out = CliRunner().invoke(payments_app, approve_args(pending["id"]))
    assert out.exit_code == 0, out.output
    paid = TransactionLog(log_of(platform)).latest(pending["id"])
    assert paid is not None and paid["status"] == "completed"
    assert ledger.spent() == Decimal("27.6") + Decimal(paid["fee_primary"])
    assert chain.tokens_of(shop) == Decimal("20")
    assert bean_check(ledger.path) == []


def test_approve_executes_a_pending_payment(setup: tuple[TestClient, Platform]) -> None:
    client, platform = setup
    shop = new_wallet()
    paid = ask(client, amount="18", currency="USD", pay_to=shop).json()  # 24.84 CAD: below 25
    assert paid["status"] == "completed"
    pending = ask(client, who="operator", amount="26", pay_to=shop).json()
    assert pending["status"] == "pending_approval"

    out = CliRunner().invoke(payments_app, approve_args(pending["id"]))
    assert out.exit_code == 0, out.output
    assert "completed" in out.output
    again = CliRunner().invoke(payments_app, approve_args(pending["id"]))
    assert again.exit_code == 1
    assert "is completed, not pending_approval" in again.output

    ledger = Ledger.of(platform.root, "demo")
    assert bean_check(ledger.path) == []
    attempts = TransactionLog(platform.root.financial("demo") / "transactions.json").entries()
    fees = sum(Decimal(a["fee_primary"]) for a in attempts if a["status"] == "completed")
    assert fees > 0 and ledger.spent() == Decimal("50.84") + fees
    assert [(a["status"], a.get("approved_by")) for a in attempts] == [
        ("completed", None),
        ("pending_approval", None),
        ("completed", "operator"),
    ]
    assert attempts[1]["id"] == attempts[2]["id"]


def test_no_configured_method_is_refused(setup: tuple[TestClient, Platform]) -> None:
    _, platform = setup
    broker = Broker(
        platform.root,
        PaymentPolicy.model_validate({**POLICY, "methods": []}),
        counters=platform.counters,
        fx=platform.catalog.prices.fx,
    )
    request = PaymentRequest(
        item="x",
        amount=Decimal(1),
        currency="CAD",
        justification="y",
        free_alternatives_considered=["z"],
    )
    entry = broker.submit(request, Requester("demo", "m1"))
    assert (entry["status"], entry["reason"]) == ("refused", "no_method")
    log = json.loads((platform.root.financial("demo") / "transactions.json").read_text())
    assert log[-1]["id"] == entry["id"]


def test_revenue_api_and_csv_import(setup: tuple[TestClient, Platform], tmp_path: Path) -> None:
    client, platform = setup
    # Income dated before the ledger was opened: its accounts open on that date.
    csv_file = tmp_path / "revenue.csv"
    csv_file.write_text(
        "date,source,amount,currency,description\n"
        "2025-03-01,consulting,100.00,CAD,March invoice\n"
        "2025-03-02,bug bounty,10,EUR,\n"
    )
    out = CliRunner().invoke(ledger_app, ["revenue", "import", str(csv_file), "--project", "demo"])
    assert out.exit_code == 0, out.output
    again = CliRunner().invoke(
        ledger_app, ["revenue", "import", str(csv_file), "--project", "demo"]
    )
    assert again.output.count("already posted") == 2

    body = {
        "project": "demo",
        "source": "bug bounty",
        "amount": "50",
        "currency": "USD",
        "id": "b1",
    }
    r = client.post("/v1/revenue", json=body)
    assert (r.status_code, r.json()) == (201, {"id": "b1", "project": "demo", "posted": True})
    assert client.post("/v1/revenue", json=body).json()["posted"] is False  # idempotent
    r = client.post("/v1/revenue", json=body, headers={"X-Principal": "machine:other:m1"})
    assert r.status_code == 403
    r = client.post("/v1/projects/demo/revenue", json={**body, "project": None, "id": "b2"})
    assert r.json() == {"id": "b2", "project": "demo", "posted": True}

    ledger = Ledger.of(platform.root, "demo")
    assert bean_check(ledger.path) == []
    text = ledger.text()
    assert "Income:Revenue:Consulting  -100.000000 CAD" in text
    assert "Income:Revenue:Bug-bounty  -69.000000 CAD" in text  # 50 USD × 1.38
    assert "Income:Revenue:Bug-bounty  -15.000000 CAD" in text  # 10 EUR / 0.92 × 1.38
    out = CliRunner().invoke(ledger_app, ["pnl", "demo"])
    assert out.exit_code == 0, out.output
    assert "253.00" in out.output  # 100 + 15 + 69 + 69


# -- sensitive fields encrypted at rest ------------------------------------------------------

WALLET = "0x52908400098527886E0F7030069857D2E4169EE7"


def log_of(platform: Platform) -> Path:
    return platform.root.financial("demo") / "transactions.json"


def test_destination_and_receipt_are_encrypted_at_rest(setup: tuple[TestClient, Platform]) -> None:
    client, platform = setup
    r = ask(client, pay_to=WALLET)
    assert r.status_code == 201, r.text
    paid = r.json()
    assert paid["receipt"].startswith("0x")  # the requester sees its own receipt (a tx hash)
    assert json.loads(paid["evidence"])["tx_hash"] == paid["receipt"]
    assert paid["pay_to"].startswith("avf:v1:")  # and its destination as it is kept

    raw = log_of(platform).read_text()
    assert WALLET not in raw and paid["receipt"] not in raw
    stored = TransactionLog(log_of(platform)).entries()[-1]
    assert stored["pay_to"].startswith("avf:v1:") and stored["receipt"].startswith("avf:v1:")
    assert stored["evidence"].startswith("avf:v1:")
    # What an auditor needs stays readable.
    assert (stored["item"], stored["amount"], stored["currency"], stored["status"]) == (
        "Dataset license", "10.00", "CAD", "completed",
    )  # fmt: skip
    assert stored["justification"] == "needed to run the benchmark"
    assert paid["receipt"] not in Ledger.of(platform.root, "demo").text()

    broker = payments_api_broker(platform)
    revealed = broker.history(paid["id"], reveal=True)[-1]
    assert revealed == paid | {"pay_to": WALLET}
    assert masked(stored)["pay_to"] == masked(stored)["receipt"] == "[encrypted]"
    assert [e["pay_to"] for e in broker.history()] == ["[encrypted]"]


class Recording:
    """A payment method that keeps what it was asked to charge."""

    charges: ClassVar[list[Charge]] = []

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> Recording:
        return cls()

    def charge(self, charge: Charge, secrets: Any, secret_path: str | None) -> Receipt:
        self.charges.append(charge)
        return Receipt(receipt_id=f"rec-{len(self.charges)}", charged=True)


def test_only_the_charge_sees_the_decrypted_destination(
    setup: tuple[TestClient, Platform], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, platform = setup
    monkeypatch.setitem(methods.ADAPTERS, "recording", f"{__name__}:Recording")
    monkeypatch.setattr(Recording, "charges", [])
    policy = {**POLICY, "methods": [{"name": "w", "kind": "crypto", "adapter": "recording"}]}
    (platform.settings.configs / "payments.yaml").write_text(yaml.safe_dump(policy))
    pending = ask(client, amount="26", pay_to=WALLET).json()
    assert pending["status"] == "pending_approval"
    assert WALLET not in log_of(platform).read_text()

    out = CliRunner().invoke(payments_app, approve_args(pending["id"]))
    assert out.exit_code == 0, out.output
    assert [(c.payment_id, c.pay_to) for c in Recording.charges] == [(pending["id"], WALLET)]
    raw = log_of(platform).read_text()
    assert WALLET not in raw and "rec-1" not in raw


def test_plaintext_files_from_before_still_load(setup: tuple[TestClient, Platform]) -> None:
    _, platform = setup
    old = {
        "project": "demo", "machine": "m1", "agent": None, "item": "Old license",
        "amount": "5.00", "currency": "CAD", "justification": "j",
        "free_alternatives_considered": ["none"], "amount_primary": "5.000000",
        "primary_currency": "CAD", "method": "card", "reason": None, "detail": None,
        "at": "2025-01-01T00:00:00+00:00",
    }  # fmt: skip
    receipt = "sandbox-0123456789abcdef"
    log_of(platform).parent.mkdir(parents=True, exist_ok=True)
    log_of(platform).write_text(
        json.dumps(
            [
                {**old, "id": "pay_old1", "status": "completed", "receipt": receipt},
                {**old, "id": "pay_old2", "status": "pending_approval"},
            ]
        )
    )
    broker = payments_api_broker(platform)
    assert broker.history("pay_old1")[0]["receipt"] == "san…cdef"  # masked, not encrypted
    assert broker.history("pay_old1", reveal=True)[0]["receipt"] == receipt
    paid = broker.approve("demo", "pay_old2")
    assert paid["status"] == "completed"
    entries = TransactionLog(log_of(platform)).entries()
    assert entries[0]["receipt"] == receipt  # old entries are left as they were
    assert entries[-1]["receipt"].startswith("avf:v1:")


class BrokenCipher:
    def encrypt(self, context: str, plaintext: str) -> str:
        raise FieldCipherError(f"transit key for {context!r} is unreachable")

    def decrypt(self, context: str, token: str) -> str:
        raise FieldCipherError(f"transit key for {context!r} is unreachable")


def test_no_cipher_no_payment_to_an_unrecorded_destination(
    setup: tuple[TestClient, Platform],
) -> None:
    _, platform = setup
    broker = payments_api_broker(platform, fields=BrokenCipher)
    request = PaymentRequest(
        item="x", amount=Decimal(1), currency="CAD", justification="y",
        free_alternatives_considered=["z"], pay_to=WALLET,
    )  # fmt: skip
    refused = broker.submit(request, Requester("demo", "m1"))
    assert (refused["status"], refused["reason"]) == ("refused", "fields_unavailable")
    # Without a destination the payment goes through; the receipt it could not encrypt is
    # left out of the log rather than written in plain, and the attempt is still recorded.
    paid = broker.submit(request.model_copy(update={"pay_to": None}), Requester("demo", "m1"))
    assert paid["status"] == "completed"
    entries = TransactionLog(log_of(platform)).entries()
    assert [(e["status"], e["pay_to"], e.get("receipt")) for e in entries] == [
        ("refused", None, None),
        ("completed", None, None),
    ]
    assert "receipt not recorded: transit key for 'payments'" in entries[-1]["detail"]
    assert WALLET not in log_of(platform).read_text()


@pytest.mark.skipif(
    not hasattr(ledger_cli, "show"), reason="`payments ls/show` need the ledger/cli.py change"
)
def test_payments_cli_masks_unless_reveal(setup: tuple[TestClient, Platform]) -> None:
    client, _ = setup
    paid = ask(client, pay_to=WALLET).json()
    out = CliRunner().invoke(payments_app, ["ls"])
    assert out.exit_code == 0, out.output
    assert paid["id"] in out.output and "pay_to=[encrypted]" in out.output
    assert "why: needed to run the benchmark" in out.output
    assert "free alternatives: public mirror (outdated)" in out.output
    assert WALLET not in out.output and paid["receipt"] not in out.output
    out = CliRunner().invoke(payments_app, ["show", paid["id"]])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)[-1]["receipt"] == "[encrypted]"
    out = CliRunner().invoke(payments_app, ["show", paid["id"], "--reveal"])
    shown = json.loads(out.output)[-1]
    assert (shown["pay_to"], shown["receipt"]) == (WALLET, paid["receipt"])
    out = CliRunner().invoke(payments_app, ["ls", "--project", "demo", "--reveal"])
    assert f"pay_to={WALLET}" in out.output
    assert CliRunner().invoke(payments_app, ["show", "pay_nope"]).exit_code == 1


def payments_api_broker(platform: Platform, **options: Any) -> Broker:
    return Broker(
        platform.root,
        PaymentPolicy.load(platform.settings.configs / "payments.yaml"),
        counters=platform.counters,
        fx=platform.catalog.prices.fx,
        **options,
    )
