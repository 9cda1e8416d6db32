"""What the proxy tests share: a small OpenAI-style upstream and a handle on the proxy.

The upstream stands in for an external model server: it answers `/v1/completions` and
`/v1/chat/completions` with OpenAI usage (JSON, or server-sent events with the usage in the
last chunk), leaves the usage out when the prompt says `no-usage`, and remembers every
request it saw so a test can prove a refused call never arrived.
"""

from __future__ import annotations

import base64
import inspect
import itertools
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
from mitmproxy import http
from mitmproxy.flow import Error
from mitmproxy.test import taddons, tflow

from common.processes import stop
from contracts.credentials import MachineIdentity, load_or_create_key, mint, proxy_url
from contracts.dataroot import DataRoot
from contracts.records import FlowRecord
from contracts.settings import Settings, free_port
from proxy.launch import mitmdump_argv, wait_ready

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}

PRICES_YAML = """\
currency: USD
fx: {USD: "1"}
providers:
  openai:
    gpt-4o-mini: {input_per_mtok: "0.15", output_per_mtok: "0.60"}
local:
  tiny: {hourly_usd: "0.12", tokens_per_hour: 180000}
"""
"""The tests' own price list, so changes to configs/prices.yaml do not move their numbers.
The local price per token does not divide evenly, as in production."""


@dataclass
class Upstream:
    server: ThreadingHTTPServer
    seen: list[dict[str, Any]] = field(default_factory=list)
    """Every request: its path, headers and body (text)."""
    release: threading.Event = field(default_factory=threading.Event)
    """What a request its handler holds waits for (budget_harness.Scripted: `"held": true`)."""
    streamed: dict[str, int] = field(default_factory=dict)
    """Chunks each streamed request (by prompt) got out, where the handler counts them."""

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def saw(self, marker: str) -> bool:
        return any(marker in req["body"] for req in self.seen)

    @property
    def calls(self) -> list[dict[str, Any]]:
        """The JSON body of every POST, in the order they came."""
        return [json.loads(req["body"]) for req in list(self.seen) if req["body"]]


class _Handler(BaseHTTPRequestHandler):
    upstream: Upstream
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._remember(b"")
        self._send(200, "text/plain", b"just a web page\n")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._remember(body)
        request = json.loads(body)
        n = len(self.upstream.seen)
        if request.get("stream"):
            chunks: list[dict[str, Any]] = [
                {"id": f"cmpl-{n}", "choices": [{"text": word}], "usage": None}
                for word in ("Hello", " world")
            ]
            chunks.append({"id": f"cmpl-{n}", "choices": [], "usage": USAGE})
            events = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
            self._send(200, "text/event-stream", events.encode())
            return
        answer: dict[str, Any] = {"id": f"cmpl-{n}", "choices": [{"text": "Hello world"}]}
        if request.get("prompt") != "no-usage":
            answer["usage"] = USAGE
        self._send(200, "application/json", json.dumps(answer).encode())

    def _remember(self, body: bytes) -> None:
        self.upstream.seen.append(
            {
                "path": self.path,
                "headers": dict(self.headers),
                "body": body.decode(errors="replace"),
            }
        )

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    """Tests fire 40 calls at once through two proxies: with the default listen backlog (5)
    a loaded machine drops connections, which then wait out SYN retransmits (1, 3, 7, 15 s)."""


def listen(handler: type[_Handler] = _Handler, port: int = 0) -> Upstream:
    """An upstream answering with `handler` on 127.0.0.1:`port` (0: a free one), in a thread."""

    Handler: type[_Handler] = type("Handler", (handler,), {})  # its own `upstream`
    server = _Server(("127.0.0.1", port), Handler)
    upstream = Upstream(server)
    Handler.upstream = upstream
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return upstream


def serve(handler: type[_Handler] = _Handler) -> Iterator[Upstream]:
    upstream = listen(handler)
    yield upstream
    upstream.server.shutdown()
    upstream.server.server_close()


