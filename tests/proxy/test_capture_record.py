"""The complete capture record (schema 3): headers and bodies, redacted, whole in the spool
up to its cap and cut in the index, hashed; streamed responses copied as they pass;
websockets; full-text search over bodies; schema-1 lines still indexed.

Through the real mitmdump: redaction of headers and bodies end to end (spool and index, by
the proxy's own indexer) and websockets, with real servers in threads (a website, not a
provider: captured, not metered; a websocket server, `websockets`). The body hashes, caps,
encodings and streamed copies are the capture addon's own work, tested in the proxy's addon
chain (proxy_harness.addon_chain), the answers given by the test.
"""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import hashlib
import json
import socket
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons
from proxy_harness import Chain, Proxy, addon_chain, proxy_settings, running_proxy
from typer.testing import CliRunner
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import Server, ServerConnection
from websockets.sync.server import serve as ws_serve

from budget import open_ample
from contracts.credentials import proxy_url
from contracts.dataroot import DataRoot
from contracts.records import SCHEMA_VERSION, BudgetDecision, FlowRecord
from contracts.secrets import REDACTED
from proxy.addons.capture import BodyTap, Capture, make_body, text_of
from proxy.addons.redaction import Redactor
from proxy.launch import mitmdump_argv
from tests.http_double import reply
from traffic.cli import app as traffic_app
from traffic.spool import Spool
from traffic.sqlite_store import SqliteTrafficStore, cut_body

SPOOL_MAX = 4096
INDEX_MAX = 512
SECRET = "sk-store-value-0123456789abcdef"
"""A value held in the proxy's secret store: redacted wherever it appears."""
AUTHORIZATION = "Bearer agent-side-token-7f3a9c"
COOKIE = "session=cookie-value-5e1d2b"
SET_COOKIE = "sid=server-cookie-9a8b7c"
BINARY = bytes(range(256)) * 4
PLAIN = ("The quick brown fox jumps over the lazy dog, again and again. " * 30).encode()
BIG = b"".join(f"word{n:05d} ".encode() for n in range(1200))  # 12 000 bytes
WEBSITE = "http://127.0.0.1:9"
"""Where the in-process tests' website is (nothing listens: the test answers for it)."""
LEAKS = (SECRET, AUTHORIZATION, "agent-side-token", "cookie-value-5e1d2b", "server-cookie-9a8b7c")


# -- upstreams ----------------------------------------------------------------------------------


