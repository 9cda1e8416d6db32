"""Streaming: pass-through without buffering, usage of every API shape read on the way, and
bad traffic captured with an error instead of crashing the proxy.

Through the real mitmdump: the upstream is a raw socket server that plays one scripted
answer per request (chosen by the `scenario` query parameter), so a test controls every byte
and every pause, down to a reset: events pass before the upstream finishes, cut streams and
resets, bodies passed on as they came (undecodable, encoded, huge). How each API's usage is
read from a whole answer (`ANSWERS`) is metering's own work, tested in the proxy's addon chain
(proxy_harness.addon_chain) with the same bytes.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import socket
import socketserver
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import brotli
import httpx
import pytest
from proxy_harness import PRICES_YAML, Chain, Proxy, addon_chain

from budget import open_counters
from contracts.config import PriceCatalog, load_prices
from contracts.credentials import load_or_create_key
from contracts.dataroot import DataRoot
from contracts.records import FlowRecord
from contracts.settings import Settings, free_port
from proxy.launch import mitmdump_argv, wait_ready
from proxy.usage import PARSE_LIMIT, UsageMeter

Script = Callable[[socket.socket, dict[str, Any]], None]


def head(content_type: str, *, length: int | None = None, encoding: str | None = None) -> bytes:
    lines = ["HTTP/1.1 200 OK", f"Content-Type: {content_type}", "Connection: close"]
    lines.append(
        f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    )
    if encoding:
        lines.append(f"Content-Encoding: {encoding}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


LAST_CHUNK = b"0\r\n\r\n"


def sse(*events: dict[str, Any] | str, named: bool = False) -> bytes:
    out = b""
    for event in events:
        if isinstance(event, str):
            out += f"data: {event}\n\n".encode()
        elif named:
            out += f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
        else:
            out += f"data: {json.dumps(event)}\n\n".encode()
    return out


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a crashed upstream does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- the scripted answers --------------------------------------------------------------------

CHAT_USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


def chat_events(request: dict[str, Any]) -> tuple[bytes, bytes]:
    """An OpenAI chat stream as (first event, rest); usage only if the request asked for it."""
    asked = (request.get("stream_options") or {}).get("include_usage")
    first = sse({"id": "chatcmpl-s1", "choices": [{"delta": {"content": "Hel"}}], "usage": None})
    rest = sse({"id": "chatcmpl-s1", "choices": [{"delta": {"content": "lo"}}], "usage": None})
    if asked:
        rest += sse({"id": "chatcmpl-s1", "choices": [], "usage": CHAT_USAGE})
    return first, rest + sse("[DONE]")


SLOW_REST = threading.Event()
"""Set by the test once the first event of `slow_chat` reached it through the proxy."""
SLOW_HELD_S = 20


def slow_chat(sock: socket.socket, request: dict[str, Any]) -> None:
    """The first event, then the rest only when the test has received the first (at most
    SLOW_HELD_S later): a proxy that buffers delivers nothing until then."""
    first, rest = chat_events(request)
    sock.sendall(head("text/event-stream") + chunk(first))
    SLOW_REST.wait(SLOW_HELD_S)
    sock.sendall(chunk(rest) + LAST_CHUNK)


RESPONSES_EVENTS = sse(
    {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}},
    {"type": "response.output_text.delta", "delta": "Hel"},
    {"type": "response.output_text.delta", "delta": "lo"},
    {
        "type": "response.completed",
        "response": {
            "id": "resp_1",
            "status": "completed",
            "usage": {
                "input_tokens": 20,
                "input_tokens_details": {"cached_tokens": 5},
                "output_tokens": 9,
                "output_tokens_details": {"reasoning_tokens": 3},
                "total_tokens": 29,
            },
        },
    },
    named=True,
)

ANTHROPIC_START = sse(
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "model": "tiny",
            "usage": {
                "input_tokens": 10,
                "cache_creation_input_tokens": 4,
                "cache_read_input_tokens": 6,
                "output_tokens": 1,
            },
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    named=True,
)
ANTHROPIC_END = sse(
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}},
    {"type": "message_stop"},
    named=True,
)


@dataclass(frozen=True)
class Answer:
    """A whole answer: its type, its body (or how the request makes it), sent with its
    Content-Length or in 1000-byte chunks (`streamed`), maybe encoded. The socket upstream
    plays it to the real mitmdump (`play`); the addon chain is handed the same bytes."""

    content_type: str
    body: bytes | Callable[[dict[str, Any]], bytes]
    streamed: bool = False
    encoding: str | None = None

    def bytes_for(self, request: dict[str, Any]) -> bytes:
        return self.body(request) if callable(self.body) else self.body

    def chunks(self, body: bytes, size: int = 1000) -> list[bytes]:
        return [body[start : start + size] for start in range(0, len(body), size)]

    def headers(self) -> dict[str, str]:
        found = {"Content-Type": self.content_type}
        if self.encoding:
            found["Content-Encoding"] = self.encoding
        return found

    def play(self, sock: socket.socket, request: dict[str, Any]) -> None:
        body = self.bytes_for(request)
        if not self.streamed:
            sock.sendall(head(self.content_type, length=len(body), encoding=self.encoding) + body)
            return
        sock.sendall(head(self.content_type, encoding=self.encoding))
        for part in self.chunks(body):
            sock.sendall(chunk(part))
        sock.sendall(LAST_CHUNK)


def chat_stream(request: dict[str, Any]) -> bytes:
    return b"".join(chat_events(request))


def llama_stream(request: dict[str, Any]) -> bytes:
    """llama.cpp's server: no usage in streams, whatever the request asks."""
    return b"".join(chat_events({}))


