"""What Ray Serve costs on the CPU profile: the bare llama.cpp server against the same server
behind the Ray Serve deployment (`serving.rayserve_cpu`), streaming completions of the tiny model.

Both systems run side by side on one machine and are measured in turn, repeat by repeat (bare,
Ray Serve, bare, Ray Serve, …), so drift in the shared machine's load reaches both alike. Ray
Serve runs one replica: the same single llama.cpp server as bare, behind Serve's HTTP proxy and
a replica that forwards the stream, which is the fair overhead comparison. Each cell fires 1, 4
or 8 concurrent streams of one fixed prompt and fixed `max_tokens`, `--repeats` times;
tokens/s is a repeat's tokens (SSE events carrying text: one token each, llama.cpp sends no
usage when streaming) over its wall time, median of the repeats; TTFT is the time to the first
text event, p50 over every request of the cell.

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
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.report import publish
from contracts.config import load_models
from contracts.dataroot import DataRoot
from contracts.settings import PROJECT_ROOT, Settings, free_port
from serving.llamacpp import server_argv
from serving.weights import ensure_weights

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time,"
MAX_TOKENS = 16
CONCURRENCY = (1, 4, 8)
START_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class System:
    name: str
    """`llamacpp` (bare) or `rayserve`."""
    replicas: int
    """0 for the bare server."""


@contextmanager
def running(system: System, settings: Settings, work: Path) -> Iterator[str]:
    """Start `system` on `settings.model_port`; yield its base URL once it serves; stop it."""
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
        yield settings.model_url
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/models", timeout=2, trust_env=False).is_success
    except httpx.HTTPError:
        return False


async def _stream(client: httpx.AsyncClient, url: str) -> tuple[float, int]:
    """One streamed completion: (seconds to the first token, tokens)."""
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
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


async def _cell(url: str, concurrency: int, repeats: int) -> tuple[list[float], list[float]]:
    """(tokens/s of each repeat, TTFT of every request in seconds)."""
    rates, ttfts = [], []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(trust_env=False, timeout=300, limits=limits) as client:
        for _ in range(repeats):
            t0 = time.perf_counter()
            results = await asyncio.gather(*(_stream(client, url) for _ in range(concurrency)))
            elapsed = time.perf_counter() - t0
            rates.append(sum(tokens for _, tokens in results) / elapsed)
            ttfts += [first for first, _ in results]
    return rates, ttfts


def run(repeats: int) -> tuple[list[dict[str, Any]], list[float]]:
    """The rows, and the 1-minute load average at the start of each cell (the machine is
    shared)."""
    systems = [System("llamacpp", 0), System("rayserve", 1)]
    samples: dict[tuple[System, int], tuple[list[float], list[float]]] = {}
    loads = []
    work = Path(tempfile.mkdtemp(prefix="avb", dir="/tmp"))  # short: Ray's sockets live here
    settings = Settings(data=work / "d", configs=PROJECT_ROOT / "configs")
    ensure_weights(DataRoot.at(settings.data), load_models(settings.configs).pairs["tiny"].normal)
    with ExitStack() as stack:
        urls = {
            system: stack.enter_context(
                running(system, settings.model_copy(update={"model_port": free_port()}), work)
            )
            for system in systems
        }
        for url in urls.values():
            asyncio.run(_cell(url, 1, 1))  # warm-up, not counted
        for concurrency in CONCURRENCY:
            loads.append(os.getloadavg()[0])
            for _ in range(repeats):
                for system, url in urls.items():
                    rates, ttfts = asyncio.run(_cell(url, concurrency, 1))
                    old = samples.get((system, concurrency), ([], []))
                    samples[(system, concurrency)] = (old[0] + rates, old[1] + ttfts)
    shutil.rmtree(work, ignore_errors=True)  # kept, with the logs, when something failed
    rows = []
    for (system, concurrency), (rates, ttfts) in samples.items():
        rows.append(
            {
                "system": system.name,
                "replicas": system.replicas,
                "concurrency": concurrency,
                "requests": len(ttfts),
                "tokens_per_s": round(statistics.median(rates), 1),
                "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
            }
        )
    return rows, loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=4, help="repeats per cell (default 4)")
    args = parser.parse_args()
    repeats = args.repeats
    rows, loads = run(repeats)
    bare = {r["concurrency"]: r for r in rows if r["system"] == "llamacpp"}
    for row in rows:
        base = bare[row["concurrency"]]
        row["tokens_per_s_vs_bare"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
        row["ttft_p50_vs_bare"] = round(row["ttft_p50_ms"] / base["ttft_p50_ms"], 3)
    one = [r for r in rows if r["system"] == "rayserve" and r["replicas"] == 1]
    overhead = "; ".join(
        f"c={r['concurrency']}: throughput {1 - r['tokens_per_s_vs_bare']:+.1%}, "
        f"TTFT {r['ttft_p50_vs_bare'] - 1:+.1%}"
        for r in one
    )
    worst = max(1 - r["tokens_per_s_vs_bare"] for r in one)
    verdict = "within" if worst <= 0.10 else "OUTSIDE"
    notes = f"""
Fixed prompt, `max_tokens` {MAX_TOKENS}, temperature 0, `POST /v1/completions` with
`stream: true`, model `tiny` (gemma3-270m Q4_K_M) on llama.cpp; an asyncio httpx client in the
bench process. Both systems up at once and measured alternately, repeat by repeat, after one
warm-up stream each; {repeats} repeats per cell; `tokens_per_s` is the median over repeats of
a repeat's tokens over its wall time, `ttft_p50_ms` the median time to the first token over
all the cell's requests. `rayserve` runs 1 replica: one llama.cpp server, as bare, behind Ray
Serve's HTTP proxy and a replica forwarding the stream. llama.cpp's server runs one generation
at a time, so concurrency queues in both systems alike, behind the server's model lock
(`interrupt_requests: false` in serving/llamacpp.py's config: without it a new request cuts a
running stream short). Ray's idle processes run during the bare measurements too.
Ray Serve overhead, 1 replica vs bare (positive = worse): {overhead}. Target: throughput
overhead ≤ 10 %: {verdict} the target (worst {worst:.1%}). The machine (2 cores) is shared
with other engineers' work; 1-minute load average at the start of each concurrency:
{", ".join(f"{x:.1f}" for x in loads)}. Under such load the figures vary by tens of percent
from run to run; rerun on a quiet machine before reading small differences.
"""
    command = "python -m bench.serving" + (f" --repeats {repeats}" if repeats != 4 else "")
    publish("serving", command, rows, notes)
    for row in rows:
        print(row)
    print(notes)


if __name__ == "__main__":
    main()
