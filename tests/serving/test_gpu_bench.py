"""bench.gpu without a GPU: the bare `vllm serve` command it derives from the rendered Ray Serve
config, and its measuring loop against a real OpenAI-compatible server (the tiny CPU model)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from bench import gpu
from bench.gpu import measure, running, vllm_serve_argv, wait_ready
from common.processes import group_members
from contracts.config import ModelsCatalog
from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from serving.llamacpp import server_argv
from serving.rayserve import gpu_app

REPO = Path(__file__).resolve().parents[2]


def test_bare_vllm_gets_the_rendered_engine_arguments(catalog: ModelsCatalog) -> None:
    root = DataRoot.at("/data")
    app = gpu_app(root, catalog, pairs=["3b"])
    normal, thinking = app["applications"][0]["args"]["llm_configs"]
    pair = catalog.pairs["3b"]
    assert vllm_serve_argv("vllm", thinking, "127.0.0.1", 8123) == [
        "vllm",
        "serve",
        f"/data/model-weights/{pair.thinking.weights}",
        "--served-model-name",
        "3b:thinking",
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
        "--tensor-parallel-size",
        str(pair.thinking.tensor_parallel),
        "--max-model-len",
        str(pair.thinking.context),
        "--gpu-memory-utilization",
        str(pair.gpu_memory_utilization),
        "--reasoning-parser",
        "deepseek_r1",
    ]
    assert "--reasoning-parser" not in vllm_serve_argv("vllm", normal, "127.0.0.1", 8123)
    flags = vllm_serve_argv("vllm", {**normal, "engine_kwargs": {"enforce_eager": True}}, "h", 1)
    assert flags[-1] == "--enforce-eager"
    with pytest.raises(ValueError, match=r"engine_kwargs\.x: \{"):
        vllm_serve_argv("vllm", {**normal, "engine_kwargs": {"x": {"a": 1}}}, "h", 1)


@pytest.mark.model
def test_measuring_streams_counts_tokens_and_first_token(
    tiny_root: DataRoot, catalog: ModelsCatalog, tmp_path: Path
) -> None:
    settings = Settings(data=tiny_root.root, configs=REPO / "configs", model_port=free_port())
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    log = tmp_path / "server.log"
    with running(server_argv(settings, catalog), log, env) as process:
        wait_ready(settings.model_url, ["tiny"], process, log, timeout_s=120)
        start = time.monotonic()
        # A base model, which ends most chat turns at once; greedily, this prompt's answer
        # starts with "\n" and then stops or runs on to max_tokens (which, depends on what
        # the server's prompt cache holds).
        prompt = [{"role": "user", "content": "The capital of France is"}]
        row = asyncio.run(
            measure(settings.model_url, "tiny", 3, 2, 8, messages=prompt, temperature=0)
        )
        wall = time.monotonic() - start
    assert process.returncode is not None  # stopped on leaving
    assert row["requests"] == 3 and row["concurrency"] == 2 and row["model"] == "tiny"
    assert 3 <= row["completion_tokens"] <= 3 * 8  # no usage from llama.cpp: a token per delta
    assert 0 < row["ttft_p50_ms"] <= row["latency_p50_ms"] < wall * 1000
    assert row["tokens_per_s"] > 0


def test_a_server_that_exits_is_named_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    with (
        running(["false"], log, dict(os.environ)) as process,
        pytest.raises(SystemExit, match=r"exited \(1\); see .*x\.log"),
    ):
        wait_ready("http://127.0.0.1:9/v1", ["m"], process, log, timeout_s=30)


def test_leaving_stops_the_whole_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server's children (a local Ray's raylet and workers) hold the GPU: all must be gone
    before the next server starts, even one that ignores SIGINT (killed after the wait)."""
    monkeypatch.setattr(gpu, "STOP_TIMEOUT_S", 1.0)
    argv = ["sh", "-c", "sleep 60 & sleep 60"]  # the background sleep ignores SIGINT
    with running(argv, tmp_path / "x.log", dict(os.environ)) as process:
        time.sleep(0.3)
    assert group_members(process.pid) == []
