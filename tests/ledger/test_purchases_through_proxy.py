"""An agent buys through the real proxy: a scripted worker client, the real mitmdump with our
addons, the real control API under uvicorn, the real broker paying USDC on a py-evm chain.

The worker reaches the broker by name (`http://broker.autovibe/…`, as its environment names it)
with the credential it holds for the proxy as its bearer token. Machine m1 (25 USD a day) buys
twice and is refused the third time for its daily allowance; machine m2 splits a purchase into
two under the approval threshold, and the second part waits for the operator.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from budget import machine_scope, open_counters, project_scope
from contracts.credentials import MachineIdentity, mint, proxy_url
from contracts.dataroot import DataRoot
from contracts.egress import payments_url
from contracts.reports import TrialHead
from contracts.settings import PROJECT_ROOT, Settings, free_port
from ledger.book import Ledger
from ledger.check import bean_check
from ledger.cli import payments_app
from ledger.payments import PaymentPolicy, TransactionLog, purchases_preamble
from orchestrator.platform import Platform
from orchestrator.report import purchase_note, purchases_of, summarize
from secretstore import store_from_env
from tests.budget.budget_harness import Proxy
from tests.ledger.broker_harness import broker_behind_proxy
from tests.ledger.chain_harness import DevChain, new_wallet
from workers import netns, sandbox
from workers.spec import AssignmentSpec, SandboxSpec

THRESHOLD = "25"


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    chain = DevChain(coin="1", tokens="500")
    configs = tmp_path / "configs"
    shutil.copytree(PROJECT_ROOT / "configs", configs)
    policy = {
        "require_free_alternatives": True,
        "approval_threshold": THRESHOLD,
        "preferred_crypto": "USDC",
        "asset_rates": {"USDC": "1", "ETH": "0.0005"},
        "methods": [chain.method("usdc", "USDC", token=True)],
    }
    (configs / "payments.yaml").write_text(yaml.safe_dump(policy))
    data = tmp_path / "data"
    settings = Settings(data=data, configs=configs, host="127.0.0.1", api_port=free_port())
    for name, value in settings.as_env().items():
        monkeypatch.setenv(name, value)
    store_from_env(settings=settings).put("wallets/eth", chain.payer_key)
    # Also a transparent listener, for workers in network namespaces (one test uses it).
    transparent_port = free_port()
    allowances = {"m1": Decimal(25), "m2": Decimal(100)}
    with broker_behind_proxy(settings, allowances, transparent_port=transparent_port) as proxy:
        yield {
            "chain": chain,
            "proxy": proxy,
            "root": DataRoot.at(data),
            "settings": settings,
            "transparent_port": transparent_port,
        }


def agent(proxy: Proxy, machine: str) -> tuple[httpx.Client, str]:
    """A worker's HTTP client (its HTTP_PROXY) and its credential, for assignment a-<machine>."""
    identity = MachineIdentity(
        project="demo", trial="t1", assignment=f"a-{machine}", machine=machine,
        expires=time.time() + 3600,
    )  # fmt: skip
    credential = mint(proxy.key, identity)
    client = httpx.Client(proxy=proxy.url(identity), trust_env=False, timeout=60)
    return client, credential


def buy(client: httpx.Client, credential: str, amount: str, pay_to: str, **extra: Any) -> Any:
    body = {
        "item": "Weather API",
        "amount": amount,
        "currency": "USDC",
        "justification": "historical data the task needs",
        "free_alternatives_considered": ["the free tier stops at 2020"],
        "pay_to": pay_to,
        **extra,
    }
    return client.post(
        payments_url("demo"), json=body, headers={"Authorization": f"Bearer {credential}"}
    )


