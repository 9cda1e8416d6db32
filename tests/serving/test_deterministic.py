"""The deterministic model server (`serving.deterministic`) as a real process: OpenAI's wire
format for completions and chat completions, JSON and SSE, scripted answers, exact usage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from contracts.adapters import UnknownAdapter
from contracts.config import load_models
from contracts.settings import PROJECT_ROOT, Settings, free_port
from orchestrator.stack import model_argv
from serving.deterministic import answer, tokens
from serving.probe import cpu_served_names, prove
from tests.serving.model_harness import deterministic_server

SCRIPT = ["first answer", "    return a + b\n\ndef other():\n    pass\n", "last"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    settings = Settings(
        data=tmp_path_factory.mktemp("deterministic"),
        configs=PROJECT_ROOT / "configs",
        model_port=free_port(),
    )
    with (
        deterministic_server(settings, SCRIPT),
        httpx.Client(base_url=settings.model_url, trust_env=False, timeout=10) as client,
    ):
        yield client


def events(response: httpx.Response) -> list[dict[str, object] | str]:
    out: list[dict[str, object] | str] = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_tokens_are_words_with_their_leading_space() -> None:
    assert tokens("    return a + b\n") == ["    return", " a", " +", " b", "\n"]
    assert "".join(tokens(SCRIPT[1])) == SCRIPT[1]
    assert answer("one two three", 2, []) == (["one", " two"], "length")
    assert answer("body\ndef next", None, ["\ndef "]) == (["body"], "stop")


def test_scripted_answers_in_order_with_usage_then_the_last_repeated(
    model: httpx.Client,
) -> None:
    served = [m["id"] for m in model.get("/models").json()["data"]]
    assert served == cpu_served_names(load_models(PROJECT_ROOT / "configs"))

    first = model.post("/completions", json={"model": "tiny", "prompt": "def add(a, b):"}).json()
    assert first["object"] == "text_completion" and first["id"].startswith("cmpl-")
    assert first["choices"][0] | {"logprobs": None} == {
        "index": 0, "text": "first answer", "logprobs": None, "finish_reason": "stop"
    }  # fmt: skip
    assert first["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}

    body = {"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 64, "stop": ["\ndef "]}
    second = model.post("/completions", json=body).json()
    assert second["choices"][0]["text"] == "    return a + b\n"
    assert second["usage"]["completion_tokens"] == 5

    chat = {"model": "tiny:thinking", "messages": [{"role": "user", "content": "Say hi"}]}
    for _ in range(2):
        third = model.post("/chat/completions", json=chat).json()
        assert third["object"] == "chat.completion"
        assert third["choices"][0]["message"] == {"role": "assistant", "content": "last"}
        assert third["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


def test_streams_one_token_per_event_and_the_usage_when_asked(model: httpx.Client) -> None:
    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Go"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 1,
    }
    response = model.post("/chat/completions", json=chat)
    assert response.headers["content-type"].startswith("text/event-stream")
    got = events(response)
    assert got[-1] == "[DONE]"
    chunks = [e for e in got if isinstance(e, dict)]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[1]["choices"] == [
        {"index": 0, "delta": {"content": "last"}, "finish_reason": None}
    ]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}

    plain = {"model": "tiny", "prompt": "x", "stream": True}
    streamed = [e for e in events(model.post("/completions", json=plain)) if isinstance(e, dict)]
    assert "usage" not in streamed[-1]  # not asked for, as OpenAI does


def test_unknown_models_and_bad_bodies_are_refused(model: httpx.Client) -> None:
    unknown = model.post("/completions", json={"model": "gpt-4o", "prompt": "x"})
    assert unknown.status_code == 404
    assert "gpt-4o" in unknown.json()["error"]["message"]
    assert model.post("/completions", content=b"{not json").status_code == 400


def test_autovibe_up_picks_it_by_name_and_its_probe_passes(
    tmp_path: Path, model: httpx.Client
) -> None:
    settings = Settings(data=tmp_path, model_port=1234, model_server="deterministic")
    assert model_argv(settings)[1:3] == ["-m", "serving.deterministic"]
    with pytest.raises(UnknownAdapter, match="allowed: deterministic, llamacpp"):
        model_argv(settings.model_copy(update={"model_server": "gpt"}))
    prove(str(model.base_url), ["tiny", "tiny:thinking"])
