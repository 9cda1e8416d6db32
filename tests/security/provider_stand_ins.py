"""Stand-ins for Anthropic's and OpenAI's APIs, answering as their documentation shows, on the
providers' real host names over TLS (a certificate from a throwaway CA).

What a request gets is the next scenario of the stand-in's `script` (for agents, whose bodies
the test does not write), else the one named by a word in its body, `scenario:<name>`:

- `ok`: an answer with usage: Anthropic Messages (JSON, or the documented event stream:
  `message_start` with the input and cache tokens, `content_block_delta`s, `message_delta` with
  the cumulative output), OpenAI chat completions (JSON, or chunks with the usage chunk last
  when the request asked for `stream_options.include_usage`) and Responses (JSON, or events
  ending in `response.completed` with its usage);
- `rate_limited`: 429, Anthropic's `rate_limit_error` with `retry-after` and the
  `anthropic-ratelimit-*` headers, OpenAI's `rate_limit_exceeded` with `retry-after` and the
  `x-ratelimit-*` headers;
- `overloaded`: Anthropic's 529 `overloaded_error` (its documented body), with `retry-after`;
- `server_error`: 500, Anthropic's `api_error`, OpenAI's `server_error`;
- `cut`: a stream whose connection drops after `DELTAS_BEFORE_CUT` content deltas;
- `error_event`: (Anthropic) a 200 stream that ends in the documented `event: error` with an
  `overloaded_error` after `DELTAS_BEFORE_CUT` deltas.

Bodies and headers are those of the providers' pages (Anthropic: Errors, Rate limits,
Streaming Messages; OpenAI: Error codes, Rate limits, the chat and Responses streaming events).
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ANTHROPIC_USAGE = {
    "input_tokens": 25,
    "cache_creation_input_tokens": 2051,
    "cache_read_input_tokens": 1200,
    "output_tokens": 15,
}
"""What the stand-in's Messages answers report (Anthropic's `input_tokens` leaves out the
cache)."""
CHAT_USAGE = {
    "prompt_tokens": 19,
    "completion_tokens": 10,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}
RESPONSES_USAGE = {
    "input_tokens": 36,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 12,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 48,
}
DELTAS_BEFORE_CUT = 3
"""Content deltas a `cut` or `error_event` stream sends before it ends."""
RETRY_AFTER = "17"
"""Seconds the stand-in's 429 and 529 answers ask the client to wait."""
WORDS = ["Hello", "!", " How", " can", " I", " help", " you", " today", "?", " Bye"]

ANTHROPIC_ERRORS = {
    "rate_limited": (429, "rate_limit_error", "Number of request tokens has exceeded your "
                     "per-minute rate limit (https://docs.anthropic.com/en/api/rate-limits); "
                     "see the response headers for current usage. Please reduce the prompt "
                     "length or the maximum tokens requested, or try again later. You may "
                     "also contact sales at https://www.anthropic.com/contact-sales to discuss "
                     "your options for a rate limit increase."),
    "overloaded": (529, "overloaded_error", "Overloaded"),
    "server_error": (500, "api_error", "Internal server error"),
}  # fmt: skip
OPENAI_ERRORS = {
    "rate_limited": (429, {
        "message": "Rate limit reached for gpt-4.1-mini in organization org-standin on requests "
        "per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s. Visit "
        "https://platform.openai.com/account/rate-limits to learn more.",
        "type": "requests", "param": None, "code": "rate_limit_exceeded",
    }),
    "server_error": (500, {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error", "param": None, "code": None,
    }),
}  # fmt: skip