@pytest.mark.slow  # a mitmdump, an API and a chain: ~6 s on 2 loaded cores
def test_an_agent_buys_through_the_proxy(stack: dict[str, Any]) -> None:
    chain, proxy, root = stack["chain"], stack["proxy"], stack["root"]
    shop = new_wallet()
    m1, token1 = agent(proxy, "m1")
    with m1:
        first = buy(m1, token1, "10", shop)
        assert first.status_code == 201, first.text
        second = buy(m1, token1, "10", shop)
        assert second.status_code == 201, second.text
        third = buy(m1, token1, "10", shop)
        assert third.status_code == 402, third.text
        assert third.json()["reason"] == "machine_allowance"
        # The body's machine is not believed: the credential's is charged.
        assert buy(m1, token1, "1", shop, machine="m2").status_code == 403
        # The proxy opens one door: no other path, and not without the credential.
        other = m1.get("http://broker.autovibe/v1/trials")
        assert (other.status_code, other.json()["error"]) == (403, "broker_refused")
        assert buy(m1, "not-a-credential", "1", shop).status_code == 401
    assert chain.tokens_of(shop) == Decimal(20)
    for paid in (first.json(), second.json()):
        assert chain.receipt(paid["receipt"])["status"] == 1
        assert paid["machine"] == "m1" and paid["method"] == "usdc"

    m2, token2 = agent(proxy, "m2")
    with m2:
        part1 = buy(m2, token2, "15", shop)
        assert part1.status_code == 201, part1.text
        part2 = buy(m2, token2, "15", shop)  # 30 today: above the 25 threshold
        assert part2.status_code == 202, part2.text
        assert part2.json()["status"] == "pending_approval"
        assert "(15.000000 already today)" in part2.json()["detail"]
    assert chain.tokens_of(shop) == Decimal(35)

    log = TransactionLog(root.financial("demo") / "transactions.json").entries()
    assert [(e["machine"], e["status"], e["reason"]) for e in log] == [
        ("m1", "completed", None),
        ("m1", "completed", None),
        ("m1", "refused", "machine_allowance"),
        ("m2", "completed", None),
        ("m2", "pending_approval", None),
    ]
    fees_m1 = sum(Decimal(e["fee_primary"]) for e in log[:2])
    left = Decimal(25) - Decimal(20) - fees_m1
    assert third.json()["detail"] == f"machine:demo:m1 has {left:f} USD left"
    ledger = Ledger.of(root, "demo")
    assert bean_check(ledger.path) == []
    fees = sum(Decimal(e["fee_primary"]) for e in log if e["status"] == "completed")
    assert ledger.spent() == Decimal(35) + fees
    store = open_counters("sqlite", path=root.budget_counters)
    try:  # reserved and settled like model calls: what was paid, fees included
        assert store.spent(machine_scope("demo", "m1")) == Decimal(20) + fees_m1
        assert store.describe(project_scope("demo")).reserved == 0  # type: ignore[union-attr]
    finally:
        store.close()

    # The trial report lists them, each in its latest state, with the reason and the free
    # alternative its agent gave (the credential said which trial and assignment asked).
    assert {(e["trial"], e["assignment"]) for e in log} == {("t1", "a-m1"), ("t1", "a-m2")}
    platform = Platform.from_settings(stack["settings"])
    purchases = purchases_of(platform, "demo", "t1")
    assert [(p.assignment, p.status, str(p.amount)) for p in purchases] == [
        ("a-m1", "completed", "10"),
        ("a-m1", "completed", "10"),
        ("a-m1", "refused", "10"),
        ("a-m2", "completed", "15"),
        ("a-m2", "pending_approval", "15"),
    ]
    assert purchases_of(platform, "demo", "another-trial") == []
    head = TrialHead(id="t1", name="t", project="demo", status="running", currency="USD",
                     created_at="2026-01-01T00:00:00Z", finished_at=None)  # fmt: skip
    lines = purchase_note(summarize(head, [], lambda usd: usd, purchases=purchases))
    assert lines[0] == (
        f"Purchase {log[0]['id']} (m1): Weather API, 10 USDC, completed by usdc; "
        "why: historical data the task needs; free alternatives: the free tier stops at 2020"
    )

    # The agent looks at its held purchase, the operator approves it, the agent sees it paid.
    held = part2.json()["id"]
    m2, token2 = agent(proxy, "m2")
    m1, token1 = agent(proxy, "m1")
    url = f"{payments_url('demo')}/{held}"
    with m1, m2:
        look = m2.get(url, headers={"Authorization": f"Bearer {token2}"})
        assert (look.status_code, look.json()["status"]) == (200, "pending_approval")
        approved = CliRunner().invoke(payments_app, ["approve", held])
        assert approved.exit_code == 0, approved.output
        look = m2.get(url, headers={"Authorization": f"Bearer {token2}"})
        assert (look.status_code, look.json()["status"]) == (200, "completed")
        # Another machine's purchase is not its business.
        assert m1.get(url, headers={"Authorization": f"Bearer {token1}"}).status_code == 404
    assert chain.tokens_of(shop) == Decimal(50)


def test_the_preamble_tells_how_to_buy() -> None:
    policy = PaymentPolicy.load(PROJECT_ROOT / "configs" / "payments.yaml")
    text = purchases_preamble(policy)
    assert "$AUTOVIBE_PAYMENTS_URL" in text and "$AUTOVIBE_MACHINE_TOKEN" in text
    assert "free_alternatives_considered" in text
    assert f"above {policy.approval_threshold:f}" in text
    assert purchases_preamble(PaymentPolicy(approval_threshold=Decimal(1))) == ""


BUYER = """
import json, os, urllib.request
request = urllib.request.Request(
    os.environ["AUTOVIBE_PAYMENTS_URL"],
    data=json.dumps({
        "item": "Weather API", "amount": "5", "currency": "USDC",
        "justification": "historical data the task needs",
        "free_alternatives_considered": ["the free tier stops at 2020"],
        "pay_to": os.environ["SHOP"],
    }).encode(),
    headers={"Authorization": "Bearer " + os.environ["AUTOVIBE_MACHINE_TOKEN"],
             "Content-Type": "application/json"},
)
try:
    with urllib.request.urlopen(request, timeout=60) as reply:
        print(json.dumps({"code": reply.status, **json.load(reply)}))
except urllib.error.HTTPError as exc:
    print(json.dumps({"code": exc.code, "body": exc.read().decode()}))
"""