def cut_chat(sock: socket.socket, request: dict[str, Any]) -> None:
    first, _ = chat_events(request)
    sock.sendall(head("text/event-stream") + chunk(first))
    time.sleep(0.05)
    reset(sock)


def cut_anthropic(sock: socket.socket, request: dict[str, Any]) -> None:
    sock.sendall(head("text/event-stream") + chunk(ANTHROPIC_START))
    time.sleep(0.05)
    reset(sock)


def reset_at_once(sock: socket.socket, request: dict[str, Any]) -> None:
    reset(sock)


HUGE_JSON = json.dumps(
    {"id": "chatcmpl-huge", "choices": [{"text": "x" * (PARSE_LIMIT + 1000)}], "usage": CHAT_USAGE}
).encode()
HUGE_STREAM = sse(
    *({"id": "chatcmpl-big", "choices": [{"delta": {"content": "y" * 1000}}]} for _ in range(4000)),
    {"id": "chatcmpl-big", "choices": [], "usage": CHAT_USAGE},
    "[DONE]",
)
BROKEN_SSE = (
    b'data: {"id": "chatcmpl-b", "choices": [], "usage": {"prompt_tokens": 3\n\n'
    b"data: " + b"z" * (2 * 1024 * 1024) + b"\n\n"
    b"event without a colon\n"
    b'data: {"id": "chatcmpl-b", "choices": [], "usage": {"prompt_tokens": 3, '
    b'"completion_tokens": 4}}\n\n'
    b"data: [DONE]\n\n"
)