@dataclass
class Proxy:
    settings: Settings
    root: DataRoot
    key: bytes

    @staticmethod
    def identity(assignment: str, *, trial: str = "t1", machine: str = "m1") -> MachineIdentity:
        return MachineIdentity(
            project="p1",
            trial=trial,
            assignment=assignment,
            machine=machine,
            expires=time.time() + 3600,
        )

    def token(self, identity: MachineIdentity) -> str:
        return mint(self.key, identity)

    def client(
        self, identity: MachineIdentity | None = None, token: str | None = None
    ) -> httpx.Client:
        """An httpx client that goes through the proxy as `identity` (or anonymously)."""
        host, port = self.settings.host, self.settings.proxy_port
        if identity is None:
            url = f"http://{host}:{port}"
        else:
            url = proxy_url(host, port, identity.machine, token or self.token(identity))
        return httpx.Client(proxy=url, trust_env=False, timeout=10)

    def spooled(self) -> list[FlowRecord]:
        """Every complete record in the spool, in file order (a line still being written,
        without its newline yet, is left for the next look)."""
        records = []
        for path in sorted(self.root.traffic_logs.glob("*/*/flows.jsonl")):
            complete = path.read_bytes().rpartition(b"\n")[0]
            records += [FlowRecord.model_validate_json(line) for line in complete.splitlines()]
        return records

    def spooled_one(self, **match: object) -> FlowRecord:
        # A streamed flow is spooled when its stream ends, which can be just after the client
        # read the last byte: give the proxy a moment before concluding it is missing.
        deadline = time.monotonic() + 5
        while True:
            found = [r for r in self.spooled() if all(getattr(r, k) == v for k, v in match.items())]
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(found) == 1, f"expected one spooled flow with {match}, found {found}"
        return found[0]


@dataclass
class LoggedRun:
    """What one mitmdump run left: its log, its spool, what its upstreams received."""

    log: str
    spooled: list[FlowRecord]
    website: Upstream
    upstream: Upstream


def connect_tunnel(
    proxy: Proxy, target: str, authorization: str | None
) -> tuple[socket.socket, bytes]:
    """A raw CONNECT through the proxy: the socket and the proxy's whole reply."""
    sock = socket.create_connection((proxy.settings.host, proxy.settings.proxy_port), timeout=10)
    header = f"Proxy-Authorization: {authorization}\r\n" if authorization else ""
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{header}\r\n".encode())
    return sock, read_response(sock)


def read_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response (head and Content-Length body) read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def proxy_settings(tmp_path_factory: Any, model_port: int) -> tuple[Settings, DataRoot, bytes]:
    """Settings for a proxy on a fresh data root and configs folder (the test prices), the
    root, and its machine-credential key. The tests' stand-in servers (websites, websocket
    echoes) listen on 127.0.0.1: it is on the egress allowlist, as an operator would list a
    package registry; the proxy host's own service ports stay refused all the same."""
    configs = tmp_path_factory.mktemp("configs")
    (configs / "prices.yaml").write_text(PRICES_YAML)
    settings = Settings(
        data=tmp_path_factory.mktemp("data"),
        configs=configs,
        host="127.0.0.1",
        proxy_port=free_port(),
        model_port=model_port,
        egress_allow=["127.0.0.1"],
    )
    root = DataRoot.at(settings.data)
    return settings, root, load_or_create_key(root)


@contextmanager
def running_proxy(
    settings: Settings, root: DataRoot, key: bytes, argv: list[str]
) -> Iterator[Proxy]:
    """mitmdump run from `argv` until the block ends; it must then have exited cleanly, with no
    Traceback in its log (`<data>/mitmdump.log`)."""
    log_path = root.root / "mitmdump.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(settings.host, settings.proxy_port, timeout=30, process=process)
            yield Proxy(settings, root, key)
        finally:
            stop(process)
    output = log_path.read_text()
    assert "Traceback" not in output, output
    assert process.returncode == 0, output


PROCESS_ADDONS = frozenset({"JsonLog", "Lean", "Dispatch", "Coalesce", "Indexer", "Metrics"})
"""Addons about the mitmdump process (its log, its hook dispatch, its writes, its indexer
thread, its metrics port), not about a flow: each is tested on its own and through a real
mitmdump; the in-process chain leaves them out."""