@pytest.mark.slow  # the stack, then the runner with bubblewrap and the proxy bridge: ~10 s
def test_a_sandboxed_agent_buys_with_what_the_scheduler_gives_it(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    """The `command` agent in bubblewrap, with only the variables the sandbox lets through,
    asks the broker by name through its bridged proxy and is paid for."""
    sandbox.require_tools()
    proxy, root, chain = stack["proxy"], stack["root"], stack["chain"]
    identity = MachineIdentity(
        project="demo", trial="t2", assignment="a-sandboxed", machine="m2",
        expires=time.time() + 600,
    )  # fmt: skip
    credential = mint(proxy.key, identity)
    through = proxy_url("127.0.0.1", proxy.settings.proxy_port, "m2", credential)
    shop = new_wallet()
    buyer = tmp_path / "buyer.py"
    buyer.write_text(BUYER.replace('os.environ["SHOP"]', repr(shop)))
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("a task\n")
    artifacts = DataRoot.ensure(root.assignment_dir("demo", "t2", "a-sandboxed"))
    spec = AssignmentSpec(
        assignment="a-sandboxed", project="demo", trial="t2", machine="m2", task_id="buy",
        repo=repo, prompt="buy", test_command="true", fail_to_pass=["x"], pass_to_pass=[],
        timeout_s=60, agent="command", agent_command=[sys.executable, str(buyer)],
        model="tiny", endpoint="http://127.0.0.1:9/v1",
        env={
            "HTTP_PROXY": through, "http_proxy": through,
            "AUTOVIBE_PAYMENTS_URL": payments_url("demo"),
            "AUTOVIBE_MACHINE_TOKEN": credential,
            "AUTOVIBE_ASSIGNMENT": "a-sandboxed",
        },
        artifacts=artifacts, data_root=root.root,
        sandbox=SandboxSpec(
            proxy_host="127.0.0.1", proxy_port=proxy.settings.proxy_port, memory_mb=1024,
            cpus=1.0, hidden=[root.root], read_only=[buyer],
        ),
    )  # fmt: skip
    (artifacts / "spec.json").write_text(spec.model_dump_json())
    subprocess.run(
        [sys.executable, "-m", "workers.runner", str(artifacts / "spec.json")],
        capture_output=True, timeout=180, check=False,
    )  # fmt: skip
    log = (artifacts / "agent.log").read_text(errors="replace")
    replies = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert replies and replies[-1]["code"] == 201, log
    assert (replies[-1]["status"], replies[-1]["assignment"]) == ("completed", "a-sandboxed")
    assert chain.tokens_of(shop) == Decimal(5)


def _no_namespaces() -> str | None:
    try:
        netns.require()
    except netns.NetnsUnavailable as exc:
        return str(exc)
    return None


@pytest.mark.slow  # the stack and a network namespace: ~8 s
@pytest.mark.skipif(_no_namespaces() is not None, reason=f"no transparent mode: {_no_namespaces()}")
def test_a_transparent_worker_buys_at_the_brokers_address(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    """A worker in its own network namespace (no proxy variables, every connection taken by
    the transparent listener) asks at the broker's address through its gateway, as the
    scheduler gives it, and is paid; the rest of the control API stays out of reach."""
    proxy, root, chain, settings = stack["proxy"], stack["root"], stack["chain"], stack["settings"]
    identity = MachineIdentity(
        project="demo", trial="t3", assignment="a-transparent-buyer", machine="m2",
        expires=time.time() + 600,
    )  # fmt: skip
    credential = mint(proxy.key, identity)
    shop = new_wallet()
    code = BUYER.replace('os.environ["SHOP"]', repr(shop)) + (
        "\ntry:\n"
        "    urllib.request.urlopen(os.environ['AUTOVIBE_PAYMENTS_URL'].split('/v1/')[0]"
        " + '/v1/trials', timeout=30)\n"
        "except urllib.error.HTTPError as exc:\n"
        "    print(json.dumps({'code': exc.code, 'body': exc.read().decode()}))\n"
    )
    broker = f"{settings.host}:{settings.api_port}"
    with netns.transparent(
        root, identity.assignment, credential, settings.host, stack["transparent_port"]
    ) as lease:
        env = netns.worker_env(
            {
                "PATH": os.environ["PATH"],
                "AUTOVIBE_PAYMENTS_URL": payments_url("demo", broker),
                "AUTOVIBE_MACHINE_TOKEN": credential,
            },
            lease,
            settings.host,
        )
        assert env["AUTOVIBE_PAYMENTS_URL"].startswith(f"http://{lease.gateway}:")
        done = subprocess.run(
            [*lease.exec_prefix(), sys.executable, "-c", code],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    replies = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(replies) == 2, (done.stdout, done.stderr)
    paid, elsewhere = replies
    assert (paid["code"], paid["status"]) == (201, "completed")
    assert paid["assignment"] == identity.assignment
    assert chain.tokens_of(shop) == Decimal(5)
    refusal = json.loads(elsewhere["body"])  # the rest of the API: one of this host's services
    assert elsewhere["code"] == 403 and refusal["error"] == "egress_refused"
    assert "own services" in refusal["rule"]
