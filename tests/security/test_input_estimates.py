"""A reservation covers the input the provider will really bill (issue 18, finding 5, its last
part), through the real mitmdump with a machine credential.

The input was estimated from the body's bytes alone. A Responses call naming a
`previous_response_id` is billed for the whole earlier conversation, which its body does not
hold; an image is billed by its pixels, whatever its URL's or its base64's size. Now the
proxy remembers the tokens of the Responses calls it metered, reserves them again for a call
that names one, reserves the context window for one it never saw, and counts each image at
its family's documented ceiling. The settle still charges the usage the provider reports.

The stand-in speaks OpenAI's Responses and chat wire formats. gpt-4o-mini is priced at one
micro-USD per input token and two per output token, so a reservation reads in tokens.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "workers"))
from proxy_harness import Proxy, Upstream, _Handler, metering_proxy, serve
from worker_harness import settled_counters

from contracts.records import BudgetDecision, FlowRecord
from proxy.addons.budget import PROMPT_MARGIN_TOKENS

KEY = "sk-real-provider-key-for-input-estimates"
PRICES_YAML = """\
currency: USD
fx: {USD: "1"}
providers:
  openai:
    gpt-4o-mini: {input_per_mtok: "1", output_per_mtok: "2"}
"""
IN, OUT = Decimal("0.000001"), Decimal("0.000002")
"""USD per input and per output token of gpt-4o-mini here."""
USAGE_IN, USAGE_OUT = 11, 7
"""What the stand-in reports for every call."""
SPENT = USAGE_IN * IN + USAGE_OUT * OUT
MAX_OUT = 16
GPT_4O_MINI_CONTEXT = 128_000
"""gpt-4o-mini's documented context window (platform.openai.com/docs/models)."""
GPT_4O_MINI_IMAGE = 2_833 + 8 * 5_667
"""The most one image costs gpt-4o-mini: base + 8 tiles of 512 px (images-vision guide)."""
PIXELS = "data:image/png;base64," + "iVBORw0KGgoAAAANSUhEUgAA" * 4_000


class _OpenAI(_Handler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._remember(body)
        n = len(self.upstream.seen)
        if self.path == "/v1/responses":
            usage = {"input_tokens": USAGE_IN, "output_tokens": USAGE_OUT,
                     "total_tokens": USAGE_IN + USAGE_OUT}  # fmt: skip
            answer: dict[str, Any] = {
                "id": f"resp_{n}", "object": "response", "status": "completed",
                "output": [{"type": "message", "role": "assistant",
                            "content": [{"type": "output_text", "text": "hi"}]}],
                "usage": usage,
            }  # fmt: skip
        else:
            usage = {"prompt_tokens": USAGE_IN, "completion_tokens": USAGE_OUT,
                     "total_tokens": USAGE_IN + USAGE_OUT}  # fmt: skip
            answer = {"id": f"chatcmpl-{n}", "object": "chat.completion",
                      "choices": [{"message": {"role": "assistant", "content": "a cat"}}],
                      "usage": usage}  # fmt: skip
        self._send(200, "application/json", json.dumps(answer).encode())


@pytest.fixture(scope="module")
def provider() -> Iterator[Upstream]:
    yield from serve(_OpenAI)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, provider: Upstream) -> Iterator[Proxy]:
    configs = tmp_path_factory.mktemp("input-prices")
    (configs / "prices.yaml").write_text(PRICES_YAML)
    yield from metering_proxy(
        tmp_path_factory,
        1,
        "--set",
        f"autovibe_provider_hosts=127.0.0.1:{provider.port}=openai",
        secrets={"providers/openai": KEY},
        configs=configs,
    )


def counters(proxy: Proxy) -> tuple[Decimal, Decimal]:
    """The project's (spent, reserved) once no reservation is open (calls run one at a time)."""
    return settled_counters(proxy.root)


def call(
    proxy: Proxy, provider: Upstream, assignment: str, path: str, doc: dict[str, Any]
) -> tuple[dict[str, Any], BudgetDecision, int]:
    """POST `doc` through the proxy; the answer, the budget decision and the body's bytes,
    after checking the reservation was released and exactly the reported usage was spent."""
    body = json.dumps(doc).encode()
    spent, reserved = counters(proxy)
    assert reserved == 0
    with proxy.client(Proxy.identity(assignment)) as client:
        response = client.post(
            f"{provider.url}{path}",
            content=body,
            headers={"Content-Type": "application/json", "Authorization": "Bearer x"},
        )
    assert response.status_code == 200, response.text
    record: FlowRecord = proxy.spooled_one(assignment=assignment)
    after, still_reserved = counters(proxy)
    assert still_reserved == 0, "the reservation was not released"
    assert after - spent == SPENT == record.cost_usd, "settled at other than the reported usage"
    decision = record.budget_decision
    assert decision is not None and decision.action == "settled", record.budget
    assert decision.settled == SPENT and decision.reserved is not None
    return response.json(), decision, len(body)


def test_a_known_previous_response_is_reserved_again(proxy: Proxy, provider: Upstream) -> None:
    first, plain, size = call(proxy, provider, "a-first", "/v1/responses", {
        "model": "gpt-4o-mini", "input": "write a haiku", "max_output_tokens": MAX_OUT,
    })  # fmt: skip
    assert plain.reserved == (size + PROMPT_MARGIN_TOKENS) * IN + MAX_OUT * OUT
    assert plain.input_estimate is None
    _, chained, size = call(proxy, provider, "a-next", "/v1/responses", {
        "model": "gpt-4o-mini", "input": "another", "previous_response_id": first["id"],
        "max_output_tokens": MAX_OUT,
    })  # fmt: skip
    earlier = USAGE_IN + USAGE_OUT  # what the provider prepends: the first call's input + output
    assert chained.reserved == (size + PROMPT_MARGIN_TOKENS + earlier) * IN + MAX_OUT * OUT
    assert chained.input_estimate == (
        f"previous_response_id {first['id']}: {earlier} tokens as metered here"
    )


def test_an_unknown_previous_response_reserves_the_context_window(
    proxy: Proxy, provider: Upstream
) -> None:
    _, decision, _ = call(proxy, provider, "a-unknown", "/v1/responses", {
        "model": "gpt-4o-mini", "input": "go on", "previous_response_id": "resp_of_another_proxy",
        "max_output_tokens": MAX_OUT,
    })  # fmt: skip
    assert decision.reserved == GPT_4O_MINI_CONTEXT * IN + MAX_OUT * OUT
    assert decision.input_estimate is not None
    assert "resp_of_another_proxy not seen here" in decision.input_estimate


def test_images_are_reserved_at_their_ceiling_not_their_bytes(
    proxy: Proxy, provider: Upstream
) -> None:
    parts = [
        {"type": "text", "text": "what is in these pictures?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "image_url", "image_url": {"url": PIXELS}},
    ]
    _, decision, size = call(proxy, provider, "a-images", "/v1/chat/completions", {
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": parts}],
        "max_completion_tokens": MAX_OUT,
    })  # fmt: skip
    tokens = size - len(PIXELS) + PROMPT_MARGIN_TOKENS + 2 * GPT_4O_MINI_IMAGE
    assert decision.reserved == tokens * IN + MAX_OUT * OUT
    assert decision.input_estimate == f"2 image(s) at {GPT_4O_MINI_IMAGE} tokens each"
