"""What the proxy costs: the same upstream called direct, through bare mitmdump, through the
autovibe proxy as the stack runs it (all addons: identity, routing, metering, budget, injection,
capture, metrics; mitmdump with `autovibe_indexer=false` and `python -m traffic.indexer` beside it,
on the same machine), through the same proxy with its indexer thread inside (`autovibe-inproc`,
the arrangement before the indexer got its own process), through bare mitmdump run as the
autovibe proxy runs it, without our addons (`mitmdump-lean`: `python -O`,
`proxy/addons/lean.py` removing mitmproxy's unused built-ins, `proxy/addons/dispatch.py`
calling hooks from a plan and `proxy/addons/coalesce.py` joining writes) and through LiteLLM's
proxy.

Two workloads: a static JSON chat completion served by nginx (Debian `nginx-light`; without
it, by the asyncio stub below, with a printed note), and an SSE stream from a small asyncio
stub in its own process that sends its first event at once and the rest 2 ms later (so the
time to first byte shows whether a proxy buffers). Concurrency 1, 16 and 64 (`--quick`: 1 and
16); each cell sends a bounded number of keep-alive requests over loopback from an asyncio load
generator in this process, in repeats: within a repeat the systems take turns, and a cell's
figures are medians over its repeats (a ratio between systems, the median of the per-repeat
ratios), so that a slow minute of this shared machine weighs on one repeat of every system
rather than on one system. A last row, `refused`, measures the autovibe proxy answering 403 to
a request for a host outside its egress policy, at concurrency 16.

LiteLLM is never a project dependency: the bench makes its own venv once with uv, cached under
`$XDG_CACHE_HOME/autovibe/bench-litellm` (`~/.cache` without it), installs the pinned
`litellm[proxy]` there, and runs `litellm --config` with no database and a fixed master key. When
uv or the install is unavailable its rows are left out and the notes say so.

    python -m bench.proxy [--quick] [--no-litellm]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import publish
from budget import open_ample
from common.processes import cpu_s
from contracts.credentials import MachineIdentity, load_or_create_key, mint
from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from proxy.launch import (
    mitmdump_argv,
    mitmdump_command,
    mitmdump_path,
    wait_ready,
    with_options,
)
from traffic.indexer import ready_pid
from traffic.sqlite_store import SqliteTrafficStore

ROOT = Path(__file__).resolve().parent.parent
LEAN_SCRIPTS = tuple(
    ROOT / "proxy" / "addons" / f"{name}.py" for name in ("lean", "dispatch", "coalesce")
)
MODEL = "tiny"
"""Priced in configs/prices.yaml as a local model, so the autovibe proxy meters the calls."""
LITELLM_VERSION = "1.106.2"
"""Pinned; installed only in the bench's own cached venv, never in the project's."""
LITELLM_MASTER_KEY = "sk-autovibe-bench-0123456789abcdef"
"""Fixed: LiteLLM 1.106 refuses to start without a master key; every bench call sends it."""
LITELLM_STREAM_MODEL = "tiny-stream"
"""LiteLLM routes by model name: this one goes to the SSE stub, `tiny` to the JSON upstream."""

JSON_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello world"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13},
    }
).encode()


def _event(doc: dict[str, Any] | str) -> bytes:
    if isinstance(doc, dict):
        doc = json.dumps(
            {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1700000000,
             "model": MODEL, **doc}
        )  # fmt: skip
    return b"data: " + doc.encode() + b"\n\n"


def _delta(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


FIRST_EVENT = _event(_delta("Hel"))
REST_EVENTS = (
    b"".join(_event(_delta(w)) for w in ("lo", " wor", "ld", "!"))
    + _event(
        {
            "choices": [],
            "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16},
        }
    )
    + _event("[DONE]")
)
STREAM_PAUSE_S = 0.002
WARM_UP_CALLS = 5
"""Calls per connection before a cell's clock starts."""


