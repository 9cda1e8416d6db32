"""The CPU model server: llama-cpp-python's OpenAI-compatible app, plus what vLLM and Claude
clients expect of the model plane.

- `POST /v1/messages` (and `/v1/messages/count_tokens`): the Anthropic Messages API over the
  same models (its wire format: `serving.messages`). The conversation is rendered by the
  model's own chat handler, exactly as `/v1/chat/completions` renders it, so both routes see
  the same prompt and count the same tokens. `max_tokens` is capped at the context left
  (stop_reason `max_tokens`); a prompt longer than the context is a 400.
- Served names whose entries differ only in the name (a pair's normal and thinking name on one
  file) share one loaded model (`SharedLoads`); llama_cpp alone reloads on every switch.
- Thinking models (`reasoning_models` in the config): the output's leading `<think>…</think>`
  goes to `message.reasoning_content` / `delta.reasoning_content` on chat completions (vLLM's
  field) and to a `thinking` content block before the `text` block on Messages.

Run as `python -m serving.app --config_file F`; F is llama_cpp.server's config file with one key
of ours, `reasoning_models` (served names), removed before llama_cpp reads it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Read once, when llama_cpp loads its OpenMP runtime. OpenMP's threads spin while they wait for
# each other by default; on cores the agents and their test runs share with the model, a spinning
# thread takes the time its descheduled partner needs (a 500-token prompt: 2.2-2.9 s passive,
# 3.8-7.0 s spinning, under load). An operator's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import llama_cpp
import uvicorn
import yaml
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from llama_cpp import llama_chat_format
from llama_cpp.server import app as llama_app
from llama_cpp.server.errors import RouteErrorHandler
from llama_cpp.server.model import LlamaProxy
from llama_cpp.server.settings import ConfigFileSettings, ModelSettings, ServerSettings
from llama_cpp.server.types import CreateChatCompletionRequest
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from serving.llamacpp import REASONING_KEY
from serving.messages import (
    ANTHROPIC_TEMPERATURE,
    ApiError,
    CountTokensRequest,
    Finish,
    MessageEvents,
    MessagesRequest,
    assemble,
    chat_messages,
    error_event,
    invalid,
    output_room,
    parse,
    sse,
)
from serving.reasoning import ReasoningSplitter, opens_reasoning, split

CHAT_EXCLUDE = {"n", "logit_bias_type", "user", "min_tokens"}
"""Request fields llama_cpp's chat route leaves out of the handler's arguments (as it does)."""


# -- one generation, as llama_cpp's chat route would run it ----------------------------------


class _Rendered(Exception):
    """Carries the prompt out of a chat handler, which renders it and then calls the model."""

    def __init__(self, completion: dict[str, Any]) -> None:
        super().__init__("rendered")
        self.completion = completion


class _RenderOnly:
    """A stand-in for a `Llama` passed to a chat handler: it records the rendered prompt text
    and stops at the completion call, so the handler's own template and stops are reused."""

    def __init__(self, llama: llama_cpp.Llama) -> None:
        self._llama = llama
        self.text = ""
        self.add_bos = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llama, name)

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        self.text, self.add_bos = text.decode("utf-8"), add_bos
        return self._llama.tokenize(text, add_bos=add_bos, special=special)

    def create_completion(self, **kwargs: Any) -> Any:
        raise _Rendered(kwargs)


@dataclass
class Prompt:
    tokens: list[int]
    completion: dict[str, Any]
    """`Llama.create_completion` arguments the chat handler chose (sampling, its stops)."""
    in_reasoning: bool


def render(llama: llama_cpp.Llama, chat: dict[str, Any], prefill: str = "") -> Prompt:
    """The prompt tokens and completion arguments of a chat request, as the chat route has them."""
    handler = (
        llama.chat_handler
        or llama._chat_handlers.get(llama.chat_format or "")
        or llama_chat_format.get_chat_completion_handler(llama.chat_format or "")
    )
    stand_in = _RenderOnly(llama)
    try:
        handler(llama=stand_in, **chat)  # type: ignore[arg-type]
    except _Rendered as rendered:
        completion = rendered.completion
    else:  # pragma: no cover - every llama_cpp handler ends in create_completion
        raise RuntimeError("the chat handler returned without calling the model")
    tokens = completion.pop("prompt")
    if prefill:
        text = stand_in.text + prefill
        tokens = llama.tokenize(text.encode("utf-8"), add_bos=stand_in.add_bos, special=True)
    return Prompt(tokens, completion, opens_reasoning(stand_in.text + prefill))


