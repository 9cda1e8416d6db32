"""The Anthropic Messages API's wire format, for a model plane that speaks OpenAI's.

What both model planes share: the request (`MessagesRequest`, `CountTokensRequest`), its
conversation as OpenAI-style chat turns (`chat_messages`), the errors (`ApiError`), and the
answer as the documented stream of events (`MessageEvents`, `sse`) or one Message
(`assemble`). The CPU server (`serving.app`) generates with llama.cpp in-process; the GPU
plane's front (`serving.messages_front`) asks Ray Serve's OpenAI app. Text content only: tools
are not shown to the model, earlier `thinking` blocks are dropped (as Anthropic does), and
`tool_use`/`tool_result` blocks sent back are rendered as text.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ANTHROPIC_TEMPERATURE = 1.0
"""The Messages API's documented default temperature."""

# -- the request ---------------------------------------------------------------------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentBlock(_Open):
    type: str
    text: str | None = None


class InputMessage(_Open):
    role: Literal["user", "assistant", "system"]
    """`system` mid-conversation is a Claude Code beta; it is read as part of the user's turn."""
    content: str | list[ContentBlock]


class MessagesRequest(_Open):
    """The fields of `POST /v1/messages` this server reads; others (tools, metadata, thinking,
    …) are accepted and ignored."""

    model: str
    max_tokens: int = Field(ge=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[ContentBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1)
    stream: bool = False


class CountTokensRequest(_Open):
    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[ContentBlock] | None = None


class ApiError(Exception):
    """An Anthropic-style error answer: HTTP status, error type, message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message

    def response(self) -> JSONResponse:
        body = {"type": "error", "error": {"type": self.kind, "message": self.message}}
        return JSONResponse(body, status_code=self.status)


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


def output_room(max_tokens: int, input_tokens: int, context: int | None) -> int:
    """`max_tokens` capped at the context the prompt leaves (the answer then stops at
    `max_tokens`); a 400 when the prompt alone fills the context; no cap when it is not known."""
    if context is None:
        return max_tokens
    if input_tokens >= context:
        raise invalid(f"prompt is too long: {input_tokens} tokens > {context - 1} maximum")
    return min(max_tokens, context - input_tokens)


def parse(model: type[MessagesRequest] | type[CountTokensRequest], raw: bytes) -> Any:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise invalid(f"{where}: {first['msg']}") from None


def chat_messages(
    system: str | list[ContentBlock] | None, messages: list[InputMessage]
) -> tuple[list[dict[str, str]], str]:
    """OpenAI-style chat messages for the chat handler, and the assistant prefill (the last
    message when it is the assistant's, which the answer continues)."""
    turns: list[dict[str, str]] = []
    instructions = _text(system, "system") if system is not None else ""
    if instructions:
        turns.append({"role": "system", "content": instructions})
    for index, message in enumerate(messages):
        role = "assistant" if message.role == "assistant" else "user"
        text = _text(message.content, f"messages.{index}.content")
        if turns and turns[-1]["role"] == role:  # chat templates want turns to alternate
            turns[-1]["content"] += "\n\n" + text
        else:
            turns.append({"role": role, "content": text})
    prefill = ""
    if turns[-1]["role"] == "assistant":
        prefill = turns.pop()["content"].rstrip()
    if not any(turn["role"] == "user" for turn in turns):
        raise invalid("messages: the conversation must contain a user message")
    return turns, prefill


def _text(content: str | list[ContentBlock], where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for index, block in enumerate(content):
        extra = block.model_extra or {}
        if block.type == "text":
            parts.append(block.text or "")
        elif block.type in ("thinking", "redacted_thinking"):
            continue  # earlier reasoning is not shown to the model again
        elif block.type == "tool_use":
            parts.append(f"[tool_use {extra.get('name')}: {json.dumps(extra.get('input'))}]")
        elif block.type == "tool_result":
            inner = extra.get("content", "")
            if isinstance(inner, list):
                inner = "\n".join(str(b.get("text", "")) for b in inner if isinstance(b, dict))
            parts.append(f"[tool_result]\n{inner}")
        else:
            raise invalid(
                f"{where}.{index}.type: content blocks of type {block.type!r} are not supported"
                " by this server (text, thinking, tool_use, tool_result)"
            )
    return "\n".join(parts)


# -- the answer ----------------------------------------------------------------------------


@dataclass
class Finish:
    reason: Literal["end_turn", "max_tokens", "stop_sequence"]
    stop_sequence: str | None
    output_tokens: int
    input_tokens: int | None = None
    """The server's own count of the prompt, when it differs from or comes after the one
    `message_start` gave; `message_delta`'s counts are cumulative and replace it."""


def sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def error_event(message: str) -> bytes:
    """The `error` event that ends a stream the server could not finish: the client sees why."""
    return sse({"type": "error", "error": {"type": "api_error", "message": message}})


class MessageEvents:
    """The Messages API's stream events for one answer, in the documented order: `start()`,
    then `piece(kind, text)` as the text arrives (`reasoning` becomes a thinking block,
    `content` a text block), then `finish(...)`."""

    def __init__(self, model: str, input_tokens: int) -> None:
        self.model, self.input_tokens = model, input_tokens
        self._index, self._open = -1, ""

    def start(self) -> list[dict[str, Any]]:
        message: dict[str, Any] = {
            "id": f"msg_{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
        }
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def piece(self, kind: str, text: str) -> list[dict[str, Any]]:
        block = "thinking" if kind == "reasoning" else "text"
        events = [] if block == self._open else self._open_block(block)
        delta = (
            {"type": "thinking_delta", "thinking": text}
            if block == "thinking"
            else {"type": "text_delta", "text": text}
        )
        return [*events, {"type": "content_block_delta", "index": self._index, "delta": delta}]

    def finish(self, finish: Finish) -> list[dict[str, Any]]:
        # An answer always has its text block, even empty.
        events = [] if self._open == "text" else self._open_block("text")
        return [
            *events,
            *_close_block(self._index, self._open),
            {
                "type": "message_delta",
                "delta": {"stop_reason": finish.reason, "stop_sequence": finish.stop_sequence},
                "usage": _final_usage(finish),
            },
            {"type": "message_stop"},
        ]

    def _open_block(self, block: str) -> list[dict[str, Any]]:
        events = list(_close_block(self._index, self._open)) if self._open else []
        self._index, self._open = self._index + 1, block
        start = (
            {"type": "thinking", "thinking": "", "signature": ""}
            if block == "thinking"
            else {"type": "text", "text": ""}
        )
        events.append({"type": "content_block_start", "index": self._index, "content_block": start})
        return events


def _final_usage(finish: Finish) -> dict[str, int]:
    if finish.input_tokens is None:
        return {"output_tokens": finish.output_tokens}
    return {"input_tokens": finish.input_tokens, "output_tokens": finish.output_tokens}


def _close_block(index: int, kind: str) -> Iterator[dict[str, Any]]:
    if kind == "thinking":  # signatures are Anthropic's; a local model's thinking has none
        yield {
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": "signature_delta", "signature": ""},
        }
    yield {"type": "content_block_stop", "index": index}


def assemble(events: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The non-streamed Message that a stream of events describes."""
    message: dict[str, Any] = {}
    for event in events:
        kind = event["type"]
        if kind == "message_start":
            message = dict(event["message"])
            message["content"] = []
        elif kind == "content_block_start":
            message["content"].append(dict(event["content_block"]))
        elif kind == "content_block_delta":
            block, delta = message["content"][event["index"]], event["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
        elif kind == "message_delta":
            message |= event["delta"]
            message["usage"] = {**message["usage"], **event["usage"]}
    return message