# -- the upstream (run in its own process) ----------------------------------------------------


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class _Upstream(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            if b'"stream": true' in body or b'"stream":true' in body:
                asyncio.get_running_loop().create_task(self._stream())
            else:
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(JSON_BODY)).encode() + b"\r\n\r\n" + JSON_BODY
                )

    async def _stream(self) -> None:
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(FIRST_EVENT)
        )
        await asyncio.sleep(STREAM_PAUSE_S)
        if not self.transport.is_closing():
            self.transport.write(_chunk(REST_EVENTS) + b"0\r\n\r\n")


async def _serve_upstream(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Upstream, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def _nginx_conf(work: Path, port: int) -> str:
    """One worker answering every request with JSON_BODY; keep-alive as long as a cell runs."""
    body = JSON_BODY.decode()
    assert "'" not in body and "$" not in body, "JSON_BODY must fit an nginx quoted string"
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


# -- the load generator ---------------------------------------------------------------------


@dataclass
class Target:
    system: str
    port: int
    """Where the client connects: the upstream itself, or a proxy."""
    proxy_auth: str | None = None
    authorization: str | None = None
    """An `Authorization` header the server itself asks for (LiteLLM's master key)."""
    explicit_proxy: bool = True
    """The client names the upstream in the request line (an HTTP proxy); False: the target
    is the server itself (direct, or LiteLLM, which is an API server of its own)."""


async def _read_response(
    reader: asyncio.StreamReader, t0: float, status: bytes = b"200"
) -> tuple[float, float]:
    """Read one response with `status`; (time to first body byte, time to the end), from t0."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    if not lines[0].startswith(b"http/1.1 " + status):
        raise RuntimeError(f"unexpected answer: {head!r}")
    length, chunked = None, False
    for line in lines[1:]:
        if line.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
        elif line.startswith(b"transfer-encoding:") and b"chunked" in line:
            chunked = True
    first: float | None = None
    if not chunked:
        await reader.readexactly(length or 0)
        first = time.perf_counter() - t0
        return first, first
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if first is None:
            first = time.perf_counter() - t0
        await reader.readexactly(size + 2)
        if size == 0:
            return first, time.perf_counter() - t0


async def _worker(
    target: Target,
    request: bytes,
    n: int,
    out: list[tuple[float, float]],
    status: bytes = b"200",
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            writer.write(request)
            out.append(await _read_response(reader, t0, status))
    finally:
        writer.close()


def _request(target: Target, upstream_port: int, stream: bool) -> bytes:
    model = LITELLM_STREAM_MODEL if stream and target.system == "litellm" else MODEL
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "say hello"}],
            "max_tokens": 8,
            "stream": stream,
        }
    ).encode()
    path = "/v1/chat/completions"
    if target.explicit_proxy:
        host = f"127.0.0.1:{upstream_port}"
        target_uri = f"http://{host}{path}"
    else:
        host, target_uri = f"127.0.0.1:{target.port}", path
    head = [
        f"POST {target_uri} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if target.proxy_auth:
        head.append(f"Proxy-Authorization: {target.proxy_auth}")
    if target.authorization:
        head.append(f"Authorization: {target.authorization}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _cell(
    target: Target,
    upstream_port: int,
    stream: bool,
    concurrency: int,
    total: int,
    refused: bool = False,
) -> dict[str, Any]:
    """One cell; `refused`: the upstream is outside the egress policy, every answer a 403."""
    request = _request(target, upstream_port, stream)
    status = b"403" if refused else b"200"
    warm: list[tuple[float, float]] = []
    await asyncio.gather(
        *(_worker(target, request, WARM_UP_CALLS, warm, status) for _ in range(concurrency))
    )
    samples: list[tuple[float, float]] = []
    per_worker = max(1, total // concurrency)
    t0 = time.perf_counter()
    await asyncio.gather(
        *(_worker(target, request, per_worker, samples, status) for _ in range(concurrency))
    )
    elapsed = time.perf_counter() - t0
    latencies = sorted(s[1] * 1000 for s in samples)
    ttfb = [s[0] * 1000 for s in samples]
    return {
        "system": target.system,
        "workload": "refused" if refused else "sse" if stream else "json",
        "concurrency": concurrency,
        "requests": len(samples),
        "req_per_s": round(len(samples) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
        "ttfb_p50_ms": round(statistics.median(ttfb), 2),
    }


# -- the systems ----------------------------------------------------------------------------


def _start(
    argv: list[str], port: int, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    wait_ready("127.0.0.1", port, timeout=30, process=process)
    return process


def _start_indexer(root: DataRoot, log: Path) -> subprocess.Popen[bytes]:
    """`python -m traffic.indexer` on the data root `root`, as the stack starts it; once ready."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOVIBE_")}
    env |= {"AUTOVIBE_DATA": str(root.root), "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "traffic.indexer"], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    deadline = time.monotonic() + 30
    while ready_pid(root) != process.pid:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the indexer did not start (exit {process.poll()}); see {log}")
        time.sleep(0.05)
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM and wait: the indexer's last catch-up may take a moment."""
    process.terminate()
    process.wait(timeout=30)


def _mitmdump_bare(work: Path, port: int, lean: bool = False) -> list[str]:
    """Bare mitmdump as shipped; `lean`: as the autovibe proxy runs it (`python -O`, `Lean`,
    `Dispatch`)."""
    script = [arg for path in LEAN_SCRIPTS for arg in ("-s", str(path))] if lean else []
    return [
        *(mitmdump_command() if lean else [str(mitmdump_path())]),
        "--mode",
        f"regular@{port}",
        "--listen-host",
        "127.0.0.1",
        "--set",
        f"confdir={work / 'mitm-conf'}",
        "--set",
        "termlog_verbosity=warn",
        "--set",
        "flow_detail=0",
        *script,
    ]


def _json_upstream(work: Path, stub_port: int) -> tuple[int, subprocess.Popen[bytes] | None]:
    """nginx serving the static JSON on a port of its own; without nginx, the stub does."""
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).exists()), None
    )
    if nginx is None:
        print(
            "note: nginx is not installed (apt-get install nginx-light, or `make bench-deps`); "
            "the asyncio stub serves the static JSON too",
            file=sys.stderr,
        )
        return stub_port, None
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(_nginx_conf(work, port))
    return port, _start([nginx, "-p", str(work), "-c", str(conf)], port, work / "nginx.log")