@dataclass
class Chain(Proxy):
    """The proxy's flow addons (proxy/addon.py, less PROCESS_ADDONS), fresh, in their order, in
    mitmproxy's addon test context, with the options `mitmdump_argv` sets. A flow goes through
    their hooks as mitmproxy's HTTP layer calls them (`send`, `respond`, `fail`), each hook of
    each addon in turn, an async one awaited; no socket, no process."""

    tctx: taddons.context = field(default=None)  # type: ignore[assignment]
    addons: list[Any] = field(default_factory=list)

    def flow(
        self,
        identity: MachineIdentity | None,
        url: str,
        body: dict[str, Any] | bytes | None = None,
        *,
        method: str = "POST",
        headers: dict[str, str] | None = None,
    ) -> http.HTTPFlow:
        """A request to `url` from `identity` (its machine credential in Proxy-Authorization,
        as `Proxy.client` sends it), with `body` as JSON or as it is."""
        content = json.dumps(body).encode() if isinstance(body, dict) else body or b""
        sent: dict[str | bytes, str | bytes] = {}
        if content:
            sent["Content-Type"] = "application/json"
        sent.update(headers or {})
        if identity is not None:
            basic = f"{identity.machine}:{self.token(identity)}".encode()
            sent["Proxy-Authorization"] = "Basic " + base64.b64encode(basic).decode()
        flow = tflow.tflow()
        flow.request = http.Request.make(method, url, content, sent)
        return flow

    def connect(self, identity: MachineIdentity | None, target: str) -> http.HTTPFlow:
        """A CONNECT to `target` (host:port) from `identity` through `http_connect`, as
        mitmproxy's HTTP layer calls it; a request made with `tunnelled` goes through it."""
        flow = self.flow(identity, f"http://{target}/", method="CONNECT")
        flow.request.path, flow.request.authority = "", target
        self._hook("http_connect", flow)
        return flow

    def tunnelled(
        self, tunnel: http.HTTPFlow, path: str, body: dict[str, Any] | bytes
    ) -> http.HTTPFlow:
        """A request sent inside `tunnel`: the same client connection, no proxy credential."""
        flow = self.flow(None, f"http://{tunnel.request.authority}{path}", body)
        flow.client_conn = tunnel.client_conn
        return self.send(flow)

    def send(self, flow: http.HTTPFlow) -> http.HTTPFlow:
        """`requestheaders` then `request`: what a client's request meets before it leaves.
        An answer an addon set (a refusal) then goes back as mitmproxy sends it: through
        `responseheaders` and `response`, and the request never leaves."""
        self._hook("requestheaders", flow)
        self._hook("request", flow)
        if flow.response is not None:
            self._hook("responseheaders", flow)
            flow.response.timestamp_end = time.time()
            self._hook("response", flow)
        return flow

    def respond(
        self,
        flow: http.HTTPFlow,
        status: int = 200,
        body: dict[str, Any] | bytes = b"",
        headers: dict[str, str] | None = None,
        chunks: list[bytes] | None = None,
    ) -> bytes:
        """The upstream's answer: `responseheaders` on its head, then its body (`chunks`, or
        `body` in one) through the stream an addon set, or read whole; then `response`.
        Returns the bytes the client got."""
        content = json.dumps(body).encode() if isinstance(body, dict) else body
        parts = chunks if chunks is not None else [content]
        kind = "application/json" if isinstance(body, dict) else "text/plain"
        response = http.Response.make(status, b"", {"Content-Type": kind})
        if chunks is None:
            response.headers["Content-Length"] = str(len(content))
        else:  # sent in chunks: no length known from the head
            del response.headers["Content-Length"]
            response.headers["Transfer-Encoding"] = "chunked"
        response.headers.update(headers or {})
        # The head alone, as the HTTP layer has it: no body yet, not ended.
        response.data.content, response.timestamp_end = None, None
        flow.response = response
        self._hook("responseheaders", flow)
        stream = flow.response.stream
        out = b""
        if stream:
            for chunk in [*parts, b""]:
                passed = stream(chunk) if callable(stream) else chunk
                out += passed if isinstance(passed, bytes) else b"".join(passed)
        else:
            flow.response.data.content = out = b"".join(parts)
        flow.response.timestamp_end = time.time()  # as mitmproxy sets it, before `response`
        self._hook("response", flow)
        return out

    def fail(self, flow: http.HTTPFlow, message: str) -> None:
        """The flow ends without an answer (the upstream refused, reset or timed out)."""
        flow.error = Error(message)
        self._hook("error", flow)

    def _hook(self, name: str, flow: http.HTTPFlow) -> None:
        for addon in self.addons:
            hook = getattr(addon, name, None)
            if hook is None:
                continue
            result = hook(flow)
            if inspect.isawaitable(result):
                self.tctx.master.event_loop.run_until_complete(result)


