"""Token usage read from LLM responses as their bytes pass, without holding the whole body.

One `UsageMeter` per response: it is fed the raw chunks exactly as they go to the client,
undoes the content encoding for itself only (gzip, deflate, br, zstd), and reads either
server-sent events one at a time or, for a plain body, a copy kept up to `PARSE_LIMIT`.
Four API shapes are understood:

- OpenAI chat and text completions: `usage` in the body, or in the last event of a stream
  (only when the request asked for `stream_options.include_usage`);
- OpenAI Responses (`/v1/responses`): `usage` in the body, or in `response.completed`;
- Anthropic Messages (`/v1/messages`): `usage` in the body, or `message_start` (input and
  cache tokens) then `message_delta` (cumulative output tokens).

A meter made with no API (`None`) reads no usage: it keeps a plain body's JSON object in
`document`, for the endpoints priced per unit (`proxy.endpoints`).

Whatever arrives — broken JSON, a cut stream, an undecodable body — the meter never raises;
it says what went wrong in `problem` and leaves `complete` false, so the caller estimates.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable
from typing import Any, Literal

import brotli
import zstandard

from contracts.records import Usage

Api = Literal["openai_chat", "openai_completions", "openai_responses", "anthropic_messages"]

PARSE_LIMIT = 8 * 1024 * 1024
"""Decoded bytes of a plain (non-event) body kept to read its usage; beyond it, estimate."""
LINE_LIMIT = 1024 * 1024
"""Longest server-sent-events line read; a longer one is skipped as broken."""
DECODE_LIMIT = 256 * 1024 * 1024
"""Decoded bytes read from one response before the meter gives up (compression bombs)."""
_DECODE_SLICE = 16 * 1024

# Events that never carry usage or an id; skipping them spares a JSON parse per token.
_SKIPPED_EVENTS = frozenset(
    {"ping", "content_block_start", "content_block_delta", "content_block_stop"}
)
_USAGE_NULL = re.compile(rb'"usage"\s*:\s*null')


class UsageMeter:
    """Reads usage from one response's raw bytes, fed in order; never raises."""

    def __init__(self, api: Api | None, content_type: str = "", content_encoding: str = "") -> None:
        self.api = api
        self.events = content_type.lower().startswith("text/event-stream")
        self.raw_bytes = 0
        """Bytes fed, as they travelled (still encoded)."""
        self.decoded_bytes = 0
        self.output_events = 0
        """Server-sent events that carried generated output: about one token each (Anthropic's
        `content_block_delta`, a Responses `*.delta`, a chat or completions chunk with content)."""
        self.upstream_error: str | None = None
        """The error the provider named, in an error body or an error event of its stream: its
        `code` (OpenAI's `rate_limit_exceeded`) or else its `type` (Anthropic's
        `overloaded_error`)."""
        self.response_id: str | None = None
        self.usage: Usage | None = None
        """The usage the server reported; partial until `complete`."""
        self.complete = False
        """True once the server's final usage has been read."""
        self.document: dict[str, Any] | None = None
        """A plain body's JSON object, kept when the meter reads no usage (`api` None)."""
        self.problem: str | None = None
        """The first thing that went wrong reading the response, for the capture record."""
        self._decoder = _decoder(content_encoding)
        self._stopped = self._decoder is None
        if self._decoder is None:
            self.problem = f"cannot decode Content-Encoding {content_encoding!r}"
        self._body = bytearray()
        self._line = bytearray()
        self._skipping_line = False
        self._event: str | None = None
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        self.raw_bytes += len(chunk)
        if self._stopped or not chunk:
            return
        assert self._decoder is not None
        try:
            for start in range(0, len(chunk), _DECODE_SLICE):
                decoded = self._decoder(chunk[start : start + _DECODE_SLICE])
                self.decoded_bytes += len(decoded)
                if self.decoded_bytes > DECODE_LIMIT:
                    self._stop(f"more than {DECODE_LIMIT} decoded bytes; stopped reading")
                    return
                self._read(decoded)
        except (zlib.error, brotli.error, zstandard.ZstdError) as exc:
            self._stop(f"cannot decode the body: {exc}")

    def finish(self) -> None:
        """The body ended (or was cut): read what a plain body held."""
        if self._stopped:
            return
        self._stopped = True
        if self.events:
            # A cut stream's unterminated last event is discarded, as the SSE standard says.
            if self._line or self._data:
                self._note("the event stream ended inside an event")
            return
        if self.decoded_bytes > PARSE_LIMIT:
            self._note(f"body over the {PARSE_LIMIT}-byte parse limit; usage not read")
            return
        if not self._body:
            return
        doc = self._json(bytes(self._body), "body")
        self._body.clear()
        if doc is not None:
            self._take_body(doc)

    # -- reading -------------------------------------------------------------------------

    def _read(self, data: bytes) -> None:
        if not self.events:
            if self.decoded_bytes <= PARSE_LIMIT:
                self._body += data
            else:
                self._body.clear()
            return
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._partial_line(data[start:])
                return
            self._partial_line(data[start:end])
            if not self._skipping_line:
                self._line_done(bytes(self._line).removesuffix(b"\r"))
            self._line.clear()
            self._skipping_line = False
            start = end + 1

    def _partial_line(self, piece: bytes) -> None:
        if self._skipping_line:
            return
        if len(self._line) + len(piece) > LINE_LIMIT:
            self._note(f"an event line over {LINE_LIMIT} bytes was skipped")
            self._line.clear()
            self._skipping_line = True
            return
        self._line += piece

    def _line_done(self, line: bytes) -> None:
        if not line:
            if self._data:
                self._dispatch(self._event, b"\n".join(self._data))
            self._event, self._data = None, []
            return
        if line.startswith(b":"):
            return
        name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", errors="replace")

    def _dispatch(self, event: str | None, data: bytes) -> None:
        chunks = self.api in ("openai_chat", "openai_completions")
        if event == "content_block_delta" or (event is not None and event.endswith(".delta")):
            self.output_events += 1
        if event in _SKIPPED_EVENTS or (event is not None and event.endswith(".delta")):
            return
        if data.strip() == b"[DONE]":
            return
        if (
            chunks
            and self.response_id is not None
            and (b'"usage"' not in data or _USAGE_NULL.search(data))
        ):
            self.output_events += 1  # a chunk past the first, unparsed: a delta
            return
        doc = self._json(data, "event")
        if doc is None:
            return
        if chunks and _has_output(doc):
            self.output_events += 1
        self._take_event(event or _str(doc.get("type")), doc)

    def _take_body(self, doc: dict[str, Any]) -> None:
        self.response_id = _str(doc.get("id"))
        if self.api is None:
            self.document = doc
            return
        usage = usage_of(self.api, doc.get("usage"))
        if usage is not None:
            self.usage, self.complete = usage, True
        if doc.get("error") is not None and self.usage is None:
            self.upstream_error = _error_kind(doc.get("error"))
            self._note(f"upstream error: {self.upstream_error}")

    def _take_event(self, event: str | None, doc: dict[str, Any]) -> None:
        if event == "error":
            self.upstream_error = _error_kind(doc.get("error"))
            self._note(f"upstream error event: {self.upstream_error}")
            return
        if self.api is None:
            return
        if self.api == "anthropic_messages":
            self._take_anthropic(event, doc)
        elif self.api == "openai_responses":
            response = doc.get("response")
            if isinstance(response, dict):
                self.response_id = self.response_id or _str(response.get("id"))
                if event in ("response.completed", "response.incomplete", "response.failed"):
                    usage = usage_of(self.api, response.get("usage"))
                    if usage is not None:
                        self.usage, self.complete = usage, True
        else:
            self.response_id = self.response_id or _str(doc.get("id"))
            # With include_usage the last chunk carries the usage; vLLM may send it in every
            # chunk, cumulatively: the latest wins.
            usage = usage_of(self.api, doc.get("usage"))
            if usage is not None:
                self.usage, self.complete = usage, True

    def _take_anthropic(self, event: str | None, doc: dict[str, Any]) -> None:
        if event == "message_start":
            message = doc.get("message")
            if isinstance(message, dict):
                self.response_id = _str(message.get("id"))
                self.usage = usage_of("anthropic_messages", message.get("usage"))
        elif event == "message_delta":
            delta = doc.get("usage")
            if not isinstance(delta, dict):
                return
            # Counts in message_delta are cumulative; what it leaves out stands from message_start.
            start = self.usage or Usage()
            known = {
                "input_tokens": start.prompt_tokens
                - start.cache_creation_tokens
                - start.cache_read_tokens,
                "cache_creation_input_tokens": start.cache_creation_tokens,
                "cache_read_input_tokens": start.cache_read_tokens,
            }
            merged = {**known, **{k: v for k, v in delta.items() if v is not None}}
            usage = usage_of("anthropic_messages", merged)
            if usage is not None:
                self.usage, self.complete = usage, True

    def _json(self, data: bytes, what: str) -> dict[str, Any] | None:
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:
            self._note(f"{what} is not JSON: {_short(exc)}")
            return None
        if not isinstance(doc, dict):
            self._note(f"{what} is JSON but not an object")
            return None
        return doc

    def _note(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem

    def _stop(self, problem: str) -> None:
        self._note(problem)
        self._stopped = True
        self._body.clear()
        self._line.clear()


def usage_of(api: Api, value: Any) -> Usage | None:
    """The `usage` object of one API shape as a Usage; None when absent or malformed.

    `prompt_tokens` counts every input token, cached or not; the cache counts are parts of it.
    """
    if not isinstance(value, dict):
        return None
    if api in ("openai_chat", "openai_completions"):
        prompt, completion = value.get("prompt_tokens"), value.get("completion_tokens")
        cached = _get_int(value.get("prompt_tokens_details"), "cached_tokens")
        cache_creation = 0
    else:
        prompt, completion = value.get("input_tokens"), value.get("output_tokens")
        cached = _get_int(value.get("input_tokens_details"), "cached_tokens")
        cache_creation = 0
        if api == "anthropic_messages" and isinstance(prompt, int):
            # Anthropic's input_tokens leaves out the tokens written to and read from cache.
            cache_creation = _get_int(value, "cache_creation_input_tokens")
            cached = _get_int(value, "cache_read_input_tokens")
            prompt += cache_creation + cached
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cache_creation_tokens=cache_creation,
        cache_read_tokens=cached,
    )


def _decoder(content_encoding: str) -> Callable[[bytes], bytes] | None:
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return lambda data: data
    if len(codings) > 1:
        return None
    coding = codings[0]
    if coding in ("gzip", "x-gzip"):
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress
    if coding == "deflate":
        return zlib.decompressobj().decompress
    if coding == "br":
        return brotli.Decompressor().process
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress
    return None


def _error_kind(error: Any) -> str:
    """OpenAI's `code` is the finer name (`rate_limit_exceeded` under the type `requests`);
    Anthropic's errors have only a `type`."""
    if isinstance(error, dict):
        return _str(error.get("code")) or _str(error.get("type")) or "unknown"
    return _str(error) or "unknown"


def _has_output(chunk: dict[str, Any]) -> bool:
    """Whether a chat or completions chunk carries generated text or a tool call (the first
    chunk of a chat stream carries only the role, the last ones the finish reason or usage)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if choice.get("text") or (
            isinstance(delta, dict)
            and any(delta.get(k) for k in ("content", "tool_calls", "reasoning_content", "refusal"))
        ):
            return True
    return False


def _get_int(value: Any, key: str) -> int:
    found = value.get(key) if isinstance(value, dict) else None
    return found if isinstance(found, int) else 0


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
