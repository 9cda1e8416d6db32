"""A stand-in for the GPU model plane: what Ray Serve LLM's OpenAI app answers, without a GPU.

The routes and shapes are Ray's (ray 2.59, `ray/llm/_internal/serve/core/ingress/ingress.py`:
`DEFAULT_ENDPOINTS`, `_openai_json_wrapper`) over vLLM's protocol models:

- `GET /v1/models`: `{"object": "list", "data": [ModelCard…]}`.
- `POST /tokenize` (vLLM's `TokenizeChatRequest`: `messages`, `add_generation_prompt`,
  `continue_final_message`): `{"count", "max_model_len", "tokens", "token_strs"}`.
- `POST /v1/chat/completions`: a `chat.completion`, or with `stream` the `chat.completion.chunk`
  SSE lines (`data: {…}`, then `data: [DONE]`): a first chunk with the role, one per token
  (`reasoning_content` for a thinking model's reasoning, vLLM's reasoning parser), a last one
  with `finish_reason` (`stop`/`length`) and `stop_reason` (the stop string matched, else
  null), and with `stream_options.include_usage` a chunk of `choices: []` and the usage.
- An unknown model is a 404 and a prompt + `max_tokens` past `max_model_len` a 400, as
  `{"error": {"message", "type", "param", "code"}}` (vLLM's `ErrorResponse`).

A token is a run of whitespace and the word after it; the chat template is `role: content`
lines plus `assistant:` for the generation prompt. Beside it, `serve` puts the Messages front
(`serving.messages_front`) at `/v1/messages` as the rendered Serve config does, on one port.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from contracts.settings import free_port
from proxy.launch import wait_ready
from serving.messages_front import create_app as messages_front

TOKEN = re.compile(r"\s*\S+|\s+")
MAX_MODEL_LEN = 4096


@dataclass
class RayOpenAIStandIn:
    """Answers each model with its scripted `reasoning` (thinking models) and `answer`."""

    answers: dict[str, str]
    reasoning: dict[str, str] = field(default_factory=dict)
    max_model_len: int = MAX_MODEL_LEN
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/tokenize", self.tokenize, methods=["POST"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
            ]
        )

    async def models(self, request: Request) -> Response:
        cards = [
            {"id": name, "object": "model", "owned_by": "organization-owner", "permission": []}
            for name in self.answers
        ]
        return JSONResponse({"object": "list", "data": cards})

    def _prompt(self, body: dict[str, Any]) -> list[str]:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in body["messages"])
        if body.get("add_generation_prompt", True) and not body.get("continue_final_message"):
            text += "assistant:"
        return TOKEN.findall(text)

    def _unknown(self, model: str) -> Response | None:
        if model in self.answers:
            return None
        message = f'Got request for model "{model}". Could not find base model with ID "{model}".'
        return error(404, "NotFoundError", message)

    async def tokenize(self, request: Request) -> Response:
        body = await request.json()
        self.seen.append(("/tokenize", body))
        if (unknown := self._unknown(body["model"])) is not None:
            return unknown
        tokens = self._prompt(body)
        return JSONResponse(
            {
                "count": len(tokens),
                "max_model_len": self.max_model_len,
                "tokens": list(range(len(tokens))),
                "token_strs": None,
            }
        )

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.seen.append(("/v1/chat/completions", body))
        model = body["model"]
        if (unknown := self._unknown(model)) is not None:
            return unknown
        prompt = self._prompt(body)
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and len(prompt) + max_tokens > self.max_model_len:
            message = (
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length."
            )
            return error(400, "BadRequestError", message)
        pieces, finish, matched = self._generate(model, max_tokens, body.get("stop") or [])
        usage = {
            "prompt_tokens": len(prompt),
            "total_tokens": len(prompt) + len(pieces),
            "completion_tokens": len(pieces),
            "prompt_tokens_details": None,
        }
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        if not body.get("stream"):
            reasoning = "".join(t for kind, t in pieces if kind == "reasoning_content") or None
            message = {
                "role": "assistant",
                "content": "".join(t for kind, t in pieces if kind == "content"),
                "reasoning_content": reasoning,
                "tool_calls": [],
            }
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            return JSONResponse(
                {
                    **head,
                    "object": "chat.completion",
                    "choices": [{**choice, "stop_reason": matched}],
                    "usage": usage,
                    "prompt_logprobs": None,
                }
            )
        include_usage = (body.get("stream_options") or {}).get("include_usage")

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            doc = {**head, "object": "chat.completion.chunk", "choices": [{**choice, **extra}]}
            return f"data: {json.dumps(doc)}\n\n"

        async def stream() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            for kind, text in pieces:
                yield chunk({kind: text})
            yield chunk({"content": ""}, finish, stop_reason=matched)
            if include_usage:
                doc = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}
                yield f"data: {json.dumps(doc)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    def _generate(
        self, model: str, max_tokens: int | None, stops: list[str]
    ) -> tuple[list[tuple[str, str]], str, str | None]:
        """The answer's tokens as (delta field, text), finish_reason and stop_reason."""
        answer, matched = self.answers[model], None
        for stop in stops:
            if stop and stop in answer:
                answer, matched = answer[: answer.index(stop)], stop
        pieces = [("reasoning_content", t) for t in TOKEN.findall(self.reasoning.get(model, ""))]
        pieces += [("content", t) for t in TOKEN.findall(answer)]
        if max_tokens is not None and len(pieces) > max_tokens:
            return pieces[:max_tokens], "length", None
        return pieces, "stop", matched


def error(status: int, kind: str, message: str) -> Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


class RoutePrefixes:
    """ASGI: Serve's proxy choosing an application by route prefix (the longest that matches;
    `root_path` set to it, the path kept whole, as Ray does with starlette >= 0.33)."""

    def __init__(self, apps: dict[str, ASGIApp]) -> None:
        self.apps = sorted(apps.items(), key=lambda item: -len(item[0]))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http", "run with lifespan off"
        path = scope["path"]
        for prefix, app in self.apps:
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                root = "" if prefix == "/" else prefix
                await app({**scope, "root_path": root}, receive, send)
                return


@contextmanager
def serve(stand_in: RayOpenAIStandIn, host: str = "127.0.0.1") -> Iterator[str]:
    """The stand-in at `/` and the Messages front at `/v1/messages` on one port, as the
    rendered Serve config has them; yields the root URL (without `/v1`)."""
    port = free_port()
    url = f"http://{host}:{port}"
    app = RoutePrefixes({"/": stand_in.app(), "/v1/messages": messages_front(url)})
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_ready(host, port, timeout=30)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