@contextmanager
def addon_chain(
    tmp_path: Path,
    model_port: int = 8500,
    *argv_options: str,
    secrets: dict[str, str] | None = None,
    prices: str = PRICES_YAML,
    **options: Any,
) -> Iterator[Chain]:
    """`Chain` on a fresh data root under `tmp_path` (project p1 with an ample budget for m1,
    `prices` as prices.yaml) until the block ends, when each addon's `done` runs.
    `argv_options` are `name=value` as `--set` takes them; `options` are set as typed values;
    `secrets` are put in the embedded secret store first."""
    from budget import open_ample
    from proxy import addon
    from secretstore import get_store

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "prices.yaml").write_text(prices)
    settings = Settings(
        data=tmp_path / "data",
        configs=tmp_path / "configs",
        proxy_port=1,
        model_port=model_port,
        egress_allow=["127.0.0.1"],  # as `proxy_settings` lists the stand-in servers' host
    )
    root = DataRoot.at(settings.data)
    key = load_or_create_key(root)
    open_ample(root.budget_counters, "p1", ["m1"])
    for path, value in (secrets or {}).items():
        get_store("file", root).put(path, value)
    argv = mitmdump_argv(settings, indexer=False)
    sets = [v for k, v in itertools.pairwise(argv) if k == "--set"]
    chain = [a for a in (type(a)() for a in addon.addons) if type(a).__name__ not in PROCESS_ADDONS]
    with taddons.context() as tctx:
        # Registered as `mitmdump -s proxy/addon.py` registers them: one script holding the
        # list, so that every option is declared before any addon is configured.
        tctx.master.addons.add(SimpleNamespace(addons=chain))
        tctx.options.set(*[s for s in sets if s.partition("=")[0] in tctx.options], *argv_options)
        if options:
            tctx.options.update(**options)
        try:
            yield Chain(settings, root, key, tctx, chain)
        finally:
            for each in chain:
                getattr(each, "done", lambda: None)()


def metering_proxy(
    tmp_path_factory: Any,
    model_port: int,
    *extra_argv: str,
    secrets: dict[str, str] | None = None,
    **settings: Any,
) -> Iterator[Proxy]:
    """mitmdump as the platform starts it (`mitmdump_argv`), in front of the model plane at
    `model_port`, project p1 with an ample budget for m1, until the generator is closed;
    `settings` override the tests' defaults, `extra_argv` adds `--set` options, `secrets` are
    put in the embedded secret store first."""
    from budget import open_ample
    from secretstore import get_store

    base, root, key = proxy_settings(tmp_path_factory, model_port)
    chosen = base.model_copy(update=settings)
    open_ample(root.budget_counters, "p1", ["m1"])
    for path, value in (secrets or {}).items():
        get_store("file", root).put(path, value)
    with running_proxy(chosen, root, key, [*mitmdump_argv(chosen), *extra_argv]) as proxy:
        yield proxy


def proxy_with_cloud(
    tmp_path_factory: Any, model_port: int, cloud: Upstream, *extra_argv: str
) -> Iterator[Proxy]:
    """`metering_proxy` with `cloud` as provider `openai` (its key in the secret store): where
    `auto` goes when a trial's `routing.cloud_model` is `openai/gpt-4o-mini`."""
    yield from metering_proxy(
        tmp_path_factory,
        model_port,
        "--set",
        f"autovibe_provider_hosts=127.0.0.1:{cloud.port}=openai",
        *extra_argv,
        secrets={"providers/openai": "sk-cloud-key"},
    )


def call_auto(proxy: Proxy, assignment: str, marker: str) -> httpx.Response:
    """`POST /v1/completions` naming the model `auto`, by `assignment`, with `marker` as prompt."""
    with proxy.client(proxy.identity(assignment)) as client:
        return client.post(
            f"http://127.0.0.1:{proxy.settings.model_port}/v1/completions",
            json={"model": "auto", "prompt": marker, "max_tokens": 5},
        )


BANNER = b"SSH-2.0-OpenSSH_9.2 hostile-tunnel-test\r\n"
HELLO = b"\x00\x01\x02 not http, not tls\n"


class BannerServer:
    """A TCP service that is neither HTTP nor TLS: it greets with `banner` (as SSH does) and
    echoes what it receives; `received` holds every byte a client got through to it."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, banner: bytes = BANNER) -> None:
        self.sock = socket.create_server((host, port))
        self.port = self.sock.getsockname()[1]
        self.banner = banner
        self.received = b""
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(self.banner)
                while data := conn.recv(1024):
                    self.received += data
                    conn.sendall(data)
            except OSError:
                pass


def talk_through(sock: socket.socket, wait_s: float) -> bytes:
    """Send HELLO into an open tunnel; what comes back within `wait_s` or until it closes."""
    sock.settimeout(wait_s)
    received = b""
    try:
        sock.sendall(HELLO)
        while HELLO not in received and (chunk := sock.recv(1024)):
            received += chunk
    except OSError:
        pass
    sock.close()
    return received
