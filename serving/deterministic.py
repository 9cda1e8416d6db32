"""A deterministic model server: OpenAI's wire format, scripted words, no model.

For the tests and demos where the model's words do not matter (a worker's sandbox, the
proxy's metering, the scheduler's deferrals), as mini-swe-agent's `DeterministicModel` is,
but a real server on a real port: the agent, the proxy and the runner speak to it exactly as
they speak to llama.cpp, only nothing is loaded and every answer is known in advance.

- `GET /v1/models`: the served names. `POST /v1/completions` and `/v1/chat/completions`, as
  JSON or as SSE (`stream: true`, with the usage chunk when `stream_options.include_usage`).
- The answers are `--output` texts in the order given, one per call, the last one repeated;
  by default one sentence, which is no code (an agent that writes what it is told gets no
  further than a tiny model would; a test that needs working code scripts it).
- A token is a run of whitespace and the word after it (`\\s*\\S+`): the usage counts the prompt
  and the answer that way, `max_tokens` cuts the answer (finish `length`), a `stop` string
  cuts it before the stop (finish `stop`). A model the server does not serve is a 404, as
  llama.cpp answers it.
- A request that asks for JSON of a schema (`response_format` `{"type": "json_object",
  "schema": …}` as llama.cpp takes it, or OpenAI's `{"type": "json_schema", "json_schema":
  {"schema": …}}`) gets its scripted answer only when the answer is such JSON; else a 500 that
  says why: a constrained model cannot answer otherwise, so a test scripting it cannot either.

Run as `python -m serving.deterministic --host H --port P --model NAME … [--output TEXT …]`;
`autovibe up` starts it instead of llama.cpp when `model_server` is `deterministic`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import jsonschema
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from contracts.config import ModelsCatalog
from contracts.settings import Settings
from serving.probe import cpu_served_names

DEFAULT_OUTPUT = "Deterministic answer."
"""The answer when none is scripted."""
DEFAULT_MAX_TOKENS = 16
"""OpenAI's default `max_tokens` for `/v1/completions`; chat completions have none."""
TOKEN = re.compile(r"\s*\S+|\s+")


def tokens(text: str) -> list[str]:
    """The text in tokens; joined they give the text back."""
    return TOKEN.findall(text)


def answer(output: str, max_tokens: int | None, stop: Sequence[str]) -> tuple[list[str], str]:
    """The answer's tokens and its finish reason: cut at the first stop string, then at
    `max_tokens`."""
    finish = "stop"
    for s in stop:
        if s and s in output:
            output = output[: output.index(s)]
    pieces = tokens(output)
    if max_tokens is not None and len(pieces) > max_tokens:
        pieces, finish = pieces[:max_tokens], "length"
    return pieces, finish


def prompt_text(body: dict[str, Any], chat: bool) -> str:
    """What the usage counts as the prompt: the prompt, or each message as `role: content`."""
    if not chat:
        prompt = body.get("prompt", "")
        return "".join(prompt) if isinstance(prompt, list) else str(prompt)
    lines = []
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        lines.append(f"{message.get('role')}: {content or ''}")
    return "\n".join(lines)


class Script:
    """The scripted outputs, handed out one per call in order, the last one repeated."""

    def __init__(self, outputs: Sequence[str]) -> None:
        self._outputs = list(outputs) or [DEFAULT_OUTPUT]
        self._calls = itertools.count()
        self._lock = threading.Lock()

    def next(self) -> tuple[int, str]:
        """(call number from 1, its output)."""
        with self._lock:
            n = next(self._calls)
        return n + 1, self._outputs[min(n, len(self._outputs) - 1)]


def create_app(models: Sequence[str], outputs: Sequence[str]) -> Starlette:
    """The server's app, answering for `models` with `outputs`."""
    script = Script(outputs)
    served = list(models)

    async def list_models(request: Request) -> Response:
        data = [{"id": m, "object": "model", "owned_by": "autovibe", "created": 0} for m in served]
        return JSONResponse({"object": "list", "data": data})

    async def complete(request: Request) -> Response:
        chat = request.url.path.endswith("/chat/completions")
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the body is not a JSON object")
        model = body.get("model")
        if model not in served:
            return _error(404, f"model {model!r} is not served; served: {', '.join(served)}")
        stop = body.get("stop") or []
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is None and not chat:
            max_tokens = DEFAULT_MAX_TOKENS
        n, output = script.next()
        unmet = schema_problem(body.get("response_format"), output)
        if unmet is not None:
            return _error(500, f"scripted answer {n} breaks the requested schema: {unmet}")
        pieces, finish = answer(output, max_tokens, [stop] if isinstance(stop, str) else stop)
        prompt_tokens = max(1, len(tokens(prompt_text(body, chat))))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(pieces),
            "total_tokens": prompt_tokens + len(pieces),
        }
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-deterministic-{n}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        if not body.get("stream"):
            text = "".join(pieces)
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": text}}
                if chat
                else {"index": 0, "text": text, "logprobs": None}
            )
            return JSONResponse(
                {**head, "choices": [{**choice, "finish_reason": finish}], "usage": usage}
            )
        options = body.get("stream_options") or {}
        with_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return StreamingResponse(
            _chunks(head, chat, pieces, finish, usage if with_usage else None),
            media_type="text/event-stream",
        )

    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/completions", complete, methods=["POST"]),
        Route("/v1/chat/completions", complete, methods=["POST"]),
    ]
    return Starlette(routes=routes)


async def _chunks(
    head: dict[str, Any],
    chat: bool,
    pieces: list[str],
    finish: str,
    usage: dict[str, int] | None,
) -> AsyncIterator[bytes]:
    """The SSE events of a streamed answer: one token each, then the finish, the usage when
    asked for, and `[DONE]`."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n".encode()

    if chat:
        yield event([{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}])
    for piece in pieces:
        delta = {"delta": {"content": piece}} if chat else {"text": piece, "logprobs": None}
        yield event([{"index": 0, **delta, "finish_reason": None}])
    last: dict[str, Any] = {"delta": {}} if chat else {"text": "", "logprobs": None}
    yield event([{"index": 0, **last, "finish_reason": finish}])
    if usage is not None:
        yield event([], usage=usage)
    yield b"data: [DONE]\n\n"


def schema_problem(response_format: Any, output: str) -> str | None:
    """Why `output` is not JSON of the schema `response_format` asks for; None when it is, or
    when no schema is asked for."""
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_object":
        schema = response_format.get("schema", {})
    elif response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema", {})
    else:
        return None
    try:
        answer = json.loads(output)
    except ValueError as exc:
        return f"not JSON: {exc}"
    try:
        jsonschema.validate(answer, schema)
    except jsonschema.ValidationError as exc:
        return f"{'/'.join(map(str, exc.absolute_path)) or '(top)'}: {exc.message}"
    return None


def _error(status: int, message: str) -> JSONResponse:
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def server_argv(settings: Settings, catalog: ModelsCatalog) -> list[str]:
    """Command that serves every CPU pair's names on the settings' model port, as
    `serving.llamacpp.server_argv` does with llama.cpp."""
    argv = [sys.executable, "-m", "serving.deterministic"]
    argv += ["--host", settings.host, "--port", str(settings.model_port)]
    for name in cpu_served_names(catalog):
        argv += ["--model", name]
    return argv


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.deterministic", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", required=True, help="a served name")
    parser.add_argument(
        "--output", action="append", default=[], help="the next call's answer (in order)"
    )
    args = parser.parse_args(argv)
    app = create_app(args.model, args.output)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