ANSWERS: dict[str, Answer] = {
    "chat-stream": Answer("text/event-stream", chat_stream, streamed=True),
    "llama-stream": Answer("text/event-stream", llama_stream, streamed=True),
    "responses-stream": Answer("text/event-stream", RESPONSES_EVENTS, streamed=True),
    "responses-json": Answer(
        "application/json",
        json.dumps(
            {
                "id": "resp_2",
                "object": "response",
                "usage": {"input_tokens": 30, "output_tokens": 8, "total_tokens": 38},
            }
        ).encode(),
    ),
    "anthropic-stream": Answer("text/event-stream", ANTHROPIC_START + ANTHROPIC_END, streamed=True),
    "anthropic-json": Answer(
        "application/json",
        json.dumps(
            {
                "id": "msg_2",
                "type": "message",
                "usage": {
                    "input_tokens": 7,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 100,
                    "output_tokens": 3,
                },
            }
        ).encode(),
    ),
    "chunked-json": Answer(
        "application/json",
        json.dumps({"id": "chatcmpl-c", "usage": CHAT_USAGE}).encode(),
        streamed=True,
    ),
    "malformed-json": Answer("application/json", b'{"id": "chatcmpl-m", "usage": {'),
    "broken-sse": Answer("text/event-stream", BROKEN_SSE, streamed=True),
    "gzip-json": Answer(
        "application/json",
        gzip.compress(json.dumps({"id": "chatcmpl-g", "usage": CHAT_USAGE}).encode()),
        encoding="gzip",
    ),
    "brotli-sse": Answer(
        "text/event-stream",
        brotli.compress(chat_events({"stream_options": {"include_usage": True}})[1]),
        streamed=True,
        encoding="br",
    ),
    "false-gzip": Answer("application/json", b"this is not gzip", encoding="gzip"),
    "huge-json": Answer("application/json", HUGE_JSON),
    "huge-stream": Answer("text/event-stream", HUGE_STREAM, streamed=True),
}
"""The answers that are whole: the same bytes to the real mitmdump and to the addon chain."""

SCRIPTS: dict[str, Script] = {
    "slow-chat": slow_chat,
    "cut-chat": cut_chat,
    "cut-anthropic": cut_anthropic,
    "reset": reset_at_once,
    **{scenario: answer.play for scenario, answer in ANSWERS.items()},
}


# -- the upstream and the proxy ----------------------------------------------------------------


@dataclass
class ScriptedUpstream:
    port: int

    def url(self, path: str, scenario: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}?scenario={scenario}"


class _Handler(socketserver.BaseRequestHandler):
    upstream: ScriptedUpstream

    def handle(self) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            got = self.request.recv(65536)
            if not got:
                return
            data += got
        head_bytes, _, body = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        length = int(headers.get("Content-Length", headers.get("content-length", "0")))
        while len(body) < length:
            body += self.request.recv(65536)
        scenario = parse_qs(urlsplit(lines[0].split()[1]).query)["scenario"][0]
        with contextlib.suppress(OSError):  # the proxy hung up first: nothing to tell
            SCRIPTS[scenario](self.request, json.loads(body))


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    class Handler(_Handler):
        pass

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    Handler.upstream = ScriptedUpstream(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Handler.upstream
    server.shutdown()
    server.server_close()


PROBE = '''
"""Stands for any addon that settles from metering (the budget addon): what it sees."""
import json, os
from proxy.addons.metering import metered

class Probe:
    def _seen(self, flow, hook):
        facts = metered(flow)
        if facts is None or facts.model is None:
            return
        usage = facts.usage.model_dump() if facts.usage else None
        line = {"id": flow.id, "hook": hook, "usage": usage, "cost": str(facts.cost_usd)}
        with open(os.environ["PROBE_OUT"], "a") as out:
            out.write(json.dumps(line) + "\\n")

    def response(self, flow):
        self._seen(flow, "response")

    def error(self, flow):
        self._seen(flow, "error")

addons = [Probe()]
'''


@dataclass
class StreamingProxy(Proxy):
    probe_out: Path = Path()

    def probed(self) -> dict[str, dict[str, Any]]:
        lines = self.probe_out.read_text().splitlines() if self.probe_out.exists() else []
        return {line["id"]: line for line in map(json.loads, lines)}


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, upstream: ScriptedUpstream
) -> Iterator[StreamingProxy]:
    """mitmdump as the platform starts it, with a probe addon loaded *before* ours, and
    budgets open for project p1 (the budget addon refuses calls with no budget)."""
    configs = tmp_path_factory.mktemp("configs")
    (configs / "prices.yaml").write_text(PRICES_YAML)
    work = tmp_path_factory.mktemp("probe")
    (work / "probe.py").write_text(PROBE)
    settings = Settings(
        data=tmp_path_factory.mktemp("data"),
        configs=configs,
        host="127.0.0.1",
        proxy_port=free_port(),
        model_port=upstream.port,
    )
    root = DataRoot.at(settings.data)
    key = load_or_create_key(root)
    counters = open_counters("sqlite", path=root.budget_counters)
    counters.ensure_scope("project:p1", Decimal(1000), "USD", "once", time.time())
    counters.ensure_scope("machine:p1:m1", Decimal(1000), "USD", "daily", time.time())
    counters.close()
    argv = mitmdump_argv(settings)
    argv[argv.index("-s") : argv.index("-s")] = ["-s", str(work / "probe.py")]
    env = {**os.environ, "PROBE_OUT": str(work / "probe.jsonl")}
    log_path = root.root / "mitmdump.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_ready(settings.host, settings.proxy_port, timeout=30, process=process)
            yield StreamingProxy(settings, root, key, probe_out=work / "probe.jsonl")
        finally:
            process.terminate()
            process.wait(timeout=15)
    output = log_path.read_text()
    assert "Traceback" not in output, output
    assert process.returncode == 0, output


