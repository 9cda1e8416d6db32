"""The CPU model server: llama-cpp-python's OpenAI-compatible server, one model per served name."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from contracts.config import ModelsCatalog
from contracts.dataroot import DataRoot
from contracts.settings import Settings
from serving.weights import ensure_weights


def server_config(settings: Settings, catalog: ModelsCatalog) -> dict[str, object]:
    """llama_cpp.server's config file: every CPU pair's normal and thinking model."""
    root = DataRoot.at(settings.data)
    models = []
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
    return {"host": settings.host, "port": settings.model_port, "models": models}


def server_argv(settings: Settings, catalog: ModelsCatalog) -> list[str]:
    """Command that runs the server; its config file is written under the data root."""
    root = DataRoot.at(settings.data)
    path: Path = DataRoot.ensure(root.configs) / "llamacpp-server.json"
    path.write_text(json.dumps(server_config(settings, catalog), indent=2))
    return [sys.executable, "-m", "llama_cpp.server", "--config_file", str(path)]
