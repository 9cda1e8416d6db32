"""What Ray Serve costs on the GPU profile: one pair served by the rendered Ray Serve app (vLLM
through `ray.serve.llm`, `autovibe models render --profile gpu`) against the same models under
bare `vllm serve` with the same engine settings, streaming chat completions.

The Ray Serve app serves both models of the pair at once, as in production; bare `vllm serve`
serves one model per process, so each model gets its own, one after the other, with the
engine arguments of its `LLMConfig` (`vllm_serve_argv`). Per model and system: `--requests`
streamed chat completions, `--concurrency` at a time, after one warm-up; tokens/s is the
completion tokens (the usage vLLM sends at the end of the stream) over the wall time, TTFT the
time to the first content or reasoning delta, p50 over the requests.

Needs a GPU machine, the `gpu` extra (`uv sync --extra gpu`: ray[llm,serve] with vLLM) and the
pair's weights under $AUTOVIBE_DATA/model-weights/ (`autovibe models check --pair PAIR` says
what is missing). Nothing is downloaded: every server runs with HF_HUB_OFFLINE=1. Not run in
CI. `bench/gpu_smoke.sh` checks the machine and runs this.

    python -m bench.gpu [--pair 3b] [--requests 64] [--concurrency 8] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.report import publish
from common.processes import group_members
from contracts.config import load_models
from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from serving import rayserve

PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring."
READY_TIMEOUT_S = 1800.0
"""Loading a 32B model and capturing its CUDA graphs takes minutes."""
STOP_TIMEOUT_S = 60.0


def vllm_serve_argv(vllm: str, config: dict[str, Any], host: str, port: int) -> list[str]:
    """`vllm serve` for one rendered `LLMConfig`: the same weights, served name and engine
    arguments (`engine_kwargs` keys are vLLM's engine arguments, flags with dashes)."""
    loading = config["model_loading_config"]
    argv = [vllm, "serve", loading["model_source"], "--served-model-name", loading["model_id"]]
    argv += ["--host", host, "--port", str(port)]
    for key, value in config["engine_kwargs"].items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif isinstance(value, (int, float, str)):
            argv += [flag, str(value)]
        else:
            raise ValueError(f"engine_kwargs.{key}: {value!r} has no `vllm serve` flag form")
    return argv


@contextlib.contextmanager
def running(argv: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv` in its own process group (a local Ray instance goes down with it); SIGINT
    to the group on exit, SIGKILL after STOP_TIMEOUT_S. Returns once the whole group is gone,
    so the next server finds the GPU memory free."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield process
    finally:
        for sig in (signal.SIGINT, signal.SIGKILL):  # SIGKILL: whatever outlived the wait
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while group_members(process.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        process.wait()


def wait_ready(
    base: str, models: list[str], process: subprocess.Popen[bytes], log: Path, timeout_s: float
) -> None:
    """Until `base/models` lists every one of `models`; a clear error if the server exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise SystemExit(f"{process.args!r} exited ({process.returncode}); see {log}")
        try:
            answer = httpx.get(f"{base}/models", timeout=5, trust_env=False)
            if set(models) <= {m["id"] for m in answer.json()["data"]}:
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"models {models} not ready after {timeout_s:.0f} s; see {log}")
        time.sleep(2)


async def _one(
    client: httpx.AsyncClient, base: str, model: str, max_tokens: int, extra: dict[str, Any]
) -> dict[str, Any]:
    """One streamed chat completion: seconds to the first delta and in all, tokens (the
    usage, else one per delta), and whether the reasoning came apart from the answer."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0.6,
        **extra,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    deltas = 0
    usage: dict[str, Any] = {}
    reasoning = False
    async with client.stream("POST", f"{base}/chat/completions", json=body) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                thought = delta.get("reasoning_content") or delta.get("reasoning")
                if delta.get("content") or thought:
                    first = first if first is not None else time.perf_counter() - start
                    deltas += 1
                    reasoning = reasoning or bool(thought)
    return {
        "ttft_s": first if first is not None else time.perf_counter() - start,
        "total_s": time.perf_counter() - start,
        "tokens": int(usage.get("completion_tokens") or deltas),
        "reasoning": reasoning,
    }


async def measure(
    base: str, model: str, requests: int, concurrency: int, max_tokens: int, **extra: Any
) -> dict[str, Any]:
    """One warm-up, then `requests` streamed completions `concurrency` at a time; the row.
    `extra` goes into every request body (the tests' fixed prompt, for instance)."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(600.0)) as client:
        await _one(client, base, model, max_tokens, extra)

        async def limited() -> dict[str, Any]:
            async with limit:
                return await _one(client, base, model, max_tokens, extra)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited() for _ in range(requests)))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {
        "model": model,
        "concurrency": concurrency,
        "requests": requests,
        "max_tokens": max_tokens,
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(statistics.median(r["ttft_s"] for r in results) * 1000, 1),
        "latency_p50_ms": round(statistics.median(r["total_s"] for r in results) * 1000, 1),
        "reasoning_separated": round(sum(r["reasoning"] for r in results) / len(results), 2),
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    settings = Settings()
    root = DataRoot.at(settings.data)
    bindir = Path(sys.executable).parent
    port = free_port("127.0.0.1")
    base = f"http://127.0.0.1:{port}/v1"
    app = rayserve.gpu_app(
        root,
        load_models(settings.configs),
        pairs=[args.pair],
        host="127.0.0.1",
        port=port,
        accelerator_type=args.accelerator,
    )
    configs = app["applications"][0]["args"]["llm_configs"]
    models = [c["model_loading_config"]["model_id"] for c in configs]
    env = {**os.environ, **rayserve.OFFLINE_ENV}
    work = Path(tempfile.mkdtemp(prefix="avgpu-"))
    shape = (args.requests, args.concurrency, args.max_tokens)
    rows = []

    config = rayserve.write(app, work / "serve.yaml")
    log = work / "rayserve.log"
    with running([str(bindir / "serve"), "run", str(config)], log, env) as process:
        wait_ready(base, models, process, log, args.ready_timeout)
        for model in models:
            row = asyncio.run(measure(base, model, *shape))
            rows.append({"system": "rayserve-vllm", "pair": args.pair, **row})
            print(json.dumps(rows[-1]), flush=True)
    for one in configs:
        model = one["model_loading_config"]["model_id"]
        log = work / f"vllm-{model.replace(':', '-')}.log"
        argv = vllm_serve_argv(str(bindir / "vllm"), one, "127.0.0.1", port)
        with running(argv, log, env) as process:
            wait_ready(base, [model], process, log, args.ready_timeout)
            row = asyncio.run(measure(base, model, *shape))
            rows.append({"system": "vllm", "pair": args.pair, **row})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def overhead(rows: list[dict[str, Any]]) -> str:
    """Per model, Ray Serve against bare vLLM (positive = worse)."""
    bare = {r["model"]: r for r in rows if r["system"] == "vllm"}
    parts = []
    for row in rows:
        base = bare.get(row["model"])
        if row["system"] != "rayserve-vllm" or base is None:
            continue
        tps = 1 - row["tokens_per_s"] / base["tokens_per_s"]
        ttft = row["ttft_p50_ms"] / base["ttft_p50_ms"] - 1
        parts.append(f"{row['model']}: throughput {tps:+.1%}, TTFT {ttft:+.1%}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", default="3b", help="a GPU pair of configs/models.yaml")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--accelerator", default=None, help="Ray accelerator type, e.g. H100")
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S)
    args = parser.parse_args()
    rows = run(args)
    notes = f"""
One GPU pair, `{args.pair}`: the Ray Serve app `autovibe models render --profile gpu` writes
(`ray.serve.llm`, both models at once) against bare `vllm serve` with each model's engine
arguments (one model at a time); streamed chat completions of one fixed prompt, temperature
0.6, after one warm-up. Ray Serve overhead vs bare vLLM (positive = worse): {overhead(rows)}.
"""
    command = " ".join(["python -m bench.gpu", *sys.argv[1:]])
    publish("gpu", command, rows, notes)


if __name__ == "__main__":
    main()