@pytest.fixture(scope="module")
def prices(proxy: StreamingProxy) -> PriceCatalog:
    return load_prices(proxy.settings.configs)


def call(
    proxy: StreamingProxy,
    upstream: ScriptedUpstream,
    scenario: str,
    path: str = "/v1/chat/completions",
    **body: Any,
) -> tuple[httpx.Response, bytes]:
    """One LLM call through the proxy; the response and its body exactly as it travelled."""
    request = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body}
    with (
        proxy.client(proxy.identity(f"a-{scenario}")) as client,
        client.stream("POST", upstream.url(path, scenario), json=request) as response,
    ):
        raw = b"".join(response.iter_raw())
    return response, raw


def record(proxy: StreamingProxy, scenario: str) -> FlowRecord:
    deadline = time.monotonic() + 5
    while True:
        found = [r for r in proxy.spooled() if r.assignment == f"a-{scenario}"]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(found) == 1, found
    return found[0]


def settled(proxy: StreamingProxy, flow: FlowRecord, hook: str = "response") -> None:
    """The probe, run before metering's own hooks, already saw the final usage and cost."""
    seen = proxy.probed()[flow.id]
    assert seen["hook"] == hook
    assert flow.usage is not None
    assert seen["usage"] == flow.usage.model_dump()
    assert Decimal(seen["cost"]) == flow.cost_usd > 0


# -- streaming ----------------------------------------------------------------------------------


def test_events_pass_through_before_the_upstream_finishes(
    proxy: StreamingProxy, upstream: ScriptedUpstream, prices: PriceCatalog
) -> None:
    request = {"model": "tiny", "messages": [], "stream": True}
    SLOW_REST.clear()
    t0 = time.perf_counter()
    try:
        with (
            proxy.client(proxy.identity("a-slow-chat")) as client,
            client.stream(
                "POST", upstream.url("/v1/chat/completions", "slow-chat"), json=request
            ) as response,
        ):
            chunks = response.iter_raw()
            first = next(chunks)
            first_at = time.perf_counter() - t0
            # The upstream still holds the rest: the first event came through unbuffered.
            assert first_at < SLOW_HELD_S / 2, f"first event after {first_at:.3f}s: buffered"
            time.sleep(1.0)
            SLOW_REST.set()
            rest = b"".join(chunks)
            done_at = time.perf_counter() - t0
    finally:
        SLOW_REST.set()
    assert first.startswith(b"data: ") and b"Hel" in first and b"[DONE]" not in first
    assert done_at >= 1.0 and b"[DONE]" in rest

    flow = record(proxy, "slow-chat")
    assert flow.streamed and flow.error is None
    # The proxy saw the first event before the test's one-second wait, not with the rest.
    assert flow.first_chunk_ms is not None and flow.first_chunk_ms < flow.duration_ms - 900
    assert flow.duration_ms >= 1000
    assert flow.response_bytes == len(first + rest)
    assert flow.usage is not None and not flow.usage.estimated
    assert (flow.usage.prompt_tokens, flow.usage.completion_tokens) == (12, 5)
    assert flow.cost_usd == prices.cost_usd("local", "tiny", 12, 5)
    assert flow.response_id == "chatcmpl-s1"
    settled(proxy, flow)


