"""A request's output cap is read one way, and a written cap uses the API's own field
(issue 18, finding 5), through the real mitmdump with a machine credential.

`max_tokens: 0` made llama.cpp generate to the end of its context while the budget reserved
for zero output tokens; a Responses API call's `max_output_tokens` was ignored, and the budget
wrote `max_tokens` into every body whatever the API.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))
from proxy_harness import Proxy, Upstream, metering_proxy, serve


@pytest.fixture(scope="module")
def model_server() -> Iterator[Upstream]:
    yield from serve()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, model_server: Upstream) -> Iterator[Proxy]:
    yield from metering_proxy(tmp_path_factory, model_server.port)


def call(proxy: Proxy, upstream: Upstream, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST through the proxy; the body the model server received, and the reservation."""
    marker = f"cap-{len(upstream.seen)}-{path}"
    assignment = "a" + re.sub(r"[^a-z0-9]", "-", marker)
    with proxy.client(Proxy.identity(assignment)) as client:
        response = client.post(f"{upstream.url}{path}", json={**body, "prompt": marker})
    assert response.status_code == 200, response.text
    (seen,) = [s for s in upstream.seen if marker in s["body"]]
    record = proxy.spooled_one(assignment=assignment)
    decision = record.budget_decision
    assert decision is not None and decision.reserved is not None, record.budget
    assert record.budget == decision.text()  # the line for people says the same
    return {"body": json.loads(seen["body"]), "reserved": float(decision.reserved)}


def test_max_tokens_zero_is_no_cap_and_gets_one_written(
    proxy: Proxy, model_server: Upstream
) -> None:
    zero = call(proxy, model_server, "/v1/completions", {"model": "tiny", "max_tokens": 0})
    capped = call(proxy, model_server, "/v1/completions", {"model": "tiny", "max_tokens": 1})
    assert zero["body"]["max_tokens"] > 1, "the upstream was left to generate without a cap"
    assert zero["reserved"] > capped["reserved"], "0 was reserved as zero output tokens"


def test_a_responses_call_is_capped_with_max_output_tokens(
    proxy: Proxy, model_server: Upstream
) -> None:
    uncapped = call(proxy, model_server, "/v1/responses", {"model": "tiny"})
    assert "max_tokens" not in uncapped["body"], "a field the Responses API does not define"
    assert uncapped["body"]["max_output_tokens"] > 1
    asked = call(proxy, model_server, "/v1/responses", {"model": "tiny", "max_output_tokens": 3})
    assert asked["body"]["max_output_tokens"] == 3
    assert asked["reserved"] < uncapped["reserved"], "max_output_tokens was not what was reserved"


def test_a_chat_call_keeps_the_field_it_used(proxy: Proxy, model_server: Upstream) -> None:
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    newer = call(proxy, model_server, "/v1/chat/completions", {**chat, "max_completion_tokens": 4})
    assert newer["body"]["max_completion_tokens"] == 4 and "max_tokens" not in newer["body"]
    # The local model plane's chat API knows only max_tokens: that is what gets written.
    local = call(proxy, model_server, "/v1/chat/completions", chat)
    assert local["body"]["max_tokens"] > 1 and "max_completion_tokens" not in local["body"]
