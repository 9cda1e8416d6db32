"""Reserve-then-settle in the proxy's addon chain (proxy_harness.addon_chain): what a call
reserves, which scope refuses it and how, and the max_tokens written into a call that sets
none. The chain's hooks stand in for mitmdump; the upstream's answer is `answer`'s, as
budget_harness.Scripted answers. That the real mitmdump reserves and settles through the
addon is test_budget_proxy's part."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from budget_harness import (
    CAD_PER_TOKEN,
    NO_LIMIT,
    PRICES_YAML,
    PROMPT_TOKENS,
    body,
    open_budget,
)
from mitmproxy import http

from budget.sqlite import SqliteCounters
from contracts.credentials import MachineIdentity
from proxy.addons.budget import PROMPT_MARGIN_TOKENS
from tests.proxy.proxy_harness import Chain, addon_chain

URL = "http://127.0.0.1:8500/v1/completions"


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Chain]:
    with addon_chain(tmp_path, prices=PRICES_YAML) as chain:
        yield chain


@pytest.fixture
def counters(chain: Chain) -> Iterator[SqliteCounters]:
    store = SqliteCounters(chain.root.budget_counters)
    yield store
    store.close()


def who(project: str, task: str = "") -> MachineIdentity:
    return MachineIdentity(project, "t1", f"{project}-a1", "m1", time.time() + 3600, task)


def sent(chain: Chain, identity: MachineIdentity, content: bytes) -> http.HTTPFlow:
    return chain.send(chain.flow(identity, URL, content))


def answer(chain: Chain, flow: http.HTTPFlow) -> dict[str, Any]:
    """Answer the forwarded call as budget_harness.Scripted does (every completion token it
    was allowed); returns the request as it left the proxy."""
    assert flow.response is None, flow.response.text
    request: dict[str, Any] = json.loads(flow.request.get_content() or b"")
    completion = int(request.get("max_tokens", 16))
    usage = {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion,
        "total_tokens": PROMPT_TOKENS + completion,
    }
    chain.respond(flow, body={"id": "cmpl", "choices": [], "usage": usage})
    return request


def refusal(flow: http.HTTPFlow) -> dict[str, Any]:
    assert flow.response is not None and flow.response.status_code == 402
    found: dict[str, Any] = json.loads(flow.response.get_content() or b"")
    return found


def test_a_call_holds_its_most_while_in_flight_and_settles_at_its_actual_cost(
    chain: Chain, counters: SqliteCounters
) -> None:
    open_budget(counters, "served", Decimal(1))
    content = body(max_tokens=50)
    flow = sent(chain, who("served"), content)
    # Every byte of the body a token, plus the margin, plus every output token it may get.
    held = (len(content) + PROMPT_MARGIN_TOKENS + 50) * CAD_PER_TOKEN
    for scope in ("project:served", "machine:served:m1"):
        state = counters.describe(scope)
        assert state is not None and (state.reserved, state.spent) == (held, 0)
    answer(chain, flow)
    actual = (PROMPT_TOKENS + 50) * CAD_PER_TOKEN
    for scope in ("project:served", "machine:served:m1"):
        state = counters.describe(scope)
        assert state is not None and (state.reserved, state.spent) == (0, actual)
    assert counters.open_reservations(time.time() + 1) == []
    (record,) = [r for r in chain.spooled() if r.project == "served"]
    assert record.budget is not None and record.budget.endswith(f"settled {actual} on response")
    assert record.cost_usd * 2 == actual  # two CAD to the USD


def test_refusal_is_402_naming_scope_left_and_reset(chain: Chain, counters: SqliteCounters) -> None:
    open_budget(counters, "poor", Decimal("0.001"))
    flow = sent(chain, who("poor"), body(max_tokens=1000, marker="poor"))
    found = refusal(flow)  # answered by the proxy: the call never left
    assert found["error"] == "budget_exhausted"
    assert found["scope"] == "project:poor"
    assert (found["left"], found["currency"]) == ("0.001000", "CAD")
    assert found["resets_at"].endswith("T00:00:00Z")
    (record,) = [r for r in chain.spooled() if r.project == "poor"]
    assert record.status == 402 and record.error == "budget_exhausted"
    assert counters.open_reservations(time.time() + 1) == []


def test_machine_allowance_and_task_cap_are_scopes_too(
    chain: Chain, counters: SqliteCounters
) -> None:
    open_budget(counters, "scoped", NO_LIMIT, machine=Decimal("0.0005"))
    assert refusal(sent(chain, who("scoped"), body(max_tokens=1000)))["scope"] == (
        "machine:scoped:m1"
    )
    counters.ensure_scope("machine:scoped:m1", NO_LIMIT, "CAD", "daily", time.time())
    counters.ensure_scope("task:t1:fix-it", Decimal("0.0005"), "CAD", "once", time.time())
    capped = refusal(sent(chain, who("scoped", task="fix-it"), body(max_tokens=1000)))
    assert (capped["scope"], capped["resets_at"]) == ("task:t1:fix-it", None)
    # A task with no budget of its own has no scope: only project and machine are charged.
    uncapped = sent(chain, who("scoped", task="uncapped"), body(max_tokens=10))
    answer(chain, uncapped)


def test_unregistered_project_is_refused(chain: Chain) -> None:
    found = refusal(sent(chain, who("nobody"), body(max_tokens=1)))
    assert (found["error"], found["scope"]) == ("no_budget", "project:nobody")


def test_missing_max_tokens_is_capped_at_what_the_tightest_scope_can_pay(
    chain: Chain, counters: SqliteCounters
) -> None:
    open_budget(counters, "capped", NO_LIMIT, machine=Decimal("0.006"))
    content = body(marker="capped")
    forwarded = answer(chain, sent(chain, who("capped"), content))
    affordable = int(Decimal("0.006") / CAD_PER_TOKEN) - len(content) - PROMPT_MARGIN_TOKENS
    assert forwarded["max_tokens"] == affordable
    # The upstream used every token it was allowed: the allowance is spent, never overrun.
    assert counters.spent("machine:capped:m1") <= Decimal("0.006")
    (record,) = [r for r in chain.spooled() if r.project == "capped"]
    assert record.usage is not None and record.usage.completion_tokens == affordable

    big = Decimal(1)  # far more than the ceiling of 4096 tokens could cost
    counters.ensure_scope("machine:capped:m1", big, "CAD", "daily", time.time())
    assert answer(chain, sent(chain, who("capped"), body(marker="ceiling")))["max_tokens"] == 4096


def test_a_call_that_fails_upstream_settles_at_its_estimate_and_is_spooled_with_the_error(
    chain: Chain, counters: SqliteCounters
) -> None:
    open_budget(counters, "failed", Decimal(1))
    flow = sent(chain, who("failed"), body(max_tokens=50))
    chain.fail(flow, "peer closed connection without sending complete message body")
    (record,) = [r for r in chain.spooled() if r.project == "failed"]
    assert record.error is not None and "peer closed" in record.error
    # The provider may have served it: the input is charged at its estimate, never zero.
    assert record.usage is not None and record.usage.estimated and record.cost_usd > 0
    state = counters.describe("project:failed")
    assert state is not None and state.reserved == 0
    assert state.spent == record.cost_usd * 2  # two CAD to the USD
    assert record.budget is not None and "on error: peer closed" in record.budget
