"""The Anthropic Messages API in front of an OpenAI chat server: how GPU pairs speak Anthropic.

Ray Serve LLM's OpenAI app (`ray.serve.llm:build_openai_app`) serves `/v1/chat/completions`,
`/v1/completions`, `/v1/models` and vLLM's `/tokenize`, but no `/v1/messages`. This front
answers `POST /v1/messages` and `/v1/messages/count_tokens` by asking that app, with the
translation the CPU server uses (`serving.messages`):

- The conversation becomes the same chat turns; an assistant prefill is continued (vLLM's
  `continue_final_message`).
- The prompt is counted first by `/tokenize` with the chat template applied, as the chat route
  will apply it: `input_tokens` is known before the first token, `max_tokens` is capped at the
  context left (stop_reason `max_tokens`), and a prompt longer than the context is a 400.
- The answer is always streamed from the OpenAI app, with its usage: `reasoning_content` deltas
  (vLLM's reasoning parser; `reasoning` in newer vLLM) become a thinking block, `content` the
  text block. `finish_reason` `length` is `max_tokens`; a `stop_reason` that is one of the
  caller's stop sequences is `stop_sequence`; any other stop is `end_turn`. The usage's counts
  are the final `message_delta`'s.
- The OpenAI app's errors are answered as Anthropic's, with their status; an error mid-stream
  becomes an `error` event.

In the rendered Serve config (`serving.rayserve`) this is the application at the route prefix
`/v1/messages`, beside the OpenAI app at `/`, so the model plane's one address serves both; it
reaches the OpenAI app through the Serve proxy of its own node. Standalone (tests, or in front of
a plain `vllm serve`): `python -m serving.messages_front --upstream URL --port P`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

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
    output_room,
    parse,
    sse,
)

DEPLOYMENT = "anthropic-messages"
MAX_ONGOING_REQUESTS = 256
"""Per replica: each request is a wait on the OpenAI app, not work of its own."""
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
"""Anthropic's error type for the OpenAI app's status; other 5xx are `api_error`."""


def upstream_error(status: int, body: bytes) -> ApiError:
    """The OpenAI app's error answer as Anthropic's (vLLM: `{"error": {"message"…}}`, or the
    older flat `{"object": "error", "message"…}`)."""
    message = body.decode(errors="replace")[:500] or f"HTTP {status}"
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        inner = doc["error"] if isinstance(doc.get("error"), dict) else doc
        message = str(inner.get("message") or message)
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return ApiError(status, kind, f"model plane: {message}")


@dataclass(frozen=True)
class ChatCall:
    """A Messages request as the OpenAI app takes it: the chat messages and how to render them."""

    model: str
    messages: list[dict[str, str]]
    continues: bool
    """The last message is the assistant's prefill, which the answer continues."""

    def rendering(self) -> dict[str, Any]:
        """The fields `/tokenize` and `/v1/chat/completions` both take."""
        fields: dict[str, Any] = {"model": self.model, "messages": self.messages}
        if self.continues:
            fields |= {"add_generation_prompt": False, "continue_final_message": True}
        return fields


def chat_call(body: MessagesRequest | CountTokensRequest) -> ChatCall:
    turns, prefill = chat_messages(body.system, body.messages)
    if prefill:
        turns = [*turns, {"role": "assistant", "content": prefill}]
    return ChatCall(body.model, turns, bool(prefill))


@dataclass(frozen=True)
class Counted:
    input_tokens: int
    context: int | None


async def count(client: httpx.AsyncClient, call: ChatCall) -> Counted:
    """The rendered prompt's tokens and the model's context (vLLM's `/tokenize`)."""
    response = await client.post("/tokenize", json=call.rendering())
    if response.status_code != 200:
        raise upstream_error(response.status_code, response.content)
    doc = response.json()
    return Counted(int(doc["count"]), doc.get("max_model_len"))


