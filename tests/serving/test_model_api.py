"""The CPU model server's own API, against the real server process (`serving.app`, tiny model):
the Anthropic Messages API and the reasoning kept apart for thinking models.

Greedy decoding (temperature 0) makes outputs comparable between routes. llama.cpp's first
generation for a prompt can differ from later ones (its prompt-prefix cache is cold), so each
comparison warms the prompt up with one call first.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.processes import stop
from contracts.config import ModelsCatalog
from contracts.dataroot import DataRoot
from contracts.settings import PROJECT_ROOT, Settings, free_port
from serving.app import loads_as
from serving.llamacpp import REASONING_KEY, server_argv, server_config
from serving.reasoning import ReasoningSplitter, opens_reasoning, split

PROMPT = "The capital of France is"
FEW_SHOT = (
    "Q: 2+2? A: <think>two plus two</think>4\n"
    "Q: 3+3? A: <think>three plus three</think>6\n"
    "Q: 4+4? A:"
)
"""A pattern the base model continues: reasoning in tags, then the answer."""


def tiny_settings(root: DataRoot) -> Settings:
    return Settings(data=root.root, configs=PROJECT_ROOT / "configs", model_port=free_port())


@pytest.fixture(scope="module")
def server(tiny_root: DataRoot, catalog: ModelsCatalog) -> Iterator[httpx.Client]:
    """`serving.app` started as the platform starts it (`server_argv`)."""
    settings = tiny_settings(tiny_root)
    argv = server_argv(settings, catalog)
    assert argv[1:3] == ["-m", "serving.app"]
    with running(argv, settings, tiny_root.root / "model-api.log") as client:
        yield client


@contextmanager
def running(argv: list[str], settings: Settings, log_path: Path) -> Iterator[httpx.Client]:
    """A client of the server `argv` starts, once it answers, until the block ends."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(
        base_url=f"http://{settings.host}:{settings.model_port}", timeout=300, trust_env=False
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log_path.read_text()[-2000:]
            try:
                if client.get("/v1/models").is_success:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.3)
        yield client
    finally:
        client.close()
        stop(process)


def messages(model: str = "tiny", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
        **extra,
    }