# -- cut streams and bad traffic ----------------------------------------------------------------


def test_a_cut_stream_is_estimated_from_what_was_seen(
    proxy: StreamingProxy, upstream: ScriptedUpstream
) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        call(proxy, upstream, "cut-chat", stream=True)
    flow = record(proxy, "cut-chat")
    assert flow.error is not None
    assert flow.usage is not None and flow.usage.estimated and flow.cost_usd > 0
    assert flow.response_bytes > 0
    settled(proxy, flow, hook="error")

    with pytest.raises(httpx.RemoteProtocolError):
        call(proxy, upstream, "cut-anthropic", path="/v1/messages", max_tokens=9, stream=True)
    flow = record(proxy, "cut-anthropic")
    # message_start had the exact input; only the output is guessed.
    assert flow.usage is not None and flow.usage.estimated
    assert (flow.usage.prompt_tokens, flow.usage.cache_read_tokens) == (20, 6)
    assert flow.error is not None and flow.cost_usd > 0


def test_an_upstream_reset_is_captured_and_charged(
    proxy: StreamingProxy, upstream: ScriptedUpstream
) -> None:
    response, _ = call(proxy, upstream, "reset")
    assert response.status_code == 502
    flow = record(proxy, "reset")
    assert flow.error is not None and flow.status is None
    assert flow.usage is not None and flow.usage.estimated and flow.cost_usd > 0
    settled(proxy, flow, hook="error")


@pytest.mark.parametrize(
    ("scenario", "problem"),
    [
        ("malformed-json", "metering: body is not JSON"),
        ("false-gzip", "metering: cannot decode the body"),
        ("huge-json", "metering: body over the"),
    ],
)
def test_an_unreadable_body_passes_untouched_and_is_estimated_with_an_error(
    proxy: StreamingProxy, upstream: ScriptedUpstream, scenario: str, problem: str
) -> None:
    response, raw = call(proxy, upstream, scenario)
    assert response.status_code == 200
    script = SCRIPTS[scenario]
    assert (
        raw
        == {
            "malformed-json": b'{"id": "chatcmpl-m", "usage": {',
            "false-gzip": b"this is not gzip",
            "huge-json": HUGE_JSON,
        }[scenario]
    ), script
    flow = record(proxy, scenario)
    assert flow.error is not None and flow.error.startswith(problem), flow.error
    assert flow.usage is not None and flow.usage.estimated and flow.cost_usd > 0
    assert flow.response_bytes == len(raw)


def test_compressed_bodies_are_read_but_passed_through_encoded(
    proxy: StreamingProxy, upstream: ScriptedUpstream
) -> None:
    response, raw = call(proxy, upstream, "gzip-json")
    assert response.headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(raw))["id"] == "chatcmpl-g"
    flow = record(proxy, "gzip-json")
    assert flow.error is None and flow.usage is not None and flow.usage.total_tokens == 17
    assert flow.response_id == "chatcmpl-g" and flow.response_bytes == len(raw)

    response, raw = call(proxy, upstream, "brotli-sse", stream=True)
    assert response.headers["content-encoding"] == "br"
    assert b"[DONE]" in brotli.decompress(raw)
    flow = record(proxy, "brotli-sse")
    assert flow.error is None and flow.streamed
    assert flow.usage is not None and flow.usage.total_tokens == 17 and not flow.usage.estimated


