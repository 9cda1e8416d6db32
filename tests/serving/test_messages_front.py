"""GPU pairs speak Anthropic: the Messages front (`serving.messages_front`) over a stand-in of
Ray Serve LLM's OpenAI app (`ray_openai_stand_in`), on one address as the rendered Serve config
puts them, and through the real metering proxy as a worker reaches the model plane."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.settings import PROJECT_ROOT
from serving.messages import assemble
from tests.proxy.proxy_harness import Proxy, metering_proxy
from tests.serving.ray_openai_stand_in import RayOpenAIStandIn, serve

ANSWER = "def add(a, b):\n    return a + b\n"
REASONING = "The sum of a and b."
STAND_IN = RayOpenAIStandIn(
    answers={"7b": ANSWER, "7b:thinking": ANSWER},
    reasoning={"7b:thinking": REASONING},
    max_model_len=64,
)


@pytest.fixture(scope="module")
def plane() -> Iterator[httpx.Client]:
    with serve(STAND_IN) as url, httpx.Client(base_url=url, trust_env=False, timeout=10) as c:
        yield c


def ask(model: str = "7b", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 20,
        "system": "You write Python.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Write add."}]}],
        **extra,
    }


def events_of(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.text.split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.splitlines())
            events.append(json.loads(fields["data"]))
            assert fields["event"] == events[-1]["type"]
    return events


def last_chat() -> dict[str, Any]:
    return [body for path, body in STAND_IN.seen if path == "/v1/chat/completions"][-1]


def test_a_message_is_answered_from_the_openai_app_with_its_counts(plane: httpx.Client) -> None:
    reply = plane.post("/v1/messages", json=ask())
    assert reply.status_code == 200, reply.text
    message = reply.json()
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"] == [{"type": "text", "text": ANSWER}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("end_turn", None)
    # system, user, generation prompt: 8 words; the answer 8 (the stand-in's tokens).
    assert message["usage"] == {"input_tokens": 8, "output_tokens": 8}
    sent = last_chat()
    assert sent["messages"] == [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Write add."},
    ]
    assert sent["max_tokens"] == 20 and sent["temperature"] == 1.0
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    count = plane.post("/v1/messages/count_tokens", json=ask())
    assert count.json() == {"input_tokens": 8}


def test_streamed_events_are_the_documented_ones_and_a_thinking_model_thinks_first(
    plane: httpx.Client,
) -> None:
    whole = plane.post("/v1/messages", json=ask("7b:thinking")).json()
    streamed = plane.post("/v1/messages", json=ask("7b:thinking", stream=True))
    events = events_of(streamed)
    names = [e["type"] for e in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[2]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert events[0]["message"]["usage"] == {"input_tokens": 8, "output_tokens": 0}
    assert events[-2]["usage"] == {"input_tokens": 8, "output_tokens": 14}
    rebuilt = assemble(events)
    assert {**rebuilt, "id": ""} == {**whole, "id": ""}
    thinking, text = whole["content"]
    assert thinking == {"type": "thinking", "thinking": REASONING, "signature": ""}
    assert text == {"type": "text", "text": ANSWER}


def test_max_tokens_is_capped_at_the_context_left_and_stops_are_named(
    plane: httpx.Client,
) -> None:
    capped = plane.post("/v1/messages", json=ask(max_tokens=32000)).json()
    assert last_chat()["max_tokens"] == 64 - 8  # vLLM would refuse prompt + max_tokens > 64
    assert capped["stop_reason"] == "end_turn"
    short = plane.post("/v1/messages", json=ask(max_tokens=2)).json()
    assert short["stop_reason"] == "max_tokens" and short["usage"]["output_tokens"] == 2
    stopped = plane.post("/v1/messages", json=ask(stop_sequences=["zzz", "return"])).json()
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", "return")
    assert stopped["content"][0]["text"] == "def add(a, b):\n    "
    assert last_chat()["stop"] == ["zzz", "return"]


def test_an_assistant_prefill_is_continued(plane: httpx.Client) -> None:
    prefilled = ask(
        messages=[
            {"role": "user", "content": "Write add."},
            {"role": "assistant", "content": "def add"},
        ]
    )
    assert plane.post("/v1/messages", json=prefilled).status_code == 200
    sent = last_chat()
    assert sent["messages"][-1] == {"role": "assistant", "content": "def add"}
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False


def test_errors_are_anthropic_errors_with_the_model_planes_reason(plane: httpx.Client) -> None:
    unknown = plane.post("/v1/messages", json=ask("70b"))
    assert unknown.status_code == 404
    error = unknown.json()
    assert error["type"] == "error" and error["error"]["type"] == "not_found_error"
    assert 'Could not find base model with ID "70b"' in error["error"]["message"]
    long = ask(messages=[{"role": "user", "content": "word " * 80}])
    too_long = plane.post("/v1/messages", json=long)
    assert too_long.status_code == 400
    assert too_long.json()["error"]["message"] == "prompt is too long: 86 tokens > 63 maximum"
    missing = plane.post("/v1/messages", json={"model": "7b", "max_tokens": 5})
    assert missing.status_code == 400
    assert missing.json()["error"]["message"] == "messages: Field required"


# -- through the proxy, as a worker calls the GPU plane --------------------------------------


@pytest.fixture(scope="module")
def gpu_proxy(tmp_path_factory: pytest.TempPathFactory, plane: httpx.Client) -> Iterator[Proxy]:
    configs = tmp_path_factory.mktemp("gpu-configs")
    for name in ("models.yaml", "prices.yaml", "providers.yaml"):
        shutil.copy(PROJECT_ROOT / "configs" / name, configs / name)
    port = int(str(plane.base_url).rsplit(":", 1)[1].rstrip("/"))
    yield from metering_proxy(tmp_path_factory, port, configs=Path(configs))


def test_a_gpu_pair_answers_messages_through_the_proxy_metered(
    gpu_proxy: Proxy, plane: httpx.Client
) -> None:
    who = gpu_proxy.identity("gpu-messages")
    url = f"{plane.base_url}/v1/messages"
    with gpu_proxy.client(who) as client:
        reply = client.post(url, json=ask("7b:thinking", stream=True))
    assert reply.status_code == 200, reply.text
    usage = events_of(reply)[-2]["usage"]
    record = gpu_proxy.spooled_one(assignment="gpu-messages")
    assert (record.provider, record.model, record.path) == ("local", "7b:thinking", "/v1/messages")
    assert record.usage is not None and not record.usage.estimated
    assert (record.usage.prompt_tokens, record.usage.completion_tokens) == (
        usage["input_tokens"],
        usage["output_tokens"],
    )
    assert record.cost_usd > 0  # the GPU pair's hourly price, apportioned by tokens