class TokenCounter:
    """A logits processor: llama.cpp calls it once for every token it samples."""

    def __init__(self) -> None:
        self.sampled = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.sampled += 1
        return scores


@dataclass
class Generation:
    """A chat prompt's completion as text pieces (reasoning or content), then its Finish.

    Stop strings (the caller's and the template's) are matched here rather than by llama.cpp,
    to know which one matched and so that llama.cpp stops only at end of generation or at
    max_tokens: its count of completion tokens is then the tokens sampled, less the
    end-of-generation token when that is how it stopped.
    """

    llama: llama_cpp.Llama
    prompt: Prompt
    max_tokens: int
    stops: list[str]
    reasoning: bool
    finish: Finish | None = None
    _counter: TokenCounter = field(default_factory=TokenCounter, init=False)

    def pieces(self) -> Iterator[tuple[str, str]]:
        arguments = dict(self.prompt.completion)
        own_stops = arguments.pop("stop", None) or []
        stops = [s for s in [*self.stops, *own_stops] if s]
        completion = {
            **arguments,
            "max_tokens": self.max_tokens,
            "stream": True,
            "stop": [],
            "logits_processor": llama_cpp.LogitsProcessorList([self._counter]),
        }
        splitter = ReasoningSplitter(in_reasoning=self.prompt.in_reasoning)
        chunks: Any = self.llama.create_completion(prompt=self.prompt.tokens, **completion)
        held = ""
        matched: str | None = None
        llama_reason = "length"
        try:
            for chunk in chunks:
                choice = chunk["choices"][0]
                held += choice["text"]
                llama_reason = choice["finish_reason"] or llama_reason
                cut = min(((held.find(s), s) for s in stops if s in held), default=None)
                if cut is not None:
                    held, matched = held[: cut[0]], cut[1]
                keep = 0 if cut else max((_partial(held, s) for s in stops), default=0)
                ready, held = held[: len(held) - keep], held[len(held) - keep :]
                yield from self._split(splitter, ready)
                if cut is not None:
                    break
        finally:  # stopped here, or the client went away: llama.cpp stops too
            chunks.close()
        yield from self._split(splitter, held)
        if self.reasoning:
            yield from splitter.finish()
        sampled = self._counter.sampled
        if matched is not None and matched in self.stops:
            self.finish = Finish("stop_sequence", matched, sampled)
        elif matched is not None:
            self.finish = Finish("end_turn", None, sampled)
        elif llama_reason == "stop":  # the end-of-generation token: sampled, not output
            self.finish = Finish("end_turn", None, max(0, sampled - 1))
        else:
            self.finish = Finish("max_tokens", None, sampled)

    def _split(self, splitter: ReasoningSplitter, text: str) -> Iterator[tuple[str, str]]:
        if not self.reasoning:
            if text:
                yield "content", text
            return
        yield from splitter.feed(text)


def _partial(text: str, stop: str) -> int:
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0


# -- the server ------------------------------------------------------------------------------