# -- each API's usage, in the proxy's addon chain (no mitmdump) ---------------------------------


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Chain]:
    with addon_chain(tmp_path) as chain:
        yield chain


def answered(
    chain: Chain, scenario: str, path: str = "/v1/chat/completions", **body: Any
) -> tuple[FlowRecord, bytes, bytes]:
    """One LLM call through the chain, answered as ANSWERS[scenario] answers the request as
    forwarded: its record, the bytes the client got, and the request as forwarded."""
    request = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body}
    url = f"http://127.0.0.1:{chain.settings.model_port}{path}"
    flow = chain.send(chain.flow(chain.identity(f"a-{scenario}"), url, request))
    forwarded = flow.request.get_content() or b""
    answer = ANSWERS[scenario]
    data = answer.bytes_for(json.loads(forwarded))
    # In reads of up to 64 KiB, as mitmproxy reads them off a socket.
    chunks = answer.chunks(data, 65536) if answer.streamed else None
    raw = chain.respond(flow, body=data, headers=answer.headers(), chunks=chunks)
    return chain.spooled_one(assignment=f"a-{scenario}"), raw, forwarded


def test_include_usage_is_injected_when_absent(chain: Chain) -> None:
    flow, _, forwarded = answered(chain, "chat-stream", stream=True, temperature=0.5)
    assert json.loads(forwarded)["stream_options"] == {"include_usage": True}
    assert json.loads(forwarded)["temperature"] == 0.5
    assert flow.usage is not None and flow.usage.total_tokens == 17 and not flow.usage.estimated