class ProviderStandIn:
    """api.anthropic.com and api.openai.com on `address`:443 over TLS; remembers every request
    (path, headers, body) in `seen`, with its `status` and the JSON body it answered
    (`answer`). `retry_after` is what its 429 and 529 answers ask a client to wait."""

    def __init__(self, address: str, cert: Path, *, retry_after: str = RETRY_AFTER) -> None:
        self.seen: list[dict[str, Any]] = []
        self.script: list[str] = []
        """Scenarios for the next model calls, first first, whatever their bodies say."""

        class Handler(_Handler):
            pass

        Handler.seen, Handler.script, Handler.retry_after = self.seen, self.script, retry_after
        Handler.lock = threading.Lock()
        self.server = ThreadingHTTPServer((address, 443), Handler)
        self.server.daemon_threads = True
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]]
    script: list[str]
    retry_after: str
    lock: threading.Lock
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.call: dict[str, Any] = {"path": self.path, "headers": dict(self.headers), "body": body}
        self.seen.append(self.call)  # calls may overlap: each handler writes to its own
        doc = json.loads(body)
        found = re.search(rb"scenario:(\w+)", body)
        scenario = found.group(1).decode() if found else "ok"
        path = self.path.partition("?")[0]  # claude-code asks for /v1/messages?beta=true
        if path in ("/v1/messages", "/v1/chat/completions", "/v1/responses"):
            with self.lock:
                if self.script:
                    scenario = self.script.pop(0)
        if path == "/v1/messages":
            self._anthropic(scenario, doc)
        elif path == "/v1/chat/completions":
            self._chat(scenario, doc)
        elif path == "/v1/responses":
            self._responses(scenario, doc)
        else:
            self._json(404, {"error": {"message": f"Invalid URL (POST {self.path})",
                                       "type": "invalid_request_error", "param": None,
                                       "code": None}})  # fmt: skip

    # -- Anthropic Messages ------------------------------------------------------------------

    def _anthropic(self, scenario: str, doc: dict[str, Any]) -> None:
        if scenario in ANTHROPIC_ERRORS:
            status, kind, message = ANTHROPIC_ERRORS[scenario]
            headers = {"request-id": "req_011CSHoEeqs5C35K2UUqR7Fy"}
            if status in (429, 529):
                headers["retry-after"] = self.retry_after
            if status == 429:
                headers |= {
                    "anthropic-ratelimit-requests-limit": "50",
                    "anthropic-ratelimit-requests-remaining": "0",
                    "anthropic-ratelimit-requests-reset": "2025-10-01T12:00:17Z",
                    "anthropic-ratelimit-input-tokens-limit": "30000",
                    "anthropic-ratelimit-input-tokens-remaining": "0",
                    "anthropic-ratelimit-input-tokens-reset": "2025-10-01T12:00:17Z",
                }
            error = {"type": "error", "error": {"type": kind, "message": message},
                     "request_id": headers["request-id"]}  # fmt: skip
            self._json(status, error, headers)
            return
        message_id, model = "msg_013Zva2CMHLNnXjNJJKqJ2EF", doc["model"]
        if not doc.get("stream"):
            self._json(200, {
                "id": message_id, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "".join(WORDS)}],
                "stop_reason": "end_turn", "stop_sequence": None, "usage": ANTHROPIC_USAGE,
            })  # fmt: skip
            return
        start_usage = {**ANTHROPIC_USAGE, "output_tokens": 1}
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": {
                "id": message_id, "type": "message", "role": "assistant", "content": [],
                "model": model, "stop_reason": None, "stop_sequence": None,
                "usage": start_usage}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("ping", {"type": "ping"}),
        ]  # fmt: skip
        words = WORDS[:DELTAS_BEFORE_CUT] if scenario in ("cut", "error_event") else WORDS
        events += [
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": word}})
            for word in words
        ]  # fmt: skip
        if scenario == "error_event":
            events.append(("error", {"type": "error", "error": {
                "type": "overloaded_error", "message": "Overloaded"}}))  # fmt: skip
        elif scenario != "cut":
            events += [
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                ("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                   "usage": {"output_tokens": ANTHROPIC_USAGE["output_tokens"]}}),
                ("message_stop", {"type": "message_stop"}),
            ]  # fmt: skip
        data = [f"event: {name}\ndata: {json.dumps(event)}\n\n".encode() for name, event in events]
        self._stream(data, cut=scenario == "cut")

    # -- OpenAI chat completions -------------------------------------------------------------

    def _openai_error(self, scenario: str) -> bool:
        if scenario not in OPENAI_ERRORS:
            return False
        status, error = OPENAI_ERRORS[scenario]
        headers = {"x-request-id": "req_a1b2c3d4e5f6"}
        if status == 429:
            headers |= {
                "retry-after": self.retry_after,
                "x-ratelimit-limit-requests": "3",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "20s",
                "x-ratelimit-limit-tokens": "150000",
                "x-ratelimit-remaining-tokens": "149984",
                "x-ratelimit-reset-tokens": "6m0s",
            }
        self._json(status, {"error": error}, headers)
        return True

    def _chat(self, scenario: str, doc: dict[str, Any]) -> None:
        if self._openai_error(scenario):
            return
        base = {"id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "created": 1741569952,
                "model": doc["model"], "system_fingerprint": "fp_44709d6fcb"}  # fmt: skip
        if not doc.get("stream"):
            self._json(200, {**base, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": "".join(WORDS),
                                        "refusal": None},
                "logprobs": None, "finish_reason": "stop"}], "usage": CHAT_USAGE})  # fmt: skip
            return
        usage_asked = (doc.get("stream_options") or {}).get("include_usage") is True
        chunk = {**base, "object": "chat.completion.chunk"}
        if usage_asked:
            chunk["usage"] = None

        def delta(content: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**chunk, 'choices': [choice]})}\n\n".encode()

        words = WORDS[:DELTAS_BEFORE_CUT] if scenario == "cut" else WORDS
        data = [delta({"role": "assistant", "content": "", "refusal": None})]
        data += [delta({"content": word}) for word in words]
        if scenario != "cut":
            data.append(delta({}, "stop"))
            if usage_asked:
                last = {**chunk, "choices": [], "usage": CHAT_USAGE}
                data.append(f"data: {json.dumps(last)}\n\n".encode())
            data.append(b"data: [DONE]\n\n")
        self._stream(data, cut=scenario == "cut")

    # -- OpenAI Responses --------------------------------------------------------------------

    def _responses(self, scenario: str, doc: dict[str, Any]) -> None:
        if self._openai_error(scenario):
            return
        text = "".join(WORDS)
        response = {
            "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
            "object": "response", "created_at": 1741476542, "status": "completed",
            "model": doc["model"], "max_output_tokens": doc.get("max_output_tokens"),
            "output": [{"type": "message", "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e6",
                        "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": RESPONSES_USAGE,
        }  # fmt: skip
        if not doc.get("stream"):
            self._json(200, response)
            return
        open_response = {**response, "status": "in_progress", "output": [], "usage": None}
        item = {"type": "message", "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e6",
                "status": "in_progress", "role": "assistant", "content": []}  # fmt: skip
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": open_response},
            {"type": "response.in_progress", "response": open_response},
            {"type": "response.output_item.added", "output_index": 0, "item": item},
            {"type": "response.content_part.added", "item_id": item["id"], "output_index": 0,
             "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}},
        ]  # fmt: skip
        words = WORDS[:DELTAS_BEFORE_CUT] if scenario == "cut" else WORDS
        events += [
            {"type": "response.output_text.delta", "item_id": item["id"], "output_index": 0,
             "content_index": 0, "delta": word}
            for word in words
        ]  # fmt: skip
        if scenario != "cut":
            events += [
                {"type": "response.output_text.done", "item_id": item["id"], "output_index": 0,
                 "content_index": 0, "text": text},
                {"type": "response.output_item.done", "output_index": 0,
                 "item": response["output"][0]},
                {"type": "response.completed", "response": response},
            ]  # fmt: skip
        data = [
            f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': n})}\n\n".encode()
            for n, e in enumerate(events)
        ]
        self._stream(data, cut=scenario == "cut")

    # -- the wire ----------------------------------------------------------------------------

    def _json(
        self, status: int, doc: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(doc).encode()
        self.call |= {"status": status, "answer": data}
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, events: list[bytes], *, cut: bool) -> None:
        """Events as chunks; a cut stream drops the connection instead of the last chunk."""
        self.call["status"] = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in events:
            self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            self.wfile.flush()
        if cut:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # no last chunk, no TLS close_notify
            return
        self.wfile.write(b"0\r\n\r\n")