def chat(model: str = "tiny", **extra: Any) -> dict[str, Any]:
    body = {
        "model": model,
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    return {**body, **extra}


def events_of(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """Server-sent events as (event name, data), checking each name is its data's type."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        data = json.loads(fields["data"])
        assert fields["event"] == data["type"]
        events.append((fields["event"], data))
    return events


def error_of(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind
    return str(body["error"]["message"])


# -- the Messages API ------------------------------------------------------------------------


@pytest.mark.model
def test_messages_answer_as_the_chat_route_does_with_the_same_token_counts(
    server: httpx.Client,
) -> None:
    server.post("/v1/chat/completions", json=chat()).raise_for_status()  # warm the prompt up
    reply = server.post("/v1/messages", json=messages())
    reference = server.post("/v1/chat/completions", json=chat()).json()

    assert reply.status_code == 200, reply.text
    message = reply.json()
    assert message["id"].startswith("msg_") and message["type"] == "message"
    assert (message["role"], message["model"]) == ("assistant", "tiny")
    text = reference["choices"][0]["message"]["content"]
    assert message["content"] == [{"type": "text", "text": text}]
    assert reference["choices"][0]["finish_reason"] == "length"
    assert (message["stop_reason"], message["stop_sequence"]) == ("max_tokens", None)
    assert message["usage"] == {
        "input_tokens": reference["usage"]["prompt_tokens"],
        "output_tokens": reference["usage"]["completion_tokens"],
    }
    count = server.post("/v1/messages/count_tokens", json={"model": "tiny", **chat()})
    assert count.json() == {"input_tokens": reference["usage"]["prompt_tokens"]}


@pytest.mark.model
def test_an_answer_ended_by_the_model_is_end_turn_without_its_end_token(
    server: httpx.Client,
) -> None:
    # The tiny model answers this with its end-of-generation token at once: llama.cpp samples
    # it but does not count it, nor may we.
    ask = [{"role": "user", "content": "Say OK."}]
    reference = server.post("/v1/chat/completions", json=chat(messages=ask)).json()
    reply = server.post("/v1/messages", json=messages(messages=ask)).json()

    assert reference["choices"][0]["finish_reason"] == "stop"
    assert reply["stop_reason"] == "end_turn"
    assert reply["content"] == [
        {"type": "text", "text": reference["choices"][0]["message"]["content"]}
    ]
    assert reply["usage"] == {
        "input_tokens": reference["usage"]["prompt_tokens"],
        "output_tokens": reference["usage"]["completion_tokens"],
    }


@pytest.mark.model
def test_streamed_messages_follow_the_documented_event_order(server: httpx.Client) -> None:
    server.post("/v1/messages", json=messages()).raise_for_status()  # warm the prompt up
    whole = server.post("/v1/messages", json=messages()).json()
    streamed = server.post("/v1/messages", json=messages(stream=True))
    assert streamed.status_code == 200, streamed.text
    events = events_of(streamed)

    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == whole["usage"]["input_tokens"]
    assert events[2][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert {d["type"] for d in deltas} == {"text_delta"}
    assert "".join(d["text"] for d in deltas) == whole["content"][0]["text"]
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"] == {"output_tokens": whole["usage"]["output_tokens"]}


@pytest.mark.model
def test_a_stop_sequence_ends_the_answer_and_is_named(server: httpx.Client) -> None:
    server.post("/v1/chat/completions", json=chat()).raise_for_status()
    text = server.post("/v1/chat/completions", json=chat()).json()["choices"][0]["message"]
    stop = text["content"].split()[1]  # a word in the middle of the known answer
    reference = server.post("/v1/chat/completions", json=chat(stop=[stop])).json()
    events = events_of(
        server.post("/v1/messages", json=messages(stream=True, stop_sequences=[stop, "zzz"]))
    )

    streamed = "".join(
        data["delta"]["text"] for name, data in events if name == "content_block_delta"
    )
    assert streamed == reference["choices"][0]["message"]["content"]
    assert stop not in streamed
    final = events[-2][1]
    assert final["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": stop}
    assert final["usage"]["output_tokens"] == reference["usage"]["completion_tokens"]


@pytest.mark.model
def test_bad_requests_get_anthropic_errors_naming_the_field(
    server: httpx.Client, catalog: ModelsCatalog
) -> None:
    unknown = server.post("/v1/messages", json=messages(model="claude-nonesuch"))
    assert "claude-nonesuch" in error_of(unknown, 404, "not_found_error")
    assert "tiny, tiny:thinking" in unknown.json()["error"]["message"]

    zero = server.post("/v1/messages", json=messages(max_tokens=0))
    assert error_of(zero, 400, "invalid_request_error").startswith("max_tokens: ")
    missing = {k: v for k, v in messages().items() if k != "messages"}
    message = error_of(server.post("/v1/messages", json=missing), 400, "invalid_request_error")
    assert message == "messages: Field required"
    image = messages(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}])
    message = error_of(server.post("/v1/messages", json=image), 400, "invalid_request_error")
    assert message.startswith("messages.0.content.0.type: content blocks of type 'image'")
    broken = server.post("/v1/messages", content=b"{not json")
    assert error_of(broken, 400, "invalid_request_error").startswith("body: Invalid JSON")
    only_assistant = messages(messages=[{"role": "assistant", "content": "hi"}])
    message = error_of(
        server.post("/v1/messages", json=only_assistant), 400, "invalid_request_error"
    )
    assert "user message" in message

    context = catalog.pairs["tiny"].normal.context
    long = messages(messages=[{"role": "user", "content": "word " * context}], stream=True)
    message = error_of(server.post("/v1/messages", json=long), 400, "invalid_request_error")
    assert message.startswith("prompt is too long: ")
    assert message.endswith(f" tokens > {context - 1} maximum")

    # The server still answers: no error left the model locked.
    assert server.post("/v1/messages", json=messages(max_tokens=1)).status_code == 200


# -- reasoning -------------------------------------------------------------------------------


@pytest.mark.model
def test_a_thinking_model_answers_with_a_thinking_block_before_the_text(
    server: httpx.Client,
) -> None:
    body = messages(
        "tiny:thinking",
        max_tokens=12,
        messages=[
            {"role": "user", "content": FEW_SHOT},
            {"role": "assistant", "content": "<think>"},  # prefill: the answer goes on from here
        ],
    )
    reply = server.post("/v1/messages", json=body)
    assert reply.status_code == 200, reply.text
    content = reply.json()["content"]
    assert [block["type"] for block in content] == ["thinking", "text"], content
    assert content[0]["thinking"].strip() and content[0]["signature"] == ""
    assert not any("think>" in json.dumps(block) for block in content), content

    events = events_of(server.post("/v1/messages", json={**body, "stream": True}))
    blocks = [data["content_block"]["type"] for n, data in events if n == "content_block_start"]
    assert blocks == ["thinking", "text"]
    kinds = [
        (data["index"], data["delta"]["type"]) for n, data in events if n == "content_block_delta"
    ]
    assert kinds[0] == (0, "thinking_delta") and (0, "signature_delta") in kinds
    assert all(kind != "thinking_delta" for index, kind in kinds if index == 1)

    # The normal model of the pair is untouched: the same words, no thinking block.
    normal = server.post("/v1/messages", json={**body, "model": "tiny"}).json()
    assert [block["type"] for block in normal["content"]] == ["text"]


@pytest.mark.model
def test_chat_completions_carry_reasoning_content_for_thinking_models_only(
    server: httpx.Client,
) -> None:
    thinking = server.post("/v1/chat/completions", json=chat("tiny:thinking")).json()
    message = thinking["choices"][0]["message"]
    assert "reasoning_content" in message and isinstance(message["content"], str)
    plain = server.post("/v1/chat/completions", json=chat()).json()
    assert "reasoning_content" not in plain["choices"][0]["message"]

    streamed = server.post("/v1/chat/completions", json=chat("tiny:thinking", stream=True))
    chunks = [
        json.loads(line.removeprefix("data: "))
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    ]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    for chunk in chunks:
        assert set(chunk["choices"][0]["delta"]) <= {"role", "content", "reasoning_content"}


@pytest.mark.model
def test_the_names_of_one_model_file_share_one_load(
    tiny_root: DataRoot, catalog: ModelsCatalog
) -> None:
    """`tiny` and `tiny:thinking` are the same file with the same settings: switching between
    them answers from the model already loaded (llama_cpp's proxy alone reloads on every switch).
    Each load of a verbose `Llama` prints its metadata once."""
    settings = tiny_settings(tiny_root)
    config = server_config(settings, catalog)
    models = config["models"]
    assert isinstance(models, list)
    for model in models:
        model["verbose"] = True
    config_path = tiny_root.root / "verbose-llamacpp.json"
    config_path.write_text(json.dumps(config))
    argv = [sys.executable, "-m", "serving.app", "--config_file", str(config_path)]
    log_path = tiny_root.root / "shared-load.log"
    with running(argv, settings, log_path) as client:
        served = [model["id"] for model in client.get("/v1/models").json()["data"]]
        assert served == ["tiny", "tiny:thinking"]
        for name in ["tiny:thinking", "tiny", "tiny:thinking", "tiny"]:
            reply = client.post("/v1/chat/completions", json=chat(name, max_tokens=1))
            assert reply.status_code == 200, reply.text
            assert ("reasoning_content" in reply.json()["choices"][0]["message"]) == (
                name == "tiny:thinking"
            )
        messages_reply = client.post("/v1/messages", json=messages("tiny:thinking", max_tokens=1))
        assert messages_reply.status_code == 200, messages_reply.text
    loads = log_path.read_text().count("Model metadata: {")
    assert loads == 1, log_path.read_text()[-3000:]


def test_only_names_with_the_same_load_settings_share_a_load() -> None:
    settings = {
        "tiny": {"model": "a.gguf", "model_alias": "tiny", "n_ctx": 8192},
        "tiny:thinking": {"model": "a.gguf", "model_alias": "tiny:thinking", "n_ctx": 8192},
        "long": {"model": "a.gguf", "model_alias": "long", "n_ctx": 32768},
        "other": {"model": "b.gguf", "model_alias": "other", "n_ctx": 8192},
        "long:thinking": {"model": "a.gguf", "model_alias": "long:thinking", "n_ctx": 32768},
    }
    assert loads_as(settings) == {
        "tiny": "tiny",
        "tiny:thinking": "tiny",
        "long": "long",
        "other": "other",
        "long:thinking": "long",
    }


def test_server_config_names_the_thinking_models(
    tiny_root: DataRoot, catalog: ModelsCatalog
) -> None:
    config = server_config(Settings(data=tiny_root.root), catalog)
    assert config[REASONING_KEY] == ["tiny:thinking"]


SAMPLE = "  <think>Two and two.\nMake four.</think>\n\nThe answer is 4. <think>not this</think>"


def pieces_fed(chunks: list[str], *, in_reasoning: bool = False) -> tuple[str, str]:
    splitter = ReasoningSplitter(in_reasoning=in_reasoning)
    parts = {"reasoning": "", "content": ""}
    for chunk in chunks:
        for kind, text in splitter.feed(chunk):
            parts[kind] += text
    for kind, text in splitter.finish():
        parts[kind] += text
    return parts["reasoning"], parts["content"]


def test_the_splitter_finds_tags_split_across_chunks_anywhere() -> None:
    expected = ("Two and two.\nMake four.", "The answer is 4. <think>not this</think>")
    assert split(SAMPLE) == expected
    for cut in range(len(SAMPLE) + 1):
        assert pieces_fed([SAMPLE[:cut], SAMPLE[cut:]]) == expected, cut
    assert pieces_fed(list(SAMPLE)) == expected  # one character at a time
    for cut in range(1, len(SAMPLE) - 1):
        assert pieces_fed([SAMPLE[:cut], "", SAMPLE[cut:-1], SAMPLE[-1]]) == expected


def test_the_splitter_leaves_other_text_alone_and_keeps_what_it_held() -> None:
    assert split("Plain answer, no tags.") == (None, "Plain answer, no tags.")
    assert split("The <think> tag mid-answer stays.") == (
        None,
        "The <think> tag mid-answer stays.",
    )
    assert pieces_fed(["<thi", "s is not a tag"]) == ("", "<this is not a tag")
    assert pieces_fed(["  ", "\n"]) == ("", "  \n")
    # Cut short inside the reasoning: all of it is reasoning, a partial tag included.
    assert pieces_fed(["<think>still thinking</thi"]) == ("still thinking</thi", "")
    assert split("<think>unterminated") == ("unterminated", "")
    assert split("<think></think>answer") == ("", "answer")


def test_a_prompt_that_opens_the_think_block_starts_in_the_reasoning() -> None:
    assert opens_reasoning("<|Assistant|><think>\n")
    assert not opens_reasoning("[INST] hi [/INST]")
    assert split("weighing it</think>\n\n42", in_reasoning=True) == ("weighing it", "42")
    assert pieces_fed(["weighing", " it</", "think>42"], in_reasoning=True) == (
        "weighing it",
        "42",
    )