def chat_events(n: int) -> bytes:
    """A chat completion streamed as `n` one-token events, then its usage and [DONE]."""
    events: list[dict[str, Any]] = [
        {"id": "chatcmpl-1", "choices": [{"delta": {"content": f" token{i:04d}"}}]}
        for i in range(n)
    ]
    usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
    events.append({"id": "chatcmpl-1", "choices": [], "usage": usage})
    return ("".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n").encode()


class Website(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._send(b"", "text/plain")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        answer = json.dumps({"echo": body.decode()}).encode()
        extra = [("Set-Cookie", SET_COOKIE), ("Set-Cookie", "theme=dark"), ("X-Note", SECRET)]
        self._send(answer, "application/json", extra)

    def _send(self, body: bytes, content_type: str, extra: list[tuple[str, str]] = []) -> None:  # noqa: B006
        reply(self, 200, body, content_type, extra)


def serve_http() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Website)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def website() -> Iterator[int]:
    yield from serve_http()


@pytest.fixture(scope="module")
def model() -> Iterator[int]:
    yield from serve_http()


def ws_handler(connection: ServerConnection) -> None:
    assert connection.request is not None
    if connection.request.path == "/broken":
        connection.recv()
        # The upstream dies mid-conversation: a TCP reset, no close frame.
        connection.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.socket.close()
        return
    for message in connection:
        connection.send(message)


@pytest.fixture(scope="module")
def ws_port() -> Iterator[int]:
    server: Server = ws_serve(ws_handler, "127.0.0.1", 0, compression=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.socket.getsockname()[1]
    server.shutdown()


# -- the proxy ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, model: int) -> Iterator[Proxy]:
    """mitmdump as the platform starts it, small body caps, one value in its secret store."""
    from secretstore import store_from_env

    settings, root, key = proxy_settings(tmp_path_factory, model)
    open_ample(root.budget_counters, "p1", ["m1"])
    store_from_env(settings=settings).put("providers/test", SECRET)
    argv = [
        *mitmdump_argv(settings),
        *("--set", f"autovibe_spool_body_max={SPOOL_MAX}"),
        *("--set", f"autovibe_index_body_max={INDEX_MAX}"),
    ]
    with running_proxy(settings, root, key, argv) as proxy:
        yield proxy


def captured(proxy: Proxy, path: str) -> FlowRecord:
    """The one spooled flow to `path`, waiting for it a little."""
    deadline = time.monotonic() + 5
    while True:
        found = [r for r in proxy.spooled() if r.path == path]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(found) == 1, f"expected one flow to {path}, found {found}"
    return found[0]


def indexed(proxy: Proxy, flow_id: str) -> FlowRecord:
    """The flow as the proxy's own indexer put it in the SQLite index."""
    deadline = time.monotonic() + 10
    with SqliteTrafficStore(proxy.root.traffic_index) as index:
        while True:
            found = [f for f in index.flows() if f.id == flow_id]
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert found, f"flow {flow_id} never reached the index"
    return found[0]


def client(proxy: Proxy) -> httpx.Client:
    return proxy.client(proxy.identity("a-capture"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- headers, redaction, hashes ---------------------------------------------------------------


def test_headers_are_kept_in_order_and_secrets_never_reach_spool_or_index(
    proxy: Proxy, website: int
) -> None:
    body = json.dumps({"note": f"my key is {SECRET}", "word": "zanzibarquux"}).encode()
    with client(proxy) as c:
        response = c.post(
            f"http://127.0.0.1:{website}/echo",
            content=body,
            headers={"Authorization": AUTHORIZATION, "Cookie": COOKIE, "X-Custom": SECRET},
        )
    assert response.status_code == 200
    record = captured(proxy, "/echo")
    assert record.schema_version == SCHEMA_VERSION == 4
    request_headers = dict(record.request_headers)
    assert request_headers["Authorization"] == REDACTED
    assert request_headers["Cookie"] == REDACTED
    assert request_headers["X-Custom"] == REDACTED
    # Order and duplicates survive: both Set-Cookie lines, in the order the server sent them.
    response_names = [name for name, _ in record.response_headers]
    assert response_names.count("Set-Cookie") == 2
    assert [v for n, v in record.response_headers if n == "Set-Cookie"] == [REDACTED, REDACTED]
    assert dict(record.response_headers)["X-Note"] == REDACTED
    assert response_names.index("Content-Type") < response_names.index("Set-Cookie")
    # The secret inside the bodies is replaced, and the body hashes are of what is stored.
    assert record.request_body is not None and record.response_body is not None
    assert SECRET not in record.request_body.text
    assert f"my key is {REDACTED}" in record.request_body.text
    assert record.request_body.sha256 == sha(record.request_body.text.encode())
    assert record.request_body.size == len(body)
    assert not record.request_body.truncated
    assert REDACTED in record.response_body.text

    indexed(proxy, record.id)
    stored = b"".join(p.read_bytes() for p in proxy.root.traffic_logs.rglob("*") if p.is_file())
    for leak in LEAKS:
        assert leak.encode() not in stored, f"{leak!r} reached the spool or the index"


# -- websockets ---------------------------------------------------------------------------------


def ws_proxy(proxy: Proxy) -> str:
    identity = proxy.identity("a-ws")
    host, port = proxy.settings.host, proxy.settings.proxy_port
    return proxy_url(host, port, identity.machine, proxy.token(identity))


def test_a_websocket_is_captured_with_its_messages(proxy: Proxy, ws_port: int) -> None:
    with ws_connect(
        f"ws://127.0.0.1:{ws_port}/chat", proxy=ws_proxy(proxy), compression=None
    ) as ws:
        ws.send("hello quokkafish")
        assert ws.recv(timeout=5) == "hello quokkafish"
        ws.send(f"my key is {SECRET}")
        assert ws.recv(timeout=5) == f"my key is {SECRET}"
        ws.send(b"\x00\x01\xff")
        assert ws.recv(timeout=5) == b"\x00\x01\xff"
        ws.send("x" * SPOOL_MAX)  # past the connection's cap: counted, not kept whole
        ws.recv(timeout=5)
        ws.send("after the cap")
        ws.recv(timeout=5)
    record = _ws_record(proxy, "/chat")
    assert record.status == 101 and record.error is None
    websocket = record.websocket
    assert websocket is not None
    assert (websocket.messages_from_client, websocket.messages_from_server) == (5, 5)
    sizes = [16, 10 + len(SECRET), 3, SPOOL_MAX, 13]
    assert websocket.bytes_from_client == websocket.bytes_from_server == sum(sizes)
    assert websocket.close_code == 1000 and websocket.closed_by_client is True
    first, echo = websocket.messages[:2]
    assert (first.from_client, first.type, first.content.text) == (True, "text", "hello quokkafish")
    assert (echo.from_client, echo.content.text) == (False, "hello quokkafish")
    assert websocket.messages[2].content.text == f"my key is {REDACTED}"
    binary = websocket.messages[4].content
    assert binary.encoding == "base64" and base64.b64decode(binary.text) == b"\x00\x01\xff"
    cut = websocket.messages[6].content
    assert cut.truncated and cut.size == SPOOL_MAX and cut.sha256 == sha(b"x" * SPOOL_MAX)
    kept = sum(m.content.size for m in websocket.messages if not m.content.truncated)
    assert len(cut.text) == SPOOL_MAX - kept
    # Once the cap is spent, messages are counted but no longer listed.
    assert len(websocket.messages) == 7 and websocket.messages_omitted == 3
    in_index = indexed(proxy, record.id)
    assert in_index.websocket is not None
    with SqliteTrafficStore(proxy.root.traffic_index) as index:
        assert [f.id for f in index.search("quokkafish")] == [record.id]


def _ws_record(proxy: Proxy, path: str) -> FlowRecord:
    deadline = time.monotonic() + 5
    while True:
        found = [r for r in proxy.spooled() if r.path == path and r.websocket is not None]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(found) == 1, found
    return found[0]


def test_a_broken_websocket_is_logged_with_an_error(
    proxy: Proxy, ws_port: int, website: int
) -> None:
    with (
        ws_connect(
            f"ws://127.0.0.1:{ws_port}/broken", proxy=ws_proxy(proxy), compression=None
        ) as ws,
        pytest.raises(ConnectionClosed),
    ):
        ws.send("are you there?")
        ws.recv(timeout=5)
    record = _ws_record(proxy, "/broken")
    assert record.websocket is not None
    assert record.websocket.close_code == 1006 and record.websocket.closed_by_client is False
    assert record.error is not None and "1006" in record.error and "server" in record.error
    assert record.websocket.messages_from_client == 1
    # The proxy is still there.
    with client(proxy) as c:
        assert c.get(f"http://127.0.0.1:{website}/still-up").status_code == 200


# -- the record, in the proxy's addon chain (no mitmdump) -------------------------------------


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Chain]:
    """The proxy's addons in-process, with the spool cap and secret of the module's proxy."""
    with addon_chain(
        tmp_path,
        8500,
        f"autovibe_spool_body_max={SPOOL_MAX}",
        secrets={"providers/test": SECRET},
    ) as chain:
        yield chain


def fetched(
    chain: Chain, path: str, body: bytes, headers: dict[str, str], request: bytes | None = None
) -> FlowRecord:
    """`path` of a website asked through the chain (a GET, or a POST of `request`), answered
    with `body` and `headers`; its one spooled record."""
    method = "GET" if request is None else "POST"
    flow = chain.flow(chain.identity("a-capture"), WEBSITE + path, request, method=method)
    chain.send(flow)
    assert chain.respond(flow, body=body, headers=headers) == body
    return chain.spooled_one(path=path)


def index_of(chain: Chain) -> SqliteTrafficStore:
    """The chain's spool indexed as the proxy's indexer indexes it, body cap INDEX_MAX."""
    index = SqliteTrafficStore(chain.root.traffic_index, body_max=INDEX_MAX)
    assert index.catch_up(chain.root.traffic_logs) > 0
    return index


def test_body_hashes_are_of_what_was_sent(chain: Chain) -> None:
    body = json.dumps({"prompt": "hash me", "n": 1}).encode()
    answer = json.dumps({"echo": body.decode()}).encode()
    record = fetched(chain, "/hash", answer, {"Content-Type": "application/json"}, body)
    assert record.request_body is not None and record.response_body is not None
    assert record.request_body.sha256 == sha(body)
    assert record.request_body.text == body.decode()
    assert record.response_body.sha256 == sha(answer)
    assert record.response_body.text == answer.decode()
    assert record.response_body.size == len(answer)
    assert record.response_body.encoding == "utf-8"


def test_bodies_are_cut_at_the_spool_cap_and_at_the_index_cap(chain: Chain) -> None:
    record = fetched(chain, "/big", BIG, {"Content-Type": "text/plain"})
    body = record.response_body
    assert body is not None
    assert body.truncated and body.size == len(BIG) and body.sha256 == sha(BIG)
    assert body.text.encode() == BIG[:SPOOL_MAX]
    with index_of(chain) as index:
        (in_index,) = [f.response_body for f in index.flows() if f.id == record.id]
    assert in_index is not None
    assert in_index.truncated and in_index.text.encode() == BIG[:INDEX_MAX]
    assert (in_index.size, in_index.sha256) == (len(BIG), sha(BIG))
    assert record.request_body is None  # a GET has no body


def test_a_binary_body_is_base64(chain: Chain) -> None:
    body = fetched(chain, "/binary", BINARY, {"Content-Type": "application/octet-stream"})
    assert body.response_body is not None and body.response_body.encoding == "base64"
    kept = body.response_body
    assert base64.b64decode(kept.text) == BINARY
    assert (kept.size, kept.sha256, kept.truncated) == (len(BINARY), sha(BINARY), False)


def test_a_gzip_body_is_recorded_decoded(chain: Chain) -> None:
    encoded = gzip.compress(PLAIN)
    headers = {"Content-Type": "text/plain", "Content-Encoding": "gzip"}
    record = fetched(chain, "/gzip", encoded, headers)
    body = record.response_body
    assert body is not None and body.decode_error is None
    assert body.text.encode() == PLAIN and body.sha256 == sha(PLAIN) and body.size == len(PLAIN)
    assert record.response_bytes == len(encoded)  # on the wire: still encoded


def llm_stream(chain: Chain, assignment: str, n: int) -> tuple[FlowRecord, bytes]:
    """A chat completion streamed in 1000-byte chunks to the chain's model plane: its record,
    and the bytes the client got."""
    request = {"model": "tiny", "messages": [], "stream": True, "n": n}
    url = "http://127.0.0.1:8500/v1/chat/completions"
    flow = chain.send(chain.flow(chain.identity(assignment), url, request))
    events = chat_events(n)
    chunks = [events[i : i + 1000] for i in range(0, len(events), 1000)]
    headers = {"Content-Type": "text/event-stream"}
    raw = chain.respond(flow, body=events, headers=headers, chunks=chunks)
    assert raw == events
    return chain.spooled_one(assignment=assignment), raw


def test_a_streamed_response_is_captured_whole(chain: Chain) -> None:
    record, raw = llm_stream(chain, "a-stream-small", n=5)
    assert record.streamed and record.usage is not None and not record.usage.estimated
    body = record.response_body
    assert body is not None
    assert body.text.encode() == raw and body.sha256 == sha(raw) and not body.truncated
    # The request as forwarded: metering asked for the usage in the stream.
    assert record.request_body is not None
    assert json.loads(record.request_body.text)["stream_options"] == {"include_usage": True}


def test_a_streamed_response_beyond_the_cap_is_cut_but_hashed_whole(chain: Chain) -> None:
    record, raw = llm_stream(chain, "a-stream-big", n=200)
    assert len(raw) > SPOOL_MAX
    body = record.response_body
    assert body is not None and body.truncated
    assert body.text.encode() == raw[:SPOOL_MAX]
    assert (body.size, body.sha256) == (len(raw), sha(raw))
    assert record.usage is not None and record.usage.completion_tokens == 200


def test_fts_finds_a_word_of_a_body(chain: Chain) -> None:
    record = fetched(chain, "/fts", b"{}", {}, b"please find xylophonic here")
    with index_of(chain) as index:
        assert [f.id for f in index.search("xylophonic")] == [record.id]
        assert index.search(f'"{SECRET}"') == []
    runner = CliRunner()
    env = {"AUTOVIBE_DATA": str(chain.root.root), "COLUMNS": "300"}
    result = runner.invoke(traffic_app, ["search", "xylophonic"], env=env)
    assert result.exit_code == 0, result.output
    assert record.id in result.output and "/fts" in result.output
    result = runner.invoke(traffic_app, ["search", "xylophonic", "--json"], env=env)
    assert [json.loads(line)["id"] for line in result.output.splitlines()] == [record.id]
    bad = runner.invoke(traffic_app, ["search", 'unbalanced "quote'], env=env)
    assert bad.exit_code == 2 and "FTS5" in bad.output


# -- the index, without a proxy ---------------------------------------------------------------


V1_LINE = {
    "schema_version": 1,
    "id": "v1flow",
    "ts_start": 1_700_000_000.0,
    "ts_end": 1_700_000_000.5,
    "duration_ms": 500.0,
    "method": "POST",
    "url": "http://127.0.0.1:9/v1/completions",
    "host": "127.0.0.1",
    "path": "/v1/completions",
    "status": 200,
    "request_bytes": 10,
    "response_bytes": 20,
    "project": "p1",
    "streamed": False,
    "cost_usd": "0.000001",
    "error": "metering: legacyproblem",
    "budget": None,
}


def test_schema_1_lines_still_index(tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    folder = root.spool_dir("p1", dt.date(2023, 11, 14))
    folder.mkdir(parents=True)
    (folder / "flows.jsonl").write_text(json.dumps(V1_LINE) + "\n")
    with SqliteTrafficStore(root.traffic_index) as index:
        assert index.catch_up(root.traffic_logs) == 1
        (flow,) = index.flows()
        assert index.rejects() == []
        assert [f.id for f in index.search("legacyproblem")] == ["v1flow"]
    assert flow.schema_version == 1
    assert flow.request_headers == [] and flow.request_body is None and flow.websocket is None


def test_an_index_of_the_old_layout_is_rebuilt_from_the_spool(tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    with Spool(root) as spool:
        spool.append(FlowRecord.model_validate(V1_LINE))
    # The schema-1 index: no body columns, offsets already at the end of the spool.
    root.traffic_index.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(root.traffic_index)
    db.executescript(
        "CREATE TABLE flows (id TEXT PRIMARY KEY, record TEXT);"
        "CREATE VIRTUAL TABLE flows_fts USING fts5(url, model, error);"
        "CREATE TABLE offsets (path TEXT PRIMARY KEY, offset INTEGER NOT NULL);"
        "INSERT INTO offsets VALUES ('p1/2023-11-14/flows.jsonl', 99999);"
    )
    db.close()
    with SqliteTrafficStore(root.traffic_index) as index:
        assert index.catch_up(root.traffic_logs) == 1
        assert [f.id for f in index.search("legacyproblem")] == ["v1flow"]


# -- the pieces ---------------------------------------------------------------------------------


class Store:
    """A secret store holding one value (the capture reads only `values`)."""

    def values(self) -> list[str]:
        return [SECRET]


def redactor() -> Redactor:
    from proxy.addons.redaction import SecretCache

    return Redactor(SecretCache(Store()))  # type: ignore[arg-type]


def test_a_tap_decodes_chunks_and_hashes_the_whole() -> None:
    data = PLAIN * 10
    encoder = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    encoded = encoder.compress(data) + encoder.flush()
    tap = BodyTap("gzip", keep=100)
    for start in range(0, len(encoded), 7):
        tap.feed(encoded[start : start + 7])
    body = tap.body(Redactor(None))
    assert (body.size, body.sha256, body.truncated) == (len(data), sha(data), True)
    assert body.text.encode() == data[:100]
    broken = BodyTap("gzip", keep=100)
    broken.feed(b"this is not gzip")
    assert broken.body(Redactor(None)).decode_error is not None
    unknown = BodyTap("snappy", keep=100)
    unknown.feed(b"raw")
    assert unknown.body(Redactor(None)).text == "raw"


def test_a_cut_body_never_ends_in_half_a_secret_or_half_a_character() -> None:
    data = b"prefix " + SECRET.encode()
    body = make_body(data[:15], len(data), sha(data), redactor(), True, None)
    assert body.text == "prefix " and body.sha256 == sha(data)
    whole = make_body(data, len(data), None, redactor(), False, None)
    assert whole.text == f"prefix {REDACTED}" and whole.sha256 == sha(whole.text.encode())
    assert text_of("né".encode()[:2], cut=True) == ("n", "utf-8")
    assert text_of("né".encode()[:2], cut=False)[1] == "base64"
    cut = cut_body(make_body("é".encode() * 300, 600, None, Redactor(None), False, None), 101)
    assert cut is not None and cut.text == "é" * 50 and cut.truncated


def test_a_negative_body_cap_is_refused() -> None:
    capture = Capture()
    with (
        taddons.context(capture) as ctx,
        pytest.raises(exceptions.OptionsError, match=r"autovibe_spool_body_max.*-1"),
    ):
        ctx.configure(capture, autovibe_spool_body_max=-1)


# -- the budget decision as a record (schema 3) ------------------------------------------------

OLD_DECISIONS = [
    ("reserved 0.0123 USD in project:p,machine:p:t:m1:day", "reserved", None),
    ("reserved 1.5 EUR in project:p; settled 0.000120 on response", "settled", "response"),
    (
        "reserved 1 USD in project:p; settled 0 on error: peer closed",
        "settled",
        "error: peer closed",
    ),
    ("reserved 2 USD in project:p; settled 2 by the orphan sweep", "settled", "orphan sweep"),
    ("refused budget_exhausted by machine:p:t:m1:day", "refused", None),
    ("refused budget_unavailable", "refused", None),
]


@pytest.mark.parametrize(("text", "action", "ending"), OLD_DECISIONS)
def test_a_schema_2_budget_line_reads_as_a_decision(text: str, action: str, ending: str) -> None:
    record = FlowRecord.model_validate({**V1_LINE, "schema_version": 2, "budget": text})
    decision = record.decision()
    assert decision is not None and record.budget_decision is None
    assert (decision.action, decision.ending) == (action, ending)
    assert decision.text() == text  # what a schema-3 proxy writes for the same decision


def test_a_refusal_names_its_scope_and_error() -> None:
    decision = BudgetDecision.from_text("refused budget_exhausted by machine:p:t:m1:day")
    assert decision is not None
    assert (decision.error, decision.scope) == ("budget_exhausted", "machine:p:t:m1:day")
    assert BudgetDecision.from_text("something else") is None
    assert BudgetDecision.from_text(None) is None
