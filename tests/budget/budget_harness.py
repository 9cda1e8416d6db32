"""What the budget tests share: a streaming model server, a real mitmdump, a real redis-server.

The upstream stands in for a model server: `/v1/completions` answers with server-sent events
(or JSON), `chunks` words `delay_s` apart, and reports usage with exactly `max_tokens`
completion tokens, the most a call may cost — so settled spend is as close to the budget as
a real provider could push it. A request may script its own failure: `"fail": 500` answers an
error, `"fail": "reset"` resets the connection (RST) after `reset_after` chunks of a stream;
`"chunks"` and `"delay_s"` override the upstream's pace; `"usage": "zero"` reports 0 tokens each
way with the same content; `"held": true` waits for `Upstream.release` before answering, so a
test can have every call admitted (or refused) before any of them ends. It is the proxy tests'
upstream (tests/proxy/proxy_harness.py) with this handler: one stub, one way to start it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx

from budget import CounterStore
from common import processes
from contracts.credentials import MachineIdentity, load_or_create_key, mint, proxy_url
from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from proxy.launch import mitmdump_argv, wait_ready
from tests.proxy.proxy_harness import Upstream, _Handler
from tests.proxy.proxy_harness import serve as proxy_serve

PROMPT_TOKENS = 11
HOLD_TIMEOUT_S = 30
CHUNKS = 4
DELAY_S = 0.02

PRICES_YAML = """\
currency: USD
fx: {USD: "1", CAD: "2"}
local:
  tiny: {hourly_usd: "3600", tokens_per_hour: 3600000000}
"""
"""One USD per million tokens each way, two CAD per USD: a token costs 0.000002 CAD."""
CAD_PER_TOKEN = Decimal("0.000002")
NO_LIMIT = Decimal(1000)


def open_budget(
    store: CounterStore, project: str, amount: Decimal, machine: Decimal = NO_LIMIT
) -> None:
    """`project`'s budget of `amount` CAD, and its machine m1's daily allowance."""
    now = time.time()
    store.ensure_scope(f"project:{project}", amount, "CAD", "biweekly", now)
    store.ensure_scope(f"machine:{project}:m1", machine, "CAD", "daily", now)


def body(**fields: object) -> bytes:
    """A completion request for `tiny` with `fields`, as the upstream reads them."""
    return json.dumps({"model": "tiny", "prompt": "hello", **fields}).encode()


class Scripted(_Handler):
    """The proxy tests' upstream (tests/proxy/proxy_harness.py), answering a POST as a model
    server that each request may script (see the module's docstring)."""

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._remember(raw)
        request = json.loads(raw)
        up = self.upstream
        delay = float(request.get("delay_s", DELAY_S))
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
            self._send(500, "application/json", body.encode())
            return
        if not request.get("stream"):
            body = json.dumps({"id": "cmpl", "choices": [{"text": "hi"}], "usage": usage})
            self._send(200, "application/json", body.encode())
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
            for i in range(int(request.get("chunks", CHUNKS))):
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


def serve() -> Iterator[Upstream]:
    """The upstream of the budget tests: requests in `seen`, their JSON in `calls`."""
    yield from proxy_serve(Scripted)


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
