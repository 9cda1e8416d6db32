#!/usr/bin/env bash
# GPU smoke benchmark: serve one model pair with Ray Serve + vLLM from the config that
# `autovibe models render --profile gpu` writes, then measure throughput with a bounded loop of
# chat requests against both models of the pair (normal and :thinking).
#
# Needs a GPU machine, the `gpu` extra (`uv sync --extra gpu`: ray[llm,serve] with vLLM) and
# the pair's weights under $AUTOVIBE_DATA/model-weights/ (`autovibe models check --pair PAIR`
# says what is missing). Nothing is downloaded: the replicas run with HF_HUB_OFFLINE=1.
# Not run in CI (no GPU there); run it whenever a GPU machine is available.
#
# usage: bench/gpu_smoke.sh [PAIR]          (default 3b, the smallest GPU pair)
# env:   REQUESTS=64 CONCURRENCY=8 MAX_TOKENS=256 PORT=8500 ACCELERATOR=<Ray type, e.g. H100>
#        READY_TIMEOUT_S=1800 RESULTS=bench/results/gpu_smoke.json PYTHON=.venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."

PAIR=${1:-3b}
PY=${PYTHON:-.venv/bin/python}
SERVE=${SERVE:-$(dirname "$PY")/serve}
export AUTOVIBE_MODEL_PORT=${PORT:-8500}
export REQUESTS=${REQUESTS:-64} CONCURRENCY=${CONCURRENCY:-8} MAX_TOKENS=${MAX_TOKENS:-256}
export READY_TIMEOUT_S=${READY_TIMEOUT_S:-1800} RESULTS=${RESULTS:-bench/results/gpu_smoke.json}
export PAIR

if [[ ! -x "$SERVE" ]]; then
    echo "error: $SERVE not found: install the gpu extra (uv sync --extra gpu)" >&2
    exit 2
fi
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: no NVIDIA GPU visible (nvidia-smi -L failed)" >&2
    exit 2
fi

"$PY" -m serving.cli check --pair "$PAIR"
work=$(mktemp -d)
"$PY" -m serving.cli render --profile gpu --pair "$PAIR" \
    ${ACCELERATOR:+--accelerator "$ACCELERATOR"} "$work/serve.yaml"

# Own process group, so the whole local Ray instance `serve run` starts goes down with it.
setsid "$SERVE" run "$work/serve.yaml" >"$work/serve.log" 2>&1 &
serve_pid=$!
stop() {
    kill -INT -- "-$serve_pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$serve_pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$serve_pid" 2>/dev/null || true
    echo "serve log: $work/serve.log" >&2
}
trap stop EXIT
export SERVE_PID=$serve_pid

"$PY" - <<'EOF'
"""Wait for both models, then REQUESTS chat requests per model, CONCURRENCY at a time."""

import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

pair = os.environ["PAIR"]
base = f"http://127.0.0.1:{os.environ['AUTOVIBE_MODEL_PORT']}/v1"
requests, concurrency = int(os.environ["REQUESTS"]), int(os.environ["CONCURRENCY"])
max_tokens = int(os.environ["MAX_TOKENS"])
models = [pair, f"{pair}:thinking"]

deadline = time.monotonic() + float(os.environ["READY_TIMEOUT_S"])
while True:
    try:
        os.kill(int(os.environ["SERVE_PID"]), 0)
    except ProcessLookupError:
        raise SystemExit("serve run exited before the models were ready") from None
    try:
        listed = {m["id"] for m in httpx.get(f"{base}/models", timeout=5).json()["data"]}
        if set(models) <= listed:
            break
    except (httpx.HTTPError, ValueError, KeyError):
        pass
    if time.monotonic() > deadline:
        raise SystemExit(f"models {models} not ready after {os.environ['READY_TIMEOUT_S']} s")
    time.sleep(5)

prompt = "Write a Python function that returns the n-th Fibonacci number, with a docstring."


def one(client: httpx.Client, model: str) -> tuple[float, int, bool]:
    start = time.perf_counter()
    r = client.post(
        f"{base}/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.6,
        },
        timeout=600,
    )
    r.raise_for_status()
    body = r.json()
    message = body["choices"][0]["message"]
    separated = bool(message.get("reasoning_content") or message.get("reasoning"))
    return time.perf_counter() - start, body["usage"]["completion_tokens"], separated


rows = []
with httpx.Client() as client:
    for model in models:
        one(client, model)  # warm-up, not measured
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, [client] * requests, [model] * requests))
        wall = time.perf_counter() - start
        tokens = sum(t for _, t, _ in results)
        rows.append(
            {
                "system": "rayserve-vllm",
                "pair": pair,
                "model": model,
                "concurrency": concurrency,
                "requests": requests,
                "max_tokens": max_tokens,
                "completion_tokens": tokens,
                "wall_s": round(wall, 3),
                "tokens_per_s": round(tokens / wall, 1),
                "latency_p50_ms": round(statistics.median(s for s, _, _ in results) * 1000, 1),
                "reasoning_separated": sum(sep for _, _, sep in results) / len(results),
            }
        )
        print(json.dumps(rows[-1]))

out = Path(os.environ["RESULTS"])
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(rows, indent=2) + "\n")
print(f"wrote {out}")
EOF