def litellm_home() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "autovibe" / "bench-litellm"


def litellm_executable() -> tuple[Path | None, str]:
    """The `litellm` script of the bench's own venv, made once; (None, why) when it cannot be."""
    home = litellm_home()
    exe, stamp = home / "bin" / "litellm", home / "installed"
    if exe.exists() and stamp.exists() and stamp.read_text().strip() == LITELLM_VERSION:
        return exe, ""
    uv = shutil.which("uv")
    if uv is None:
        return None, "uv is not installed, so the bench cannot make LiteLLM's venv"
    print(f"installing litellm[proxy]=={LITELLM_VERSION} into {home} (once)", file=sys.stderr)
    shutil.rmtree(home, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT")}
    try:
        for argv in (
            [uv, "venv", "--quiet", "--python", sys.executable, str(home)],
            [uv, "pip", "install", "--quiet", "--python", str(home / "bin" / "python"),
             f"litellm[proxy]=={LITELLM_VERSION}"],
        ):  # fmt: skip
            subprocess.run(argv, check=True, env=env, timeout=1800, capture_output=True)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return None, f"installing litellm[proxy]=={LITELLM_VERSION} failed: {exc} {detail[-300:]!r}"
    stamp.write_text(LITELLM_VERSION + "\n")
    return exe, ""


def _litellm(
    work: Path, exe: Path, json_port: int, sse_port: int
) -> tuple[int, subprocess.Popen[bytes]]:
    """LiteLLM's proxy, no database, a fixed master key: `tiny` to the JSON upstream,
    `tiny-stream` to the SSE stub (both as the OpenAI-compatible model `tiny`)."""

    def entry(name: str, port: int) -> dict[str, Any]:
        return {
            "model_name": name,
            "litellm_params": {
                "model": f"openai/{MODEL}",
                "api_base": f"http://127.0.0.1:{port}/v1",
                "api_key": "bench",
            },
        }

    config = work / "litellm.yaml"  # JSON is YAML
    config.write_text(
        json.dumps(
            {
                "model_list": [entry(MODEL, json_port), entry(LITELLM_STREAM_MODEL, sse_port)],
                "litellm_settings": {"telemetry": False},
                "general_settings": {"master_key": LITELLM_MASTER_KEY},
            }
        )
    )
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "LITELLM_MASTER_KEY", "VIRTUAL_ENV")
    }
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR", NO_DOCS="True")
    argv = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    with (work / "litellm.log").open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready("127.0.0.1", port, timeout=300, process=process)
    except (RuntimeError, TimeoutError):
        process.terminate()
        process.wait(timeout=15)
        raise
    return port, process