def test_a_request_that_asks_for_usage_is_forwarded_untouched(chain: Chain) -> None:
    request = {
        "model": "tiny",
        "prompt": "x",
        "max_tokens": 5,  # or the budget addon writes one in
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    url = f"http://127.0.0.1:{chain.settings.model_port}/v1/completions"
    flow = chain.send(chain.flow(chain.identity("a-untouched"), url, request))
    assert flow.response is None and flow.request.get_content() == json.dumps(request).encode()


def test_a_stream_without_usage_is_estimated_never_zero(chain: Chain) -> None:
    flow, raw, _ = answered(chain, "llama-stream", stream=True)
    assert flow.usage is not None and flow.usage.estimated
    # Two content deltas: one token each (their ~90-byte envelopes would say ~47 tokens).
    assert raw.count(b"data: ") - raw.count(b"data: [DONE]") == 2
    assert flow.usage.completion_tokens == 2
    assert flow.cost_usd > 0 and flow.error is None


def test_responses_api_stream_and_body(chain: Chain) -> None:
    flow, _, forwarded = answered(
        chain, "responses-stream", path="/v1/responses", input="hi", stream=True
    )
    assert flow.usage is not None and flow.streamed
    assert (flow.usage.prompt_tokens, flow.usage.completion_tokens) == (20, 9)
    assert flow.usage.cache_read_tokens == 5 and not flow.usage.estimated
    assert flow.response_id == "resp_1"
    # The Responses API always reports usage: nothing is injected into its requests.
    assert "stream_options" not in json.loads(forwarded)

    flow, _, _ = answered(chain, "responses-json", path="/v1/responses", input="hi")
    assert flow.usage is not None and not flow.streamed
    assert (flow.usage.prompt_tokens, flow.usage.completion_tokens) == (30, 8)


def test_anthropic_messages_stream_and_body_with_cache_tokens(chain: Chain) -> None:
    prices = load_prices(chain.settings.configs)
    flow, _, forwarded = answered(
        chain, "anthropic-stream", path="/v1/messages", max_tokens=50, stream=True
    )
    assert flow.usage is not None and not flow.usage.estimated
    # input_tokens leaves the cache out; the record counts every input token.
    assert flow.usage.model_dump() == {
        "prompt_tokens": 20,
        "completion_tokens": 15,
        "total_tokens": 35,
        "estimated": False,
        "cache_creation_tokens": 4,
        "cache_read_tokens": 6,
        "unit": None,
        "units": 0,
    }
    assert flow.response_id == "msg_1"
    assert flow.cost_usd == prices.cost_usd("local", "tiny", 20, 15, cache_read=6, cache_write=4)
    assert "stream_options" not in json.loads(forwarded)

    flow, _, _ = answered(chain, "anthropic-json", path="/v1/messages", max_tokens=50)
    assert flow.usage is not None
    assert (flow.usage.prompt_tokens, flow.usage.cache_read_tokens) == (107, 100)
    assert flow.usage.completion_tokens == 3 and flow.response_id == "msg_2"


def test_a_chunked_json_body_streams_and_is_metered(chain: Chain) -> None:
    flow, raw, _ = answered(chain, "chunked-json")
    assert json.loads(raw)["id"] == "chatcmpl-c"
    assert flow.streamed and flow.usage is not None and flow.usage.total_tokens == 17


def test_broken_events_are_skipped_and_the_usage_still_read(chain: Chain) -> None:
    flow, raw, _ = answered(chain, "broken-sse", stream=True)
    assert raw == BROKEN_SSE
    assert flow.error is not None and flow.error.startswith("metering: event is not JSON")
    assert flow.usage is not None and not flow.usage.estimated
    assert (flow.usage.prompt_tokens, flow.usage.completion_tokens) == (3, 4)


def test_a_huge_stream_passes_whole_and_is_metered(chain: Chain) -> None:
    flow, raw, _ = answered(chain, "huge-stream", stream=True)
    assert raw == HUGE_STREAM
    assert flow.error is None and flow.usage is not None and flow.usage.total_tokens == 17


# -- the meter alone ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("api", "body"),
    [
        ("openai_chat", chat_events({"stream_options": {"include_usage": True}})[1]),
        ("openai_responses", RESPONSES_EVENTS),
        ("anthropic_messages", ANTHROPIC_START + ANTHROPIC_END),
    ],
)
def test_the_meter_reads_the_same_whatever_the_chunking(api: Any, body: bytes) -> None:
    whole = UsageMeter(api, "text/event-stream")
    whole.feed(body)
    whole.finish()
    assert whole.complete and whole.usage is not None and whole.problem is None
    for size in (1, 2, 7, 64):
        meter = UsageMeter(api, "text/event-stream")
        for start in range(0, len(body), size):
            meter.feed(body[start : start + size])
        meter.finish()
        assert (meter.usage, meter.response_id, meter.raw_bytes) == (
            whole.usage,
            whole.response_id,
            len(body),
        )


def test_deeply_nested_json_is_a_problem_not_a_crash() -> None:
    meter = UsageMeter("openai_chat", "application/json")
    meter.feed(b"[" * 100_000)
    meter.finish()
    assert not meter.complete and meter.problem is not None


def test_cache_prices_apply_to_the_cached_part_of_the_input() -> None:
    catalog = PriceCatalog.model_validate(
        {
            "fx": {"USD": "1"},
            "providers": {
                "anthropic": {
                    "m": {
                        "input_per_mtok": "3",
                        "output_per_mtok": "15",
                        "cache_read_per_mtok": "0.30",
                        "cache_write_per_mtok": "3.75",
                    }
                },
                "openai": {"n": {"input_per_mtok": "2", "output_per_mtok": "8"}},
            },
        }
    )
    cost = catalog.cost_usd("anthropic", "m", 1000, 10, cache_read=500, cache_write=100)
    assert cost == (Decimal(400 * 3) + 500 * Decimal("0.30") + 100 * Decimal("3.75") + 150) / 10**6
    # Without cache prices, cached tokens cost plain input: never less than configured.
    assert catalog.cost_usd("openai", "n", 1000, 10, cache_read=500) == catalog.cost_usd(
        "openai", "n", 1000, 10
    )