def loads_as(settings: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each served name's stand-in for loading: the first name (in config order) whose load
    settings (everything but the name) are the same as its own."""
    first: list[tuple[dict[str, Any], str]] = []
    stand_in: dict[str, str] = {}
    for name, own in settings.items():
        loading = {key: value for key, value in own.items() if key != "model_alias"}
        match = next((known for seen, known in first if seen == loading), None)
        if match is None:
            first.append((loading, name))
        stand_in[name] = match or name
    return stand_in


class SharedLoads:
    """llama_cpp.server's model proxy, asked for a name's stand-in (`loads_as`) instead.

    The proxy keeps one model loaded and frees and loads again whenever the requested name
    changes, even to a name of the same file with the same settings (a pair's normal and
    thinking name): a reload per switch. What differs per name (reasoning) is decided from the
    request's own name, never from the loaded model.
    """

    def __init__(self, proxy: LlamaProxy) -> None:
        self._proxy = proxy
        self._stand_in = loads_as({name: proxy[name] for name in proxy})

    def __call__(self, model: str | None = None) -> llama_cpp.Llama:
        return self._proxy(self._stand_in.get(model, model) if model else model)

    def __iter__(self) -> Iterator[str]:
        return iter(self._proxy)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._proxy, name)


@dataclass(frozen=True)
class ServedModels:
    names: frozenset[str]
    reasoning: frozenset[str]


def chat_arguments(
    model: str, turns: list[dict[str, str]], body: MessagesRequest | None
) -> dict[str, Any]:
    """The chat handler's arguments for a Messages request, defaults as the chat route has them."""
    fields: dict[str, Any] = {"model": model, "messages": turns}
    if body is not None:
        temperature = body.temperature
        fields["temperature"] = ANTHROPIC_TEMPERATURE if temperature is None else temperature
        fields |= {k: v for k, v in (("top_p", body.top_p), ("top_k", body.top_k)) if v}
    chat = CreateChatCompletionRequest.model_validate(fields)
    return chat.model_dump(exclude=CHAT_EXCLUDE)


def llama_lock() -> contextlib.AbstractAsyncContextManager[Any]:
    """The model, held by this task alone: llama_cpp's own lock, shared with its routes."""
    return contextlib.asynccontextmanager(llama_app.get_llama_proxy)()


def message_events(generation: Generation, model: str) -> Generator[dict[str, Any], None, None]:
    """The Messages API's stream events for one generation."""
    events = MessageEvents(model, len(generation.prompt.tokens))
    yield from events.start()
    for kind, text in generation.pieces():
        yield from events.piece(kind, text)
    assert generation.finish is not None
    yield from events.finish(generation.finish)


def build_app(
    server: ServerSettings, models: list[ModelSettings], reasoning: set[str] | frozenset[str]
) -> FastAPI:
    """llama_cpp's app for `models`, with the Messages API and reasoning separation added."""
    app = llama_app.create_app(server_settings=server, model_settings=models)
    assert llama_app._llama_proxy is not None
    # Every route, llama_cpp's and ours, asks this module global for the model. Wrapped, not
    # replaced: create_app's proxy has loaded the first model already.
    llama_app._llama_proxy = SharedLoads(llama_app._llama_proxy)  # type: ignore[assignment]
    served = ServedModels(
        names=frozenset(m.model_alias or m.model for m in models),
        reasoning=frozenset(reasoning),
    )
    router = APIRouter()

    def llama_for(model: str, proxy: Any) -> llama_cpp.Llama:
        if model not in served.names:
            known = ", ".join(sorted(served.names))
            raise ApiError(404, "not_found_error", f"model: {model} (served here: {known})")
        llama: llama_cpp.Llama = proxy(model)
        return llama

    @router.post("/v1/messages", tags=["Anthropic"])
    async def messages(request: Request) -> Response:
        try:
            body: MessagesRequest = parse(MessagesRequest, await request.body())
            turns, prefill = chat_messages(body.system, body.messages)
            chat = chat_arguments(body.model, turns, body)
        except ApiError as error:
            return error.response()
        reasoning = body.model in served.reasoning
        stops = body.stop_sequences or []
        try:
            async with llama_lock() as proxy:
                llama = llama_for(body.model, proxy)
                prompt = await run_in_threadpool(render, llama, chat, prefill)
                max_tokens = output_room(body.max_tokens, len(prompt.tokens), llama.n_ctx())
                if not body.stream:
                    generation = Generation(llama, prompt, max_tokens, stops, reasoning)
                    events = message_events(generation, body.model)
                    return JSONResponse(await run_in_threadpool(lambda: assemble(events)))
        except ApiError as error:
            return error.response()
        except ValueError as error:  # the chat template refused the conversation
            return invalid(f"messages: {error}").response()

        async def stream() -> AsyncIterator[bytes]:
            # The model lock belongs to the task that streams (anyio locks are per task).
            async with llama_lock() as proxy:
                generation = Generation(proxy(body.model), prompt, max_tokens, stops, reasoning)
                events = message_events(generation, body.model)
                try:
                    async for event in iterate_in_threadpool(events):
                        yield sse(event)
                except Exception as exc:  # the client must see why the stream ended
                    yield error_event(str(exc))
                finally:
                    events.close()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @router.post("/v1/messages/count_tokens", tags=["Anthropic"])
    async def count_tokens(request: Request) -> Response:
        try:
            body: CountTokensRequest = parse(CountTokensRequest, await request.body())
            turns, prefill = chat_messages(body.system, body.messages)
            chat = chat_arguments(body.model, turns, None)
            async with llama_lock() as proxy:
                llama = llama_for(body.model, proxy)
                prompt = await run_in_threadpool(render, llama, chat, prefill)
        except ApiError as error:
            return error.response()
        return JSONResponse({"input_tokens": len(prompt.tokens)})

    # llama_cpp's error handling (OpenAI-style errors) for its chat route, as before.
    chat_router = APIRouter(route_class=RouteErrorHandler)

    @chat_router.post("/v1/chat/completions", include_in_schema=False)
    async def chat_completions(request: Request, body: CreateChatCompletionRequest) -> Any:
        if body.model not in served.reasoning:
            return await llama_app.create_chat_completion(request, body)
        return await _reasoning_chat(request, body)

    # Ahead of llama_cpp's own routes, so that ours answer first.
    app.router.routes[:0] = [*router.routes, *chat_router.routes]
    return app


async def _reasoning_chat(request: Request, body: CreateChatCompletionRequest) -> Any:
    """llama_cpp's chat route, with the reasoning moved out of the content."""
    kwargs = body.model_dump(exclude=CHAT_EXCLUDE)
    if body.stream:
        send, receive = llama_app.anyio.create_memory_object_stream[Any](10)
        return llama_app.EventSourceResponse(
            receive,
            data_sender_callable=llama_app.partial(
                llama_app.get_event_publisher,
                request=request,
                inner_send_chan=send,
                body=body,
                body_model=body.model,
                llama_call=_split_chat_stream,
                kwargs=kwargs,
            ),
            sep="\n",
            ping_message_factory=llama_app._ping_message_factory,  # type: ignore[arg-type]
        )
    async with llama_lock() as proxy:
        llama = llama_app.prepare_request_resources(body, proxy, body.model, kwargs)
        return await run_in_threadpool(_split_chat, llama, kwargs)


def _split_chat(llama: llama_cpp.Llama, kwargs: dict[str, Any]) -> dict[str, Any]:
    in_reasoning = render(llama, dict(kwargs)).in_reasoning
    response: Any = llama.create_chat_completion(**kwargs)
    for choice in response["choices"]:
        message = choice["message"]
        reasoning, content = split(message.get("content") or "", in_reasoning=in_reasoning)
        message["content"], message["reasoning_content"] = content, reasoning
    return response


def _split_chat_stream(llama: llama_cpp.Llama, **kwargs: Any) -> Iterator[dict[str, Any]]:
    splitter = ReasoningSplitter(in_reasoning=render(llama, dict(kwargs)).in_reasoning)
    chunks: Any = llama.create_chat_completion(**kwargs)
    for chunk in chunks:
        choice = chunk["choices"][0]
        delta = choice["delta"]
        pieces = splitter.feed(delta.pop("content", None) or "")
        if choice["finish_reason"] is not None:
            pieces += splitter.finish()
        for kind, text in pieces:
            field_name = "reasoning_content" if kind == "reasoning" else "content"
            yield {
                **chunk,
                "choices": [{**choice, "finish_reason": None, "delta": {field_name: text}}],
            }
        if delta or choice["finish_reason"] is not None:
            yield chunk


def load_config(path: Path) -> tuple[ServerSettings, list[ModelSettings], set[str]]:
    """llama_cpp.server's config file (JSON or YAML) and our `reasoning_models` key."""
    text = path.read_text()
    yml = path.suffix in (".yaml", ".yml")
    return parse_config(yaml.safe_load(text) if yml else json.loads(text))


def parse_config(raw: dict[str, Any]) -> tuple[ServerSettings, list[ModelSettings], set[str]]:
    """llama_cpp.server's config (`serving.llamacpp.server_config`) and our `reasoning_models`."""
    raw = dict(raw)
    reasoning = set(raw.pop(REASONING_KEY, None) or [])
    config = ConfigFileSettings.model_validate(raw)
    return ServerSettings.model_validate(config), config.models, reasoning


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config_file", type=Path, required=True)
    args = parser.parse_args(argv)
    server, models, reasoning = load_config(args.config_file)
    app = build_app(server, models, reasoning)
    uvicorn.run(app, host=server.host, port=server.port)


if __name__ == "__main__":
    main()