@dataclass
class Run:
    rows: list[dict[str, Any]]
    cpu_ms: dict[str, float]
    """CPU milliseconds per call over the whole run, per process (`/proc`): bare mitmdump, bare
    mitmdump trimmed by `Lean`, the autovibe proxy, its separate indexer, the proxy with its
    indexer inside."""
    nginx: bool
    """The static JSON came from nginx (else from the asyncio stub)."""
    litellm: str
    """Empty when LiteLLM was measured; otherwise why not."""


REFUSED_AT = 16
"""Concurrency of the refused-request row."""


def calls_per_repeat(quick: bool) -> tuple[int, int]:
    """(repeats, calls per repeat) of a cell, for each system but LiteLLM (one repeat)."""
    return (3, 200) if quick else (5, 600)


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for a system's repeats of a cell: medians, all its calls, every repeat's req/s."""
    row = dict(runs[0])
    row["requests"] = sum(r["requests"] for r in runs)
    for key in ("req_per_s", "p50_ms", "p99_ms", "ttfb_p50_ms"):
        row[key] = round(statistics.median(r[key] for r in runs), 2)
    if "index_lag_s" in row:
        row["index_lag_s"] = max(r["index_lag_s"] for r in runs)
    row["repeats"] = len(runs)
    row["req_per_s_repeats"] = [r["req_per_s"] for r in runs]
    return row


def run(quick: bool, with_litellm: bool = True) -> Run:
    concurrencies = [1, 16] if quick else [1, 16, 64]
    repeats, total = calls_per_repeat(quick)
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        work = Path(tmp)
        try:
            sse_port = free_port()
            processes.append(
                _start(
                    [sys.executable, "-m", "bench.proxy", "--upstream", str(sse_port)],
                    sse_port,
                    work / "upstream.log",
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )
            )
            json_port, nginx = _json_upstream(work, sse_port)
            if nginx is not None:
                processes.append(nginx)
            bare_port = free_port()
            bare = _start(_mitmdump_bare(work, bare_port), bare_port, work / "bare.log")
            processes.append(bare)
            lean_port = free_port()
            lean = _start(_mitmdump_bare(work, lean_port, lean=True), lean_port, work / "lean.log")
            processes.append(lean)
            settings = Settings(
                data=work / "data",
                configs=ROOT / "configs",
                host="127.0.0.1",
                proxy_port=free_port(),
                model_port=sse_port,
            )
            identity = MachineIdentity("bench", "bench", "bench-000", "m1", time.time() + 3600)
            hosts = [f"autovibe_model_hosts=127.0.0.1:{sse_port},127.0.0.1:{json_port}"]
            # The stack's arrangement: mitmdump only spools, the indexer process indexes.
            root, auth = _bench_root(settings, identity)
            indexer = _start_indexer(root, work / "indexer.log")
            processes.append(indexer)
            argv = with_options(mitmdump_argv(settings, indexer=False), hosts)
            autovibe = _start(argv, settings.proxy_port, work / "autovibe.log")
            processes.append(autovibe)
            # The arrangement before: the indexer thread inside mitmdump (a data root of its own).
            settings_inproc = settings.model_copy(
                update={"data": work / "data-inproc", "proxy_port": free_port()}
            )
            root_inproc, auth_inproc = _bench_root(settings_inproc, identity)
            argv = with_options(mitmdump_argv(settings_inproc, indexer=True), hosts)
            inproc = _start(argv, settings_inproc.proxy_port, work / "autovibe-inproc.log")
            processes.append(inproc)
            targets = [
                Target("mitmdump", bare_port),
                Target("mitmdump-lean", lean_port),
                Target("autovibe", settings.proxy_port, auth),
                Target("autovibe-inproc", settings_inproc.proxy_port, auth_inproc),
            ]
            roots = {"autovibe": root, "autovibe-inproc": root_inproc}
            why_not = "not asked for (--no-litellm)"
            if with_litellm:
                exe, why_not = litellm_executable()
                if exe is not None:
                    try:
                        port, process = _litellm(work, exe, json_port, sse_port)
                        processes.append(process)
                        targets.append(
                            Target(
                                "litellm",
                                port,
                                authorization=f"Bearer {LITELLM_MASTER_KEY}",
                                explicit_proxy=False,
                            )
                        )
                    except (RuntimeError, TimeoutError) as exc:
                        why_not = f"LiteLLM did not start: {exc} (see its log)"
                        tail = (work / "litellm.log").read_text(errors="replace")[-2000:]
                        print(f"litellm did not start: {exc}\n{tail}", file=sys.stderr)
            if why_not:
                print(f"note: no LiteLLM rows: {why_not}", file=sys.stderr)
            rows = []
            bare_calls = {"mitmdump": 0, "mitmdump-lean": 0}
            for stream in (False, True):
                upstream = sse_port if stream else json_port
                for concurrency in concurrencies:
                    runs: dict[str, list[dict[str, Any]]] = {}
                    for repeat in range(repeats):
                        for target in [Target("direct", upstream, explicit_proxy=False), *targets]:
                            if target.system == "litellm" and repeat:
                                continue  # tens of calls a second: one repeat
                            row = asyncio.run(_cell(target, upstream, stream, concurrency, total))
                            if target.system in roots:
                                # Whatever indexing is left is done now, not in the next turn.
                                row["index_lag_s"] = _index_lag(roots[target.system])
                            if target.system in bare_calls:
                                made = row["requests"] + WARM_UP_CALLS * concurrency
                                bare_calls[target.system] += made
                            print(row, file=sys.stderr, flush=True)
                            runs.setdefault(target.system, []).append(row)
                    rows += [_median_row(system_runs) for system_runs in runs.values()]
            cpu_used = {
                "mitmdump": cpu_s(bare.pid),
                "mitmdump-lean": cpu_s(lean.pid),
                "autovibe proxy": cpu_s(autovibe.pid),
                "autovibe indexer": cpu_s(indexer.pid),
                "autovibe-inproc": cpu_s(inproc.pid),
            }
            calls = {
                **bare_calls,
                "autovibe proxy": _check_metered(root, identity.assignment),
                "autovibe indexer": _spooled(root),
                "autovibe-inproc": _check_metered(root_inproc, identity.assignment),
            }
            cpu_ms = {name: round(cpu_used[name] * 1000 / calls[name], 2) for name in cpu_used}
            # Last, once the CPU per metered call is taken: a request to a host outside the
            # egress policy (nothing listens there), answered 403 by the proxy itself.
            refused_port = free_port()
            refusals = [
                asyncio.run(_cell(targets[2], refused_port, False, REFUSED_AT, total, True))
                for _ in range(repeats)
            ]
            for row in refusals:
                print(row, file=sys.stderr, flush=True)
            rows.append(_median_row(refusals))
            return Run(rows, cpu_ms, nginx is not None, why_not)
        finally:
            for process in reversed(processes):
                _stop(process)


def _bench_root(settings: Settings, identity: MachineIdentity) -> tuple[DataRoot, str]:
    """A data root whose budget covers the bench's machine; its `Proxy-Authorization`."""
    root = DataRoot.at(settings.data)
    key = load_or_create_key(root)
    open_ample(root.budget_counters, identity.project, [identity.machine])
    token = mint(key, identity)
    return root, "Basic " + base64.b64encode(f"{identity.machine}:{token}".encode()).decode()


