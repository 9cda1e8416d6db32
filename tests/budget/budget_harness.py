"""What the budget tests share: a streaming model server, a real mitmdump, a real redis-server.

The upstream stands in for a model server: `/v1/completions` answers with server-sent events
(or JSON), `chunks` words `delay_s` apart, and reports usage with exactly `max_tokens`
completion tokens, the most a call may cost — so settled spend is as close to the budget as
a real provider could push it. A request may script its own failure: `"fail": 500` answers an
error, `"fail": "reset"` resets the connection (RST) after `reset_after` chunks of a stream;
`"chunks"` and `"delay_s"` override the upstream's pace; `"usage": "zero"` reports 0 tokens each
way with the same content; `"held": true` waits for `Upstream.release` before answering, so a
test can have every call admitted (or refused) before any of them ends.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from common import processes
from contracts.credentials import MachineIdentity, load_or_create_key, mint, proxy_url
from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from proxy.launch import mitmdump_argv, wait_ready

PROMPT_TOKENS = 11
HOLD_TIMEOUT_S = 30

PRICES_YAML = """\
currency: USD
fx: {USD: "1", CAD: "2"}
local:
  tiny: {hourly_usd: "3600", tokens_per_hour: 3600000000}
"""
"""One USD per million tokens each way, two CAD per USD: a token costs 0.000002 CAD."""
CAD_PER_TOKEN = Decimal("0.000002")


@dataclass
class Upstream:
    server: ThreadingHTTPServer
    chunks: int = 4
    delay_s: float = 0.02
    seen: list[dict[str, Any]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    """What a `"held": true` request waits for (at most HOLD_TIMEOUT_S) before answering."""
    streamed: dict[str, int] = field(default_factory=dict)
    """Chunks each streamed request (by prompt) got out before it ended or was hung up on."""

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _Handler(BaseHTTPRequestHandler):
    upstream: Upstream
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.upstream.seen.append(request)
        up = self.upstream
        delay = float(request.get("delay_s", up.delay_s))
        usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": int(request.get("max_tokens", 16)),
        }
        if request.get("usage") == "zero":
            usage = {"prompt_tokens": 0, "completion_tokens": 0}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if request.get("held"):
            up.release.wait(HOLD_TIMEOUT_S)
        if request.get("fail") == 500:
            body = json.dumps({"error": {"type": "server_error", "message": "scripted"}})
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())
            return
        if not request.get("stream"):
            body = json.dumps({"id": "cmpl", "choices": [{"text": "hi"}], "usage": usage})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if request.get("fail") == "reset":
            # A declared length the stream never reaches: the reset cuts the body short.
            self.send_header("Content-Length", "1000000")
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        prompt = str(request.get("prompt"))
        try:
            for i in range(int(request.get("chunks", up.chunks))):
                if request.get("fail") == "reset" and i == int(request.get("reset_after", 1)):
                    self._reset()
                    return
                chunk = {"id": "cmpl", "choices": [{"text": f" w{i}"}], "usage": None}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                up.streamed[prompt] = i + 1
                time.sleep(delay)
            last = {"id": "cmpl", "choices": [], "usage": usage}
            self.wfile.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
        except OSError:
            pass  # the proxy hung up on us: the client left

    def _reset(self) -> None:
        """Abort the connection: SO_LINGER 0 makes close() send RST, not FIN."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    """The tests fire 40 calls at once through two proxies: with the default listen backlog (5)
    a loaded machine drops connections, which then wait out SYN retransmits (1, 3, 7, 15 s)."""


def serve(**kwargs: Any) -> Iterator[Upstream]:
    class Handler(_Handler):
        pass

    server = _Server(("127.0.0.1", 0), Handler)
    upstream = Upstream(server, **kwargs)
    Handler.upstream = upstream
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield upstream
    server.shutdown()
    server.server_close()


@dataclass
class Proxy:
    settings: Settings
    root: DataRoot
    key: bytes
    process: subprocess.Popen[bytes]
    log: Path

    def identity(self, project: str, machine: str = "m1", task: str = "") -> MachineIdentity:
        return MachineIdentity(
            project=project,
            trial="t1",
            assignment=f"{project}-a1",
            machine=machine,
            expires=time.time() + 3600,
            task=task,
        )

    def url(self, identity: MachineIdentity) -> str:
        s = self.settings
        return proxy_url(s.host, s.proxy_port, identity.machine, mint(self.key, identity))

    def client(self, identity: MachineIdentity, timeout: float = 30) -> httpx.Client:
        return httpx.Client(proxy=self.url(identity), trust_env=False, timeout=timeout)

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        processes.stop(self.process)


def start_proxy(
    data: Path, configs: Path, upstream: Upstream, *, transparent_port: int = 0, **options: object
) -> Proxy:
    """mitmdump with our addons, as the platform starts it, plus `--set` options; each replaces
    the platform's option of the same name (given twice, an addon's option is refused by
    mitmproxy and left at its default). `transparent_port`: also a transparent listener."""
    if not (configs / "prices.yaml").exists():
        configs.mkdir(parents=True, exist_ok=True)
        (configs / "prices.yaml").write_text(PRICES_YAML)
    settings = Settings(
        data=data, configs=configs, host="127.0.0.1", proxy_port=free_port(),
        model_port=upstream.port,
    )  # fmt: skip
    root = DataRoot.at(settings.data)
    key = load_or_create_key(root)
    argv = mitmdump_argv(settings, transparent_port=transparent_port)
    for name, value in options.items():
        given = [i for i, arg in enumerate(argv) if arg.startswith(f"{name}=")]
        for i in reversed(given):
            del argv[i - 1 : i + 1]
        argv += ["--set", f"{name}={value}"]
    log = root.root / f"mitmdump-{settings.proxy_port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    wait_ready(settings.host, settings.proxy_port, timeout=30, process=process)
    return Proxy(settings, root, key, process, log)


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def redis_server() -> Iterator[RedisServer]:
    """A throwaway redis-server (no persistence) on a free port."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (apt-get install redis-server)"
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready("127.0.0.1", port, timeout=10, process=process)
        yield RedisServer(port, process)
    finally:
        process.terminate()
        process.wait(timeout=10)


def disconnect_mid_stream(proxy: Proxy, identity: MachineIdentity, url: str, body: dict) -> None:
    """Send a streaming request over a raw socket, read a little, and hang up."""
    payload = json.dumps(body).encode()
    token = mint(proxy.key, identity)
    auth = base64.b64encode(f"{identity.machine}:{token}".encode()).decode()
    request = (
        f"POST {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\n"
        f"Proxy-Authorization: Basic {auth}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    with socket.create_connection((proxy.settings.host, proxy.settings.proxy_port)) as sock:
        sock.sendall(request)
        sock.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            sock.recv(64)
