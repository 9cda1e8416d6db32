"""What the proxy costs: the same upstream called direct, through bare mitmdump and through the
autovibe proxy (all addons: identity, metering, budget, capture, indexer), side by side.

Two workloads against one small asyncio upstream (its own process): a static JSON chat
completion, and an SSE stream that sends its first event at once and the rest 2 ms later (so
the time to first byte shows whether a proxy buffers). Concurrency 1 and 16 (and 64 without
`--quick`); each cell sends a bounded number of keep-alive requests over loopback from an
asyncio load generator in this process. LiteLLM is not installed here and is not run.

    python -m bench.proxy [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import publish
from contracts.credentials import MachineIdentity, load_or_create_key, mint
from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from ledger.counters import open_ample
from proxy.launch import mitmdump_argv, mitmdump_path, wait_ready

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"
"""Priced in configs/prices.yaml as a local model, so the autovibe proxy meters the calls."""

JSON_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello world"}}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13},
    }
).encode()


def _event(doc: dict[str, Any] | str) -> bytes:
    return (
        b"data: " + (doc.encode() if isinstance(doc, str) else json.dumps(doc).encode()) + b"\n\n"
    )


FIRST_EVENT = _event(
    {"id": "chatcmpl-s", "choices": [{"delta": {"content": "Hel"}}], "usage": None}
)
REST_EVENTS = (
    b"".join(
        _event({"id": "chatcmpl-s", "choices": [{"delta": {"content": w}}], "usage": None})
        for w in ("lo", " wor", "ld", "!")
    )
    + _event(
        {
            "id": "chatcmpl-s",
            "choices": [],
            "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16},
        }
    )
    + _event("[DONE]")
)
STREAM_PAUSE_S = 0.002


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


# -- the load generator ---------------------------------------------------------------------


@dataclass
class Target:
    system: str
    port: int
    """Where the client connects: the upstream itself, or a proxy."""
    proxy_auth: str | None = None


async def _read_response(reader: asyncio.StreamReader, t0: float) -> tuple[float, float]:
    """Read one response; (time to first body byte, time to the end), both from t0."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    if not lines[0].startswith(b"http/1.1 200"):
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
    target: Target, upstream_port: int, request: bytes, n: int, out: list[tuple[float, float]]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            writer.write(request)
            out.append(await _read_response(reader, t0))
    finally:
        writer.close()