def _spooled(root: DataRoot) -> int:
    """Complete lines in the spool of `root`."""
    return sum(p.read_bytes().count(b"\n") for p in root.traffic_logs.glob("*/*/flows.jsonl"))


def _indexed(root: DataRoot) -> int:
    if not root.traffic_index.exists():
        return 0
    with closing(sqlite3.connect(f"file:{root.traffic_index}?mode=ro", uri=True)) as db:
        (count,) = db.execute("SELECT count(*) FROM flows").fetchone()
    return int(count)


def _index_lag(root: DataRoot, timeout_s: float = 300) -> float:
    """Seconds until the traffic index of `root` holds every spooled flow."""
    t0 = time.perf_counter()
    while _indexed(root) < _spooled(root):
        if time.perf_counter() - t0 > timeout_s:
            raise SystemExit(f"the index of {root.root} trails its spool after {timeout_s}s")
        time.sleep(0.02)
    return round(time.perf_counter() - t0, 2)


def _check_metered(root: DataRoot, assignment: str) -> int:
    """The autovibe rows count only if the proxy really metered: every flow spooled, priced,
    indexed. Returns the number of flows."""
    lines = [
        json.loads(line)
        for path in root.traffic_logs.glob("*/*/flows.jsonl")
        for line in path.read_text().splitlines()
    ]
    mine = [r for r in lines if r["assignment"] == assignment]
    bad = [r for r in mine if r["error"] or not r["usage"] or r["usage"]["estimated"]]
    if not mine or bad:
        raise SystemExit(f"autovibe proxy did not meter the bench calls: {bad[:3]}")
    with SqliteTrafficStore(root.traffic_index) as index:
        indexed = len(index.flows(assignment=assignment))
    if indexed != len(mine):
        raise SystemExit(f"{root.root}: {len(mine)} flows spooled, {indexed} indexed")
    return len(mine)


