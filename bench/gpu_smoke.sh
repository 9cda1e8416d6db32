#!/usr/bin/env bash
# GPU smoke benchmark: serve one model pair with Ray Serve + vLLM from the config that
# `autovibe models render --profile gpu` writes, then the same models under bare `vllm serve`,
# and measure both with streamed chat completions (`python -m bench.gpu`; figures go to
# docs/benchmarks.md, section `gpu`, and bench/results/gpu.json).
#
# Needs a GPU machine, the `gpu` extra (`uv sync --extra gpu`: ray[llm,serve] with vLLM) and
# the pair's weights under $AUTOVIBE_DATA/model-weights/ (`autovibe models check --pair PAIR`
# says what is missing). Nothing is downloaded: the servers run with HF_HUB_OFFLINE=1.
# Not run in CI (no GPU there); run it whenever a GPU machine is available.
#
# usage: bench/gpu_smoke.sh [PAIR]          (default 3b, the smallest GPU pair)
# env:   REQUESTS=64 CONCURRENCY=8 MAX_TOKENS=256 ACCELERATOR=<Ray type, e.g. H100>
#        READY_TIMEOUT_S=1800 PYTHON=.venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."

PAIR=${1:-3b}
PY=${PYTHON:-.venv/bin/python}
for tool in serve vllm; do
    if [[ ! -x "$(dirname "$PY")/$tool" ]]; then
        echo "error: $(dirname "$PY")/$tool not found: install the gpu extra (uv sync --extra gpu)" >&2
        exit 2
    fi
done
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: no NVIDIA GPU visible (nvidia-smi -L failed)" >&2
    exit 2
fi

"$PY" -m serving.cli check --pair "$PAIR"
exec "$PY" -m bench.gpu --pair "$PAIR" \
    --requests "${REQUESTS:-64}" --concurrency "${CONCURRENCY:-8}" \
    --max-tokens "${MAX_TOKENS:-256}" --ready-timeout "${READY_TIMEOUT_S:-1800}" \
    ${ACCELERATOR:+--accelerator "$ACCELERATOR"}
