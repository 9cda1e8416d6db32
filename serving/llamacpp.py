"""The CPU model server (`serving.app`: llama-cpp-python's OpenAI-compatible server plus the
Anthropic Messages API), one config entry per served name; names of one file with the same
settings share one loaded model (`serving.app.SharedLoads`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from contracts.config import ModelsCatalog
from contracts.dataroot import DataRoot
from contracts.settings import Settings
from serving.weights import ensure_weights

REASONING_KEY = "reasoning_models"
"""Our key in llama_cpp.server's config file: served names whose reasoning `serving.app` splits
from the answer (llama_cpp.server itself would refuse the key)."""


def server_config(settings: Settings, catalog: ModelsCatalog) -> dict[str, object]:
    """The server's config file: llama_cpp.server's, for every CPU pair's normal and thinking
    model, plus `reasoning_models` (the thinking models' served names)."""
    root = DataRoot.at(settings.data)
    models = []
    reasoning = []
    for pair in catalog.pairs.values():
        if pair.device != "cpu":
            continue
        for spec in (pair.normal, pair.thinking):
            models.append(
                {
                    "model": str(ensure_weights(root, spec)),
                    "model_alias": spec.served_name,
                    "n_ctx": spec.context,
                    "n_threads": max(1, (os.cpu_count() or 2)),
                    "verbose": False,
                }
            )
        reasoning.append(pair.thinking.served_name)
    return {
        "host": settings.host,
        "port": settings.model_port,
        # llama-cpp-python's default cuts a running stream short when another request arrives.
        "interrupt_requests": False,
        "models": models,
        REASONING_KEY: reasoning,
    }


def server_argv(settings: Settings, catalog: ModelsCatalog) -> list[str]:
    """Command that runs the server; its config file is written under the data root."""
    root = DataRoot.at(settings.data)
    path: Path = DataRoot.ensure(root.configs) / "llamacpp-server.json"
    path.write_text(json.dumps(server_config(settings, catalog), indent=2))
    return [sys.executable, "-m", "serving.app", "--config_file", str(path)]
