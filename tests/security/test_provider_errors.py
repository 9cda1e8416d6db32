"""Provider errors through the real mitmdump, by the providers' real host names (issue 20):
the agent gets the provider's error as the provider sent it, `retry-after` and the rate-limit
headers included; the budget settles at what the provider bills (nothing for a 429, a 529
overloaded or a 500; the input and the tokens received for a stream cut mid-way, marked
estimated); and the traffic store counts the errors per provider for the trial report.

mitmdump runs in a mount namespace whose /etc/hosts sends api.anthropic.com and api.openai.com
to a TLS stand-in (`provider_stand_ins`) that answers as the providers document; the prices are
configs/prices.yaml's, and the counters are read exactly after each call.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from provider_stand_ins import (
    ANTHROPIC_USAGE,
    CHAT_USAGE,
    DELTAS_BEFORE_CUT,
    RESPONSES_USAGE,
    RETRY_AFTER,
    ProviderStandIn,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "workers"))
from worker_harness import proxy_to_providers, settled_counters, throwaway_certificate

from budget import from_micro, to_micro
from contracts.config import PriceCatalog, load_prices
from contracts.credentials import MachineIdentity, mint, proxy_url
from contracts.dataroot import DataRoot
from contracts.records import FlowRecord, Usage
from contracts.settings import PROJECT_ROOT, Settings
from traffic.sqlite_store import SqliteTrafficStore
from traffic.stores import ErrorCount, ProviderCalls

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a private /etc/hosts for mitmdump needs root and unshare",
)

NAMES = ("api.anthropic.com", "api.openai.com")
KEYS = {"anthropic": "sk-ant-real-key-for-error-tests", "openai": "sk-openai-real-key-errors"}
CLAUDE, GPT = "claude-sonnet-4-5", "gpt-4.1-mini"
ANTHROPIC_HEADERS = {"x-api-key": "placeholder", "anthropic-version": "2023-06-01"}
OPENAI_HEADERS = {"Authorization": "Bearer placeholder"}


@dataclass(frozen=True)
class Stack:
    root: DataRoot
    settings: Settings
    key: bytes
    cloud: ProviderStandIn
    prices: PriceCatalog

    def client(self, assignment: str, trial: str = "t1") -> httpx.Client:
        identity = MachineIdentity(
            project="p1", trial=trial, assignment=assignment, machine="m1",
            expires=time.time() + 600,
        )  # fmt: skip
        url = proxy_url(
            self.settings.host, self.settings.proxy_port, "m1", mint(self.key, identity)
        )
        return httpx.Client(proxy=url, verify=str(self.root.ca_cert), trust_env=False, timeout=30)

    def counters(self) -> tuple[Decimal, Decimal]:
        """The project's (spent, reserved) once nothing is reserved (calls here run one at a
        time)."""
        return settled_counters(self.root)

    def spooled(self, assignment: str) -> FlowRecord:
        deadline = time.monotonic() + 5
        while True:
            found = [
                FlowRecord.model_validate_json(line)
                for path in sorted(self.root.traffic_logs.glob("*/*/flows.jsonl"))
                for line in path.read_bytes().splitlines()
                if f'"assignment":"{assignment}"' in line.decode()
            ]
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        [record] = found
        return record


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    address = f"127.78.{os.getpid() % 250}.1"
    ca, server_pem = throwaway_certificate(tmp_path_factory.mktemp("ca"), address, NAMES)
    cloud = ProviderStandIn(address, server_pem)
    try:
        with proxy_to_providers(
            tmp_path_factory.mktemp("provider-errors"), address, NAMES, ca, KEYS
        ) as proxy:
            prices = load_prices(PROJECT_ROOT / "configs")
            yield Stack(proxy.root, proxy.settings, proxy.key, cloud, prices)
    finally:
        cloud.stop()


def messages(scenario: str, *, stream: bool = False) -> dict[str, Any]:
    return {
        "model": CLAUDE,
        "max_tokens": 64,
        "stream": stream,
        "messages": [{"role": "user", "content": f"Hello, Claude (scenario:{scenario})"}],
    }


def chat(scenario: str, *, stream: bool = False) -> dict[str, Any]:
    return {
        "model": GPT,
        "max_tokens": 64,
        "stream": stream,
        "messages": [{"role": "user", "content": f"Hello! (scenario:{scenario})"}],
    }


def responses(scenario: str, *, stream: bool = False) -> dict[str, Any]:
    return {
        "model": GPT,
        "max_output_tokens": 64,
        "stream": stream,
        "input": f"Tell me a three sentence bedtime story (scenario:{scenario})",
    }


ENDPOINTS = {
    "messages": ("https://api.anthropic.com/v1/messages", ANTHROPIC_HEADERS, messages),
    "chat": ("https://api.openai.com/v1/chat/completions", OPENAI_HEADERS, chat),
    "responses": ("https://api.openai.com/v1/responses", OPENAI_HEADERS, responses),
}


def call(
    stack: Stack,
    assignment: str,
    endpoint: str,
    scenario: str,
    *,
    stream: bool = False,
    trial: str = "t1",
) -> tuple[int | None, dict[str, str], bytes, FlowRecord, Decimal]:
    """One call through the proxy: (status, headers, body as received; None and what came
    before the cut for a cut stream), its record, and what the counters spent on it."""
    url, headers, body = ENDPOINTS[endpoint]
    spent, _ = stack.counters()
    seen = len(stack.cloud.seen)
    status: int | None = None
    answer_headers: dict[str, str] = {}
    received = b""
    with stack.client(assignment, trial) as client:
        try:
            with client.stream(
                "POST", url, json=body(scenario, stream=stream), headers=headers
            ) as response:
                status, answer_headers = response.status_code, dict(response.headers)
                for piece in response.iter_raw():
                    received += piece
        except httpx.RemoteProtocolError:
            status = None  # the stream was cut: what came before it is in `received`
    [sent] = stack.cloud.seen[seen:]
    provider = "anthropic" if endpoint == "messages" else "openai"
    expected = f"Bearer {KEYS['openai']}" if provider == "openai" else KEYS["anthropic"]
    assert expected in (sent["headers"].get("Authorization"), sent["headers"].get("x-api-key"))
    record = stack.spooled(assignment)
    now_spent, reserved = stack.counters()
    assert reserved == 0, "a reservation was left open"
    return status, answer_headers, received, record, now_spent - spent


def micro(usd: Decimal) -> Decimal:
    """`usd` as the counters settle it: to the micro-dollar, half up."""
    return from_micro(to_micro(usd))


def cost(stack: Stack, provider: str, model: str, usage: Usage) -> Decimal:
    found = stack.prices.cost_usd(
        provider, model, usage.prompt_tokens, usage.completion_tokens,
        cache_read=usage.cache_read_tokens, cache_write=usage.cache_creation_tokens,
    )  # fmt: skip
    assert found is not None
    return found


# -- whole answers ---------------------------------------------------------------------------


def test_a_messages_stream_with_cache_tokens_is_billed_to_the_micro_dollar(stack: Stack) -> None:
    status, _, received, record, spent = call(stack, "ok-messages", "messages", "ok", stream=True)
    assert status == 200 and b"event: message_stop" in received
    prompt = 25 + 2051 + 1200
    assert record.usage == Usage(
        prompt_tokens=prompt, completion_tokens=15, total_tokens=prompt + 15,
        cache_creation_tokens=2051, cache_read_tokens=1200,
    )  # fmt: skip
    # 25 x 3.00 + 2051 x 3.75 + 1200 x 0.30 + 15 x 15.00, per million.
    assert record.cost_usd == Decimal("0.00835125")
    assert spent == Decimal("0.008351")  # the counters keep micro-dollars
    assert record.upstream_error is None and record.error is None


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_openai_streams_are_billed_from_their_usage(stack: Stack, endpoint: str) -> None:
    status, _, received, record, spent = call(stack, f"ok-{endpoint}", endpoint, "ok", stream=True)
    assert status == 200
    if endpoint == "chat":
        # The agent did not ask for the usage chunk: the proxy asked for it on its behalf.
        sent = json.loads(stack.cloud.seen[-1]["body"])
        assert sent["stream_options"] == {"include_usage": True}
        assert b'"prompt_tokens": 19' in received and received.endswith(b"data: [DONE]\n\n")
        prompt, completion = CHAT_USAGE["prompt_tokens"], CHAT_USAGE["completion_tokens"]
    else:
        assert json.loads(stack.cloud.seen[-1]["body"])["max_output_tokens"] == 64
        assert b"event: response.completed" in received
        prompt, completion = RESPONSES_USAGE["input_tokens"], RESPONSES_USAGE["output_tokens"]
    assert record.usage == Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
    # gpt-4.1-mini: 0.40 in, 1.60 out per million.
    expected = (Decimal("0.40") * prompt + Decimal("1.60") * completion) / 10**6
    assert record.cost_usd == expected and spent == micro(expected)
    assert record.budget_decision is not None and record.budget_decision.reserved is not None
    assert record.budget_decision.reserved > spent  # reserved for 64 output tokens


# -- error answers: nothing billed, the provider's answer passed on ---------------------------

ERRORS = [
    # endpoint, scenario, status, the error the provider named, retry-after, its other headers
    (
        "messages",
        "rate_limited",
        429,
        "rate_limit_error",
        True,
        "anthropic-ratelimit-requests-remaining",
    ),
    ("messages", "overloaded", 529, "overloaded_error", True, "request-id"),
    ("messages", "server_error", 500, "api_error", False, "request-id"),
    ("chat", "rate_limited", 429, "rate_limit_exceeded", True, "x-ratelimit-remaining-requests"),
    ("chat", "server_error", 500, "server_error", False, "x-request-id"),
    ("responses", "rate_limited", 429, "rate_limit_exceeded", True, "x-ratelimit-reset-tokens"),
]


@pytest.mark.parametrize(("endpoint", "scenario", "status", "named", "retry", "header"), ERRORS)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_error_answer_reaches_the_agent_unchanged_and_costs_nothing(
    stack: Stack,
    endpoint: str,
    scenario: str,
    status: int,
    named: str,
    retry: bool,
    header: str,
    stream: bool,
) -> None:
    assignment = f"{endpoint}-{scenario}-{'stream' if stream else 'json'}"
    got, headers, received, record, spent = call(
        stack, assignment, endpoint, scenario, stream=stream
    )
    assert got == status
    assert received == stack.cloud.seen[-1]["answer"], "the body must reach the agent unchanged"
    if retry:
        assert headers["retry-after"] == RETRY_AFTER
    assert header in headers
    error = json.loads(received)
    if endpoint == "messages":
        assert error["type"] == "error" and error["error"]["type"] == named
    else:
        assert named in (error["error"]["code"], error["error"]["type"])
    assert spent == 0 and record.cost_usd == 0 and record.usage is None
    assert record.status == status and record.upstream_error == named
    decision = record.budget_decision
    assert decision is not None and decision.action == "settled" and decision.settled == 0
    assert decision.reserved is not None and decision.reserved > 0


# -- streams that end early: billed for what was received, marked ----------------------------


def test_a_messages_stream_cut_mid_way_is_billed_for_the_tokens_received(stack: Stack) -> None:
    status, _, received, record, spent = call(stack, "cut-messages", "messages", "cut", stream=True)
    assert status is None, "the agent must see the stream cut, not a clean end"
    assert received.count(b"event: content_block_delta") == DELTAS_BEFORE_CUT
    # message_start had the exact input and cache tokens; the output is the deltas received.
    prompt = 25 + 2051 + 1200
    assert record.usage == Usage(
        prompt_tokens=prompt, completion_tokens=DELTAS_BEFORE_CUT,
        total_tokens=prompt + DELTAS_BEFORE_CUT, estimated=True,
        cache_creation_tokens=2051, cache_read_tokens=1200,
    )  # fmt: skip
    assert record.cost_usd == cost(stack, "anthropic", CLAUDE, record.usage)
    assert spent == micro(record.cost_usd) > 0
    assert record.status == 200 and record.upstream_error == "stream_cut"
    assert record.error is not None


def test_an_overloaded_error_event_mid_stream_is_billed_for_the_tokens_received(
    stack: Stack,
) -> None:
    status, _, received, record, spent = call(
        stack, "event-messages", "messages", "error_event", stream=True
    )
    assert status == 200 and b'"type": "overloaded_error"' in received
    prompt = ANTHROPIC_USAGE["input_tokens"] + 2051 + 1200
    assert record.usage is not None and record.usage.estimated
    assert (record.usage.prompt_tokens, record.usage.completion_tokens) == (
        prompt,
        DELTAS_BEFORE_CUT,
    )
    assert record.cost_usd == cost(stack, "anthropic", CLAUDE, record.usage)
    assert spent == micro(record.cost_usd) > 0
    assert record.upstream_error == "overloaded_error"


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_an_openai_stream_cut_mid_way_is_billed_for_the_tokens_received(
    stack: Stack, endpoint: str
) -> None:
    status, _, _, record, spent = call(stack, f"cut-{endpoint}", endpoint, "cut", stream=True)
    assert status is None
    # No usage came: the input is estimated from the request as forwarded, the output is one
    # token per content delta received.
    prompt = math.ceil(record.request_bytes / 4)
    assert record.usage == Usage(
        prompt_tokens=prompt, completion_tokens=DELTAS_BEFORE_CUT,
        total_tokens=prompt + DELTAS_BEFORE_CUT, estimated=True,
    )  # fmt: skip
    assert record.cost_usd == cost(stack, "openai", GPT, record.usage)
    assert spent == micro(record.cost_usd) > 0
    assert record.upstream_error == "stream_cut"


# -- the count per provider -------------------------------------------------------------------


def test_the_traffic_store_counts_the_errors_per_provider(stack: Stack) -> None:
    """A trial's calls, counted by provider, status and the error named: what the trial
    report shows per provider."""
    calls = [
        ("messages", "ok", True), ("messages", "rate_limited", False),
        ("messages", "overloaded", False), ("messages", "overloaded", True),
        ("messages", "cut", True), ("messages", "error_event", True),
        ("chat", "ok", False), ("chat", "rate_limited", True), ("chat", "server_error", False),
        ("responses", "cut", True),
    ]  # fmt: skip
    for n, (endpoint, scenario, stream) in enumerate(calls):
        call(stack, f"count-{n}", endpoint, scenario, stream=stream, trial="t-count")
    store = SqliteTrafficStore.in_root(stack.root)
    try:
        store.catch_up(stack.root.traffic_logs)
        counted = store.provider_calls(trial="t-count")
    finally:
        store.close()
    assert counted == [
        ProviderCalls("anthropic", 6, (
            ErrorCount(200, "overloaded_error", 1),
            ErrorCount(200, "stream_cut", 1),
            ErrorCount(429, "rate_limit_error", 1),
            ErrorCount(529, "overloaded_error", 2),
        )),
        ProviderCalls("openai", 4, (
            ErrorCount(200, "stream_cut", 1),
            ErrorCount(429, "rate_limit_exceeded", 1),
            ErrorCount(500, "server_error", 1),
        )),
    ]  # fmt: skip
