"""The installed agents run a task against a cloud model through the real mitmdump, by the
provider's real host name, and only the proxy holds the key (issue 20).

claude-code calls `anthropic/claude-sonnet-4-5` at api.anthropic.com (Messages, streamed);
aider, mini-swe-agent and qwen-code call `openai/gpt-4.1-mini` at api.openai.com (chat
completions). Each runs in bubblewrap as the runner runs it, with what the scheduler gives a
worker for that model (`Catalog.endpoint`: the provider's URL, its model name, the placeholder
key) and the proxy as its only way out. mitmdump runs in a mount namespace whose /etc/hosts
sends both names to the TLS stand-in (`provider_stand_ins`), which answers the first calls with
the provider's documented 429 (and Anthropic's 529 overloaded), then with its usage.

For each agent: the stand-in received the provider's real key on every call and the agent
retried past the errors; the key is nowhere in the worker's environment, command line or files
(workspace, HOME, transcript, logs); and the project's spend equals the stand-in's reported
usage priced from configs/prices.yaml, to the micro-dollar (so to the cent), the errors free.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from provider_stand_ins import ANTHROPIC_USAGE, CHAT_USAGE, ProviderStandIn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "workers"))
from agents_harness import agent_run, installed, run_sandboxed
from worker_harness import (
    EXAMPLES,
    MeteringProxy,
    proxy_to_providers,
    settled_counters,
    throwaway_certificate,
)

from budget import from_micro, to_micro
from contracts.config import PriceCatalog, load_prices
from contracts.dataroot import DataRoot
from contracts.settings import PROJECT_ROOT
from orchestrator.catalog import Catalog
from workers import workspace
from workers.agents.aider import AiderAgent, AiderConfig
from workers.agents.base import Agent
from workers.agents.claude_code import ClaudeCodeAgent, ClaudeConfig
from workers.agents.mini_swe_agent import MiniConfig, MiniSweAgent
from workers.agents.qwen_code import QwenCodeAgent, QwenConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None,
        reason="a private /etc/hosts for mitmdump needs root and unshare",
    ),
]

NAMES = ("api.anthropic.com", "api.openai.com")
KEYS = {"anthropic": "sk-ant-api03-real-agent-key-0000", "openai": "sk-proj-real-agent-key-1111"}
MODEL_CALLS = ("/v1/messages", "/v1/chat/completions")


@dataclass(frozen=True)
class Stack:
    proxy: MeteringProxy
    cloud: ProviderStandIn
    catalog: Catalog
    prices: PriceCatalog

    def spent(self) -> Decimal:
        spent, reserved = settled_counters(self.proxy.root)
        assert reserved == 0, "a reservation was left open"
        return spent


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    address = f"127.79.{os.getpid() % 250}.1"
    ca, server_pem = throwaway_certificate(tmp_path_factory.mktemp("ca"), address, NAMES)
    cloud = ProviderStandIn(address, server_pem, retry_after="1")
    try:
        with proxy_to_providers(
            tmp_path_factory.mktemp("cloud-agents"), address, NAMES, ca, KEYS
        ) as proxy:
            yield Stack(
                proxy, cloud, Catalog.load(proxy.settings), load_prices(PROJECT_ROOT / "configs")
            )
    finally:
        cloud.stop()


def claude(root: Path) -> Agent:
    return ClaudeCodeAgent(root, ClaudeConfig(max_turns=2, max_output_tokens=64))


def qwen(root: Path) -> Agent:
    return QwenCodeAgent(root, QwenConfig(max_turns=2, max_tokens=64))


def aider(root: Path) -> Agent:
    return AiderAgent(root, AiderConfig(max_tokens=64))


def mini(root: Path) -> Agent:
    return MiniSweAgent(root, MiniConfig(step_limit=1, max_tokens=64))


CASES = [
    # agent, its adapter, the model, the errors the stand-in answers its first calls with
    ("claude-code", claude, "anthropic/claude-sonnet-4-5", ["overloaded", "rate_limited"]),
    ("qwen-code", qwen, "openai/gpt-4.1-mini", ["rate_limited"]),
    ("aider", aider, "openai/gpt-4.1-mini", ["rate_limited"]),
    ("mini-swe-agent", mini, "openai/gpt-4.1-mini", ["rate_limited"]),
]
STATUS = {"overloaded": 529, "rate_limited": 429}


def usage_cost(prices: PriceCatalog, provider: str, model: str) -> Decimal:
    """What one of the stand-in's answers costs: the usage it reports, priced."""
    if provider == "anthropic":
        u: dict[str, Any] = ANTHROPIC_USAGE
        cost = prices.cost_usd(
            provider, model, u["input_tokens"] + u["cache_creation_input_tokens"]
            + u["cache_read_input_tokens"], u["output_tokens"],
            cache_read=u["cache_read_input_tokens"], cache_write=u["cache_creation_input_tokens"],
        )  # fmt: skip
    else:
        u = CHAT_USAGE
        cost = prices.cost_usd(provider, model, u["prompt_tokens"], u["completion_tokens"])
    assert cost is not None and cost > 0
    return cost