def _request(target: Target, upstream_port: int, stream: bool) -> bytes:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "say hello"}],
            "max_tokens": 8,
            "stream": stream,
        }
    ).encode()
    host = f"127.0.0.1:{upstream_port}"
    path = "/v1/chat/completions"
    target_uri = path if target.system == "direct" else f"http://{host}{path}"
    head = [
        f"POST {target_uri} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if target.proxy_auth:
        head.append(f"Proxy-Authorization: {target.proxy_auth}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _cell(
    target: Target, upstream_port: int, stream: bool, concurrency: int, total: int
) -> dict[str, Any]:
    request = _request(target, upstream_port, stream)
    warm: list[tuple[float, float]] = []
    await asyncio.gather(
        *(_worker(target, upstream_port, request, 5, warm) for _ in range(concurrency))
    )
    samples: list[tuple[float, float]] = []
    per_worker = max(1, total // concurrency)
    t0 = time.perf_counter()
    await asyncio.gather(
        *(_worker(target, upstream_port, request, per_worker, samples) for _ in range(concurrency))
    )
    elapsed = time.perf_counter() - t0
    latencies = sorted(s[1] * 1000 for s in samples)
    ttfb = [s[0] * 1000 for s in samples]
    return {
        "system": target.system,
        "workload": "sse" if stream else "json",
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


def run(quick: bool) -> list[dict[str, Any]]:
    concurrencies = [1, 16] if quick else [1, 16, 64]
    total = 400 if quick else 2000
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        work = Path(tmp)
        try:
            upstream_port = free_port()
            processes.append(
                _start(
                    [sys.executable, "-m", "bench.proxy", "--upstream", str(upstream_port)],
                    upstream_port,
                    work / "upstream.log",
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )
            )
            bare_port = free_port()
            processes.append(
                _start(
                    [
                        str(mitmdump_path()),
                        "--mode",
                        f"regular@{bare_port}",
                        "--listen-host",
                        "127.0.0.1",
                        "--set",
                        f"confdir={work / 'mitm-conf'}",
                        "--set",
                        "termlog_verbosity=warn",
                        "--set",
                        "flow_detail=0",
                    ],
                    bare_port,
                    work / "mitmdump.log",
                )
            )
            settings = Settings(
                data=work / "data",
                configs=ROOT / "configs",
                host="127.0.0.1",
                proxy_port=free_port(),
                model_port=upstream_port,
            )
            root = DataRoot.at(settings.data)
            key = load_or_create_key(root)
            identity = MachineIdentity("bench", "bench", "bench-000", "m1", time.time() + 3600)
            open_ample(root.budget_counters, identity.project, [identity.machine])
            processes.append(
                _start(mitmdump_argv(settings), settings.proxy_port, work / "autovibe.log")
            )
            auth = "Basic " + base64.b64encode(f"m1:{mint(key, identity)}".encode()).decode()
            targets = [
                Target("direct", upstream_port),
                Target("mitmdump", bare_port),
                Target("autovibe", settings.proxy_port, auth),
            ]
            rows = []
            for stream in (False, True):
                for concurrency in concurrencies:
                    for target in targets:
                        rows.append(
                            asyncio.run(_cell(target, upstream_port, stream, concurrency, total))
                        )
            _check_metered(root, identity.assignment)
            return rows
        finally:
            for process in reversed(processes):
                process.terminate()
                process.wait(timeout=15)


def _check_metered(root: DataRoot, assignment: str) -> None:
    """The autovibe rows count only if the proxy really metered: every flow spooled, priced."""
    lines = [
        json.loads(line)
        for path in root.traffic_logs.glob("*/*/flows.jsonl")
        for line in path.read_text().splitlines()
    ]
    mine = [r for r in lines if r["assignment"] == assignment]
    bad = [r for r in mine if r["error"] or not r["usage"] or r["usage"]["estimated"]]
    if not mine or bad:
        raise SystemExit(f"autovibe proxy did not meter the bench calls: {bad[:3]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="concurrency 1 and 16, fewer calls")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        asyncio.run(_serve_upstream(args.upstream))
        return
    rows = run(args.quick)
    direct = {(r["workload"], r["concurrency"]): r for r in rows if r["system"] == "direct"}
    for row in rows:
        base = direct[(row["workload"], row["concurrency"])]
        row["added_p50_ms"] = round(row["p50_ms"] - base["p50_ms"], 2)
        row["added_ttfb_p50_ms"] = round(row["ttfb_p50_ms"] - base["ttfb_p50_ms"], 2)
    bare = {(r["workload"], r["concurrency"]): r for r in rows if r["system"] == "mitmdump"}
    ratios = [
        f"{r['workload']} c={r['concurrency']}: "
        f"{r['req_per_s'] / bare[(r['workload'], r['concurrency'])]['req_per_s']:.0%}"
        for r in rows
        if r["system"] == "autovibe"
    ]
    notes = f"""
Upstream: a small asyncio HTTP/1.1 server in its own process (nginx is not installed): static
JSON chat completion (`json`), or SSE sent chunked, first event at once and the rest
{STREAM_PAUSE_S * 1000:.0f} ms later (`sse`). Load: an asyncio client in the bench process,
keep-alive connections = concurrency, {"400" if args.quick else "2000"} requests per cell after
5 warm-up requests per connection, loopback only. `direct` is bounded by this Python client, not
by the upstream. `mitmdump` is bare mitmdump 11 in regular (explicit proxy) mode with no
addons; `autovibe` is the proxy as the platform starts it (identity, metering with streaming,
budget reserve/settle on SQLite counters, capture to the spool, indexer), every call checked
afterwards to be spooled with exact usage. TTFB is the time to the first body byte (first SSE
event). `added_*` are differences from `direct` at the same workload and concurrency.
autovibe throughput as a share of bare mitmdump: {"; ".join(ratios)}.
LiteLLM is not installed in this environment and must not be added to the project's
dependencies, so its row is not measured.
"""
    command = "python -m bench.proxy" + (" --quick" if args.quick else "")
    publish("proxy", command, rows, notes)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