def chat_request(body: MessagesRequest, call: ChatCall, max_tokens: int) -> dict[str, Any]:
    request = {
        **call.rendering(),
        "max_tokens": max_tokens,
        "temperature": ANTHROPIC_TEMPERATURE if body.temperature is None else body.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if body.stop_sequences:
        request["stop"] = body.stop_sequences
    request |= {k: v for k, v in (("top_p", body.top_p), ("top_k", body.top_k)) if v}
    return request


def chunk_pieces(chunk: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(kind, text) of one chat completion chunk: reasoning first, as vLLM sends it."""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning:
            yield "reasoning", reasoning
        if delta.get("content"):
            yield "content", delta["content"]


def finish_of(last: dict[str, Any], usage: dict[str, Any] | None, stops: list[str]) -> Finish:
    """The Messages finish of the last choice seen and the usage chunk."""
    output = int((usage or {}).get("completion_tokens") or 0)
    prompt = (usage or {}).get("prompt_tokens")
    reason, matched = last.get("finish_reason"), last.get("stop_reason")
    if reason == "length":
        return Finish("max_tokens", None, output, prompt)
    if isinstance(matched, str) and matched in stops:
        return Finish("stop_sequence", matched, output, prompt)
    return Finish("end_turn", None, output, prompt)


async def message_events(
    response: httpx.Response, body: MessagesRequest, input_tokens: int
) -> AsyncIterator[dict[str, Any]]:
    """The Messages events of the OpenAI app's streamed answer; ApiError on an error chunk."""
    events = MessageEvents(body.model, input_tokens)
    for event in events.start():
        yield event
    last: dict[str, Any] = {}
    usage = None
    async for line in response.aiter_lines():
        data = line.removeprefix("data:").strip() if line.startswith("data:") else ""
        if not data or data == "[DONE]":
            continue
        chunk = json.loads(data)
        if "error" in chunk or chunk.get("object") == "error":
            error = chunk.get("error") if isinstance(chunk.get("error"), dict) else chunk
            raise upstream_error(int(error.get("code") or 500), json.dumps(chunk).encode())
        for kind, text in chunk_pieces(chunk):
            for event in events.piece(kind, text):
                yield event
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason") is not None:
                last = choice
        usage = chunk.get("usage") or usage
    for event in events.finish(finish_of(last, usage, body.stop_sequences or [])):
        yield event


def create_app(upstream: str) -> ASGIApp:
    """The front: `/v1/messages` and `/v1/messages/count_tokens` over the OpenAI app at
    `upstream` (its root, without `/v1`)."""
    client = httpx.AsyncClient(
        base_url=upstream.rstrip("/"),
        timeout=httpx.Timeout(None, connect=10),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        trust_env=False,
    )

    async def messages(request: Request) -> Response:
        try:
            body: MessagesRequest = parse(MessagesRequest, await request.body())
            call = chat_call(body)
            counted = await count(client, call)
            max_tokens = output_room(body.max_tokens, counted.input_tokens, counted.context)
            sent = client.build_request(
                "POST", "/v1/chat/completions", json=chat_request(body, call, max_tokens)
            )
            response = await client.send(sent, stream=True)
        except ApiError as error:
            return error.response()
        except httpx.HTTPError as exc:
            return ApiError(502, "api_error", f"model plane unreachable: {exc}").response()
        if response.status_code != 200:
            content = await response.aread()
            await response.aclose()
            return upstream_error(response.status_code, content).response()
        events = message_events(response, body, counted.input_tokens)
        if not body.stream:
            try:
                return JSONResponse(assemble([event async for event in events]))
            except ApiError as error:
                return error.response()
            finally:
                await response.aclose()

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for event in events:
                    yield sse(event)
            except (ApiError, httpx.HTTPError, ValueError) as exc:  # the client sees why
                message = exc.message if isinstance(exc, ApiError) else f"model plane: {exc}"
                yield error_event(message)
            finally:
                await response.aclose()

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def count_tokens(request: Request) -> Response:
        try:
            body: CountTokensRequest = parse(CountTokensRequest, await request.body())
            counted = await count(client, chat_call(body))
        except ApiError as error:
            return error.response()
        except httpx.HTTPError as exc:
            return ApiError(502, "api_error", f"model plane unreachable: {exc}").response()
        return JSONResponse({"input_tokens": counted.input_tokens})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = Starlette(
        routes=[
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    return FullPath(app)


class FullPath:
    """ASGI: route on the whole path. Under Serve's route prefix `/v1/messages` the path keeps
    the prefix and `root_path` names it, so Starlette would route `/v1/messages` itself as ""
    (and redirect it to `/v1/messages/`, which a POST does not follow)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("root_path"):
            scope = {**scope, "root_path": ""}
        await self.app(scope, receive, send)


# -- in the Serve application ---------------------------------------------------------------


class MessagesFront:
    """A Serve replica of the front, made a deployment in `build`: importing this module needs
    no Ray."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return create_app(self.upstream)


def build(args: dict[str, Any]) -> Any:
    """Serve's application builder (`import_path: serving.messages_front:build`); `args`:
    `upstream`, the OpenAI app's root URL."""
    from ray import serve  # the GPU profile's process only

    deployment = serve.deployment(name=DEPLOYMENT, max_ongoing_requests=MAX_ONGOING_REQUESTS)(
        serve.ingress()(MessagesFront)
    )
    return deployment.bind(str(args["upstream"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--upstream", required=True, help="the OpenAI app's root URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.upstream), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