def files_holding(folder: Path, secrets: list[bytes]) -> list[Path]:
    """Files under `folder` (symlinks not followed) whose bytes hold one of `secrets`."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(secret in data for secret in secrets):
                found.append(path)
    return found


@pytest.mark.parametrize(("name", "adapter", "model", "errors"), CASES, ids=[c[0] for c in CASES])
def test_an_agent_runs_a_task_against_a_cloud_model_and_never_holds_its_key(
    stack: Stack,
    tmp_path: Path,
    name: str,
    adapter: Any,
    model: str,
    errors: list[str],
) -> None:
    provider, _, upstream = model.partition("/")
    root = DataRoot.at(tmp_path / "data")
    installed(name, root.root)
    agent: Agent = adapter(root.root)
    endpoint, worker_model = stack.catalog.endpoint(model)
    assert endpoint.startswith(f"https://api.{provider}.com") and worker_model == upstream
    artifacts = root.assignment_dir("p1", "t1", f"a-{name}")
    workspace.prepare(EXAMPLES / "mathkit", artifacts / "workspace")
    run = agent_run(
        artifacts / "workspace", artifacts, endpoint=endpoint, model=worker_model, timeout_s=180
    )
    secrets = [secret.encode() for secret in KEYS.values()]
    argv = agent.command(run)
    assert not any(secret.decode() in arg for arg in argv for secret in secrets)
    assert not any(secret.decode() in v for v in os.environ.values() for secret in secrets)

    spent_before = stack.spent()
    seen = len(stack.cloud.seen)
    stack.cloud.script[:] = errors
    outcome, log_text = run_sandboxed(agent, run, stack.proxy, root)
    spent = stack.spent() - spent_before

    calls = [c for c in stack.cloud.seen[seen:] if c["path"].partition("?")[0] in MODEL_CALLS]
    assert not stack.cloud.script, f"the agent made fewer calls than the errors: {log_text}"
    statuses = [c["status"] for c in calls]
    assert statuses[: len(errors)] == [STATUS[e] for e in errors], (statuses, log_text)
    assert 200 in statuses[len(errors) :], f"{name} did not retry past {errors}: {log_text}"
    # Every call reached the provider with its real key, and only as the provider wants it.
    for call in calls:
        headers = {k.lower(): v for k, v in call["headers"].items()}
        assert json.loads(call["body"])["model"] == upstream
        if provider == "anthropic":
            assert headers["x-api-key"] == KEYS["anthropic"] and "authorization" not in headers
        else:
            assert headers["authorization"] == f"Bearer {KEYS['openai']}"
    # The stand-in's answer edits nothing: the agent ends on its own, its task unsolved.
    assert outcome.exit_cause == "finished", (outcome, log_text)

    # The key is nowhere the worker could see or leave it: not in its files, nor in its log.
    assert files_holding(artifacts, secrets) == []
    assert not any(secret.decode() in log_text for secret in secrets)

    # Spend: the stand-in's reported usage, priced; the errors cost nothing.
    records = stack.proxy.spooled(f"a-{name}")
    metered = [r for r in records if r.path.partition("?")[0] in MODEL_CALLS]
    assert sorted(r.status for r in metered) == sorted(statuses)
    assert all(r.provider == provider and r.model == upstream for r in metered)
    assert all(r.cost_usd == 0 for r in metered if r.status != 200)
    ok = statuses.count(200)
    one = usage_cost(stack.prices, provider, upstream)
    assert sum((r.cost_usd for r in metered), Decimal(0)) == one * ok
    assert spent == from_micro(to_micro(one)) * ok
    assert spent.quantize(Decimal("0.01")) == (one * ok).quantize(Decimal("0.01"))