def _ratio(row: dict[str, Any], base: dict[str, Any]) -> float:
    """`row`'s req/s over `base`'s: the median of the per-repeat ratios when both were repeated
    alike (each repeat's systems ran minutes apart at most), else the ratio of the medians."""
    mine, theirs = row.get("req_per_s_repeats", []), base.get("req_per_s_repeats", [])
    if len(mine) > 1 and len(mine) == len(theirs):
        return statistics.median(a / b for a, b in zip(mine, theirs, strict=True))
    return float(row["req_per_s"] / base["req_per_s"])


def _share(rows: list[dict[str, Any]], system: str, base: str) -> list[str]:
    """`system`'s req/s as a share (or multiple) of `base`'s, per workload and concurrency."""
    by = {(r["system"], r["workload"], r["concurrency"]): r for r in rows}
    return [
        f"{w} c={c}: {_ratio(by[(system, w, c)], by[(base, w, c)]):.2f}×"
        for (s, w, c) in by
        if s == system and (base, w, c) in by
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="concurrency 1 and 16, fewer calls")
    parser.add_argument("--no-litellm", action="store_true", help="leave out the LiteLLM rows")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        asyncio.run(_serve_upstream(args.upstream))
        return
    result = run(args.quick, with_litellm=not args.no_litellm)
    rows = result.rows
    direct = {(r["workload"], r["concurrency"]): r for r in rows if r["system"] == "direct"}
    for row in rows:
        base = direct.get((row["workload"], row["concurrency"]))
        if base is None:  # the refused row: nothing to compare with
            continue
        row["added_p50_ms"] = round(row["p50_ms"] - base["p50_ms"], 2)
        row["added_p99_ms"] = round(row["p99_ms"] - base["p99_ms"], 2)
        row["added_ttfb_p50_ms"] = round(row["ttfb_p50_ms"] - base["ttfb_p50_ms"], 2)
    sse = {(r["system"], r["concurrency"]): r for r in rows if r["workload"] == "sse"}
    ttfb = [
        f"c={c}: {row['added_ttfb_p50_ms']} ms over direct, "
        f"{row['ttfb_p50_ms'] - sse[('mitmdump', c)]['ttfb_p50_ms']:.2f} ms over bare mitmdump"
        for (system, c), row in sse.items()
        if system == "autovibe"
    ]
    upstream = (
        "nginx (one worker, `return 200` with the body)"
        if result.nginx
        else "the asyncio stub (nginx is not installed here)"
    )
    litellm = (
        f"`litellm` is LiteLLM {LITELLM_VERSION}'s proxy (`litellm --config`, its own venv, no "
        "database, a fixed master key, one worker) with the same upstreams as OpenAI-compatible "
        f"models; it is called as an API server (`POST /v1/chat/completions`), with "
        f"{calls_per_repeat(args.quick)[1]} calls per cell (one repeat). It passes the stub's "
        "stream "
        "through as SSE. autovibe throughput as a multiple of LiteLLM's: "
        + "; ".join(_share(rows, "autovibe", "litellm"))
        + "."
        if not result.litellm
        else f"LiteLLM was not measured in this run: {result.litellm}."
    )
    repeats, total = calls_per_repeat(args.quick)
    inproc = "; ".join(_share(rows, "autovibe-inproc", "mitmdump"))
    cpu = "; ".join(f"{name} {ms} ms" for name, ms in result.cpu_ms.items())
    refused = "; ".join(
        f"{r['req_per_s']} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms"
        for r in rows
        if r["workload"] == "refused"
    )
    notes = f"""
Upstreams: static JSON chat completion (`json`) from {upstream}; SSE (`sse`) from a small asyncio
HTTP/1.1 stub in its own process, sent chunked, first event at once and the rest
{STREAM_PAUSE_S * 1000:.0f} ms later. Load: an asyncio client in the bench process, keep-alive
connections = concurrency, {repeats} repeats of {total} calls per cell and system (the systems take
turns within a repeat; medians over repeats), each after 5 warm-up calls per connection,
loopback only; `direct` is bounded by this Python client, not by the upstream. `mitmdump` is
bare mitmdump 11 in regular (explicit proxy) mode with no addons, as shipped; `mitmdump-lean` is
mitmdump as the autovibe proxy runs it, without our addons: under `python -O` (mitmproxy then
skips its debug-only type checks of each request and response) with `proxy/addons/lean.py`,
which removes the built-ins a headless proxy leaves unused (map/modify/replay/save/onboarding/
console commands…), `proxy/addons/dispatch.py`, which has mitmproxy call each event's hooks
from a plan made once per hook instead of walking the whole addon tree for every event, and
`proxy/addons/coalesce.py`, which joins the bytes one event sends to a connection into one write;
`autovibe` is the proxy as the platform starts it (the same four, then identity, routing,
metering with streaming, budget reserve/settle on SQLite counters, injection, capture to the
spool, metrics addon; `autovibe_indexer=false`) with `python -m traffic.indexer` running beside
it on the same 2 cores, catching the SQLite index (FTS5) up every second: its CPU competes with
the proxy's, as it does in production.
`autovibe-inproc` is the same proxy with the indexer thread inside mitmdump, as before the
indexer got its own process (own data root). Every autovibe call is checked afterwards to be
spooled with exact usage and indexed; `index_lag_s` is how long after a cell's last call the
index still trailed the spool (waited out before the next cell, so no cell pays for another's
indexing). TTFB is the time to the first body byte (first SSE event). `added_*` are
differences from `direct` at the same workload and concurrency.
The machine is shared (2 cores, other work running): compare rows of one run, not across runs.

autovibe throughput as a share of bare mitmdump: {"; ".join(_share(rows, "autovibe", "mitmdump"))}.
Part of that is how mitmdump is run (`-O`, unused built-ins removed, hooks called from plans,
one write per connection and event);
what our own addons cost shows against
`mitmdump-lean`: {"; ".join(_share(rows, "autovibe", "mitmdump-lean"))};
`mitmdump-lean` against bare mitmdump: {"; ".join(_share(rows, "mitmdump-lean", "mitmdump"))}.
The same with the indexer inside the proxy (`autovibe-inproc`): {inproc}.
CPU per call over the whole run (user + system, /proc; warm-up calls included): {cpu}.
autovibe streaming TTFB overhead (p50): {"; ".join(ttfb)}.
A refused request (`refused`: a POST to a host outside the egress policy, answered 403 by the
proxy without any upstream connection), autovibe at c={REFUSED_AT}: {refused}.
{litellm}
"""
    command = "python -m bench.proxy" + (" --quick" if args.quick else "")
    publish("proxy", command, rows, notes)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
