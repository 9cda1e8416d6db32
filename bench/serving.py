"""What Ray Serve costs on the CPU profile: the bare llama.cpp server against the same server
behind the Ray Serve deployment (`serving.rayserve_cpu`), streaming completions of the tiny model.

Both systems run side by side on one machine and are measured in turn, repeat by repeat (bare,
Ray Serve, bare, Ray Serve, …), so drift in the shared machine's load reaches both alike. Ray
Serve runs one replica: the same single model server as bare (`serving.app`, run in the
replica's process), behind Serve's ingress (HAProxy, `serving.rayserve_cpu.serve_env`), which is
the fair overhead comparison. Each cell fires 1, 4 or 8 concurrent streams of one fixed prompt and
fixed `max_tokens` (16, and 128 as an agent's longer answer), `--repeats` times; tokens/s is a
repeat's tokens (SSE events carrying text: one token each, llama.cpp sends no usage when
streaming) over its wall time, median of the repeats; TTFT is the time to the first text event,
p50 over every request of the cell. Each system has its own client, its connections kept alive
across the run, as the proxy and the agents' SDKs keep theirs (a new connection per request would
add its setup at every hop). CPU per token is measured too, which a shared machine's load
does not move: the model server's process (bare: `serving.app`; Ray Serve: the replica, which
runs it), and that of every other process the system started (Ray, HAProxy) while the cell ran.

    python -m bench.serving [--repeats N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.report import publish
from common.processes import cmdline, cpu_s, descendants
from contracts.config import load_models
from contracts.dataroot import DataRoot
from contracts.settings import PROJECT_ROOT, Settings, free_port
from serving.llamacpp import server_argv
from serving.weights import ensure_weights

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"
MAX_TOKENS = (16, 128)
CONCURRENCY = (1, 4, 8)
LONE_STREAM_ROUNDS = 10
"""One-stream cells run `--repeats` × this: each repeat gives them one TTFT sample, and a lone
first token varies by ±6 ms (one run's 16- and 128-token cells, the same first token, differed by
12 ms in p50 over 20; two runs of 50 alternating samples each put Ray Serve's overhead at -0.4
and +3.6 ms), more than the 10 % target (3 ms) to be resolved."""
START_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class System:
    name: str
    """`llamacpp` (bare) or `rayserve`."""
    replicas: int
    """0 for the bare server."""


@dataclass(frozen=True)
class Running:
    url: str
    pid: int
    """The process the bench started: the server, or the Ray Serve entry point."""


def _is_model_server(pid: int) -> bool:
    """The bare server, or a replica (which runs the same app in its process)."""
    line = cmdline(pid)
    return "serving.app" in line or "ray::ServeReplica" in line


def cpu_seconds(root: int) -> tuple[float, float]:
    """(model server, everything else) CPU seconds of the live processes under `root`; the
    model server is the bare server or a replica (which runs the same app)."""
    model = other = 0.0
    for pid in [root, *descendants(root)]:
        try:
            used = cpu_s(pid)
        except OSError:
            continue  # ended meanwhile
        if _is_model_server(pid):
            model += used
        else:
            other += used
    return model, other


@contextmanager
def running(system: System, settings: Settings, work: Path) -> Iterator[Running]:
    """Start `system` on `settings.model_port`; yield it once it serves; stop it."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    env.update(settings.as_env())
    log = work / f"{system.name}-{system.replicas}.log"
    if system.replicas == 0:
        argv = server_argv(settings, load_models(settings.configs))
        ready = ""  # the answer to /v1/models is enough
    else:
        argv = [sys.executable, "-m", "serving.rayserve_cpu", "--replicas", str(system.replicas)]
        ready = "serving http"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while ready not in log.read_text(errors="replace") or not _answers(settings.model_url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{system} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield Running(settings.model_url, process.pid)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/models", timeout=2, trust_env=False).is_success
    except httpx.HTTPError:
        return False


async def _stream(client: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[float, int]:
    """One streamed completion: (seconds to the first token, tokens)."""
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    t0 = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with client.stream("POST", f"{url}/completions", json=body) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line.removeprefix("data: "))["choices"]
            if choices and choices[0]["text"]:
                tokens += 1
                if first is None:
                    first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("a stream carried no token")
    return first, tokens


@dataclass
class Samples:
    rates: list[float]
    """tokens/s of each repeat"""
    ttfts: list[float]
    """seconds to the first token, every request"""
    tokens: int = 0
    model_cpu_s: float = 0.0
    other_cpu_s: float = 0.0


async def _cell(client: httpx.AsyncClient, url: str, concurrency: int, max_tokens: int) -> Samples:
    """One repeat: `concurrency` streams at once."""
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_stream(client, url, max_tokens) for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    tokens = sum(tokens for _, tokens in results)
    return Samples([tokens / elapsed], [first for first, _ in results], tokens)


async def _measure(
    system: Running, client: httpx.AsyncClient, concurrency: int, max_tokens: int
) -> Samples:
    """One repeat of a cell, with the CPU the system's processes used during it."""
    model0, other0 = cpu_seconds(system.pid)
    samples = await _cell(client, system.url, concurrency, max_tokens)
    model1, other1 = cpu_seconds(system.pid)
    samples.model_cpu_s, samples.other_cpu_s = model1 - model0, other1 - other0
    return samples


async def _measure_all(
    started: dict[System, Running], repeats: int
) -> tuple[dict[tuple[int, System, int], Samples], list[float]]:
    """Every cell, the systems in turn, each through its own client whose connections are
    kept alive across the run, as the proxy and the agents' SDKs keep theirs."""
    cells: dict[tuple[int, System, int], Samples] = {}
    loads = []
    most = max(CONCURRENCY)
    limits = httpx.Limits(max_connections=most, max_keepalive_connections=most)
    async with AsyncExitStack() as stack:
        clients = {
            system: await stack.enter_async_context(
                httpx.AsyncClient(trust_env=False, timeout=300, limits=limits)
            )
            for system in started
        }
        for system, one in started.items():
            await _cell(clients[system], one.url, 1, MAX_TOKENS[0])  # warm-up, not counted
        for max_tokens in MAX_TOKENS:
            for concurrency in CONCURRENCY:
                loads.append(os.getloadavg()[0])
                for _ in range(repeats * (LONE_STREAM_ROUNDS if concurrency == 1 else 1)):
                    for system, one in started.items():
                        new = await _measure(one, clients[system], concurrency, max_tokens)
                        old = cells.setdefault((max_tokens, system, concurrency), Samples([], []))
                        old.rates += new.rates
                        old.ttfts += new.ttfts
                        old.tokens += new.tokens
                        old.model_cpu_s += new.model_cpu_s
                        old.other_cpu_s += new.other_cpu_s
    return cells, loads


def run(repeats: int) -> tuple[list[dict[str, Any]], list[float]]:
    """The rows, and the 1-minute load average at the start of each cell (the machine is
    shared)."""
    systems = [System("llamacpp", 0), System("rayserve", 1)]
    work = Path(tempfile.mkdtemp(prefix="avb", dir="/tmp"))  # short: Ray's sockets live here
    settings = Settings(data=work / "d", configs=PROJECT_ROOT / "configs")
    ensure_weights(DataRoot.at(settings.data), load_models(settings.configs).pairs["tiny"].normal)
    with ExitStack() as stack:
        started = {
            system: stack.enter_context(
                running(system, settings.model_copy(update={"model_port": free_port()}), work)
            )
            for system in systems
        }
        cells, loads = asyncio.run(_measure_all(started, repeats))
    shutil.rmtree(work, ignore_errors=True)  # kept, with the logs, when something failed
    rows = []
    for (max_tokens, system, concurrency), cell in cells.items():
        rows.append(
            {
                "system": system.name,
                "replicas": system.replicas,
                "max_tokens": max_tokens,
                "concurrency": concurrency,
                "requests": len(cell.ttfts),
                "tokens_per_s": round(statistics.median(cell.rates), 1),
                "ttft_p50_ms": round(statistics.median(cell.ttfts) * 1000, 1),
                "model_cpu_ms_per_token": round(cell.model_cpu_s * 1000 / cell.tokens, 2),
                "other_cpu_ms_per_token": round(cell.other_cpu_s * 1000 / cell.tokens, 2),
            }
        )
    return rows, loads


def _overhead(row: dict[str, Any], base: dict[str, Any]) -> str:
    ttft_ms = row["ttft_p50_ms"] - base["ttft_p50_ms"]
    return (
        f"{row['max_tokens']} tokens c={row['concurrency']}: "
        f"throughput {1 - row['tokens_per_s_vs_bare']:+.1%}, "
        f"TTFT {row['ttft_p50_vs_bare'] - 1:+.1%} ({ttft_ms:+.0f} ms), "
        f"{row['other_cpu_ms_per_token']:.2f} ms CPU/token beside llama.cpp's "
        f"{row['model_cpu_ms_per_token']:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=4, help="repeats per cell (default 4)")
    args = parser.parse_args()
    repeats = args.repeats
    rows, loads = run(repeats)
    bare = {(r["max_tokens"], r["concurrency"]): r for r in rows if r["system"] == "llamacpp"}
    for row in rows:
        base = bare[(row["max_tokens"], row["concurrency"])]
        row["tokens_per_s_vs_bare"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
        row["ttft_p50_vs_bare"] = round(row["ttft_p50_ms"] / base["ttft_p50_ms"], 3)
    one = [r for r in rows if r["system"] == "rayserve" and r["replicas"] == 1]
    overhead = "; ".join(_overhead(r, bare[(r["max_tokens"], r["concurrency"])]) for r in one)
    misses = [
        f"{r['max_tokens']} tokens c={r['concurrency']} {what}"
        for r in one
        for what, ratio in (
            ("throughput", 1 - r["tokens_per_s_vs_bare"]),
            ("TTFT", r["ttft_p50_vs_bare"] - 1),
        )
        if ratio > 0.10
    ]
    verdict = "met in every cell" if not misses else "missed in: " + ", ".join(misses)
    lone = repeats * LONE_STREAM_ROUNDS
    notes = f"""
Fixed prompt, `max_tokens` {" and ".join(map(str, MAX_TOKENS))}, temperature 0,
`POST /v1/completions` with `stream: true`, model `tiny` (gemma3-270m Q4_K_M) on llama.cpp; an
asyncio httpx client per system in the bench process, its connections kept alive across the run
(as the proxy and the agents' SDKs keep theirs). Both systems up at once and measured
alternately, repeat by repeat, after one warm-up stream each; {repeats} repeats per cell ({lone}
at one stream, for TTFT samples); `tokens_per_s` is the median over repeats of a repeat's
tokens over its wall time, `ttft_p50_ms` the median time to the first token over all the cell's
requests;
`model_cpu_ms_per_token` is the model server's process's CPU time per streamed token (bare:
`serving.app`; `rayserve`: the replica, which runs the same app and Ray's replica code),
`other_cpu_ms_per_token` that of every other process the system started (Ray's, HAProxy), both over
the whole cell. `rayserve` runs 1 replica: the bare server's app, in the replica's process, behind
Serve's high-throughput ingress (HAProxy in front of a replica that serves HTTP itself;
`serve_env` in serving/rayserve_cpu.py). llama.cpp's server runs one generation at a time,
so concurrency queues in both systems alike, behind the server's model lock (`interrupt_requests:
false` in serving/llamacpp.py's config: without it a new request cuts a running stream short).
Ray's idle processes run during the bare measurements too.
Ray Serve overhead, 1 replica vs bare (positive = worse): {overhead}.
Target, overhead ≤ 10 % in tokens/s and TTFT: {verdict}. The machine (2 cores) is shared with
other engineers' work; 1-minute load average at the start of each cell:
{", ".join(f"{x:.1f}" for x in loads)}. Under such load tokens/s and TTFT vary by tens of
percent from run to run, CPU per token much less; rerun on a quiet machine before reading small
differences.
"""
    command = "python -m bench.serving" + (f" --repeats {repeats}" if repeats != 4 else "")
    publish("serving", command, rows, notes)
    for row in rows:
        print(row)
    print(notes)


if __name__ == "__main__":
    main()
