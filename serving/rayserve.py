"""The GPU profile: a Ray Serve config that serves every GPU pair with `ray.serve.llm` (vLLM).

The rendered YAML is what `serve run` / `serve deploy` take: one application whose builder is
`ray.serve.llm:build_openai_app`, with one `LLMConfig` per model (a pair is two models, each
its own deployment with its own replicas and GPUs). Ray's OpenAI ingress balances requests
across a model's replicas. Beside it, at the route prefix `/v1/messages`, the Anthropic
Messages front (`serving.messages_front`), which asks the OpenAI app through the same address:
claude-code runs on GPU pairs as on the CPU server. Nothing here imports Ray: it is the `gpu`
extra, absent from the default install and CI; tests check the config with Ray's own models.

Weights are loaded from the data root (`model_source` is a local path, which must be the same
on every node: the production data root is shared), and the Hugging Face libraries run offline
so a missing file is an error, never a download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from contracts.config import ModelPair, ModelsCatalog, ModelSpec
from contracts.dataroot import DataRoot

IMPORT_PATH = "ray.serve.llm:build_openai_app"
APP_NAME = "autovibe-models"
MESSAGES_IMPORT_PATH = "serving.messages_front:build"
MESSAGES_APP_NAME = "autovibe-messages"
MESSAGES_PREFIX = "/v1/messages"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
"""Set in every replica: vLLM and transformers then never reach a hub."""


class RenderError(ValueError):
    """The catalogue cannot be rendered as asked (no GPU pair, unknown or CPU pair named)."""


def llm_config(
    root: DataRoot, pair: ModelPair, spec: ModelSpec, accelerator_type: str | None = None
) -> dict[str, Any]:
    """One `ray.serve.llm.LLMConfig`, as the dict `build_openai_app` validates."""
    engine: dict[str, Any] = {
        "tensor_parallel_size": spec.tensor_parallel,
        "max_model_len": spec.context,
        "gpu_memory_utilization": pair.gpu_memory_utilization,
    }
    if spec.reasoning_parser:
        engine["reasoning_parser"] = spec.reasoning_parser
    config: dict[str, Any] = {
        "model_loading_config": {
            "model_id": spec.served_name,
            "model_source": str(root.model_weights / spec.weights),
        },
        "engine_kwargs": engine,
        "deployment_config": {
            "autoscaling_config": {
                "min_replicas": pair.min_replicas,
                "max_replicas": pair.max_replicas,
            }
        },
        "runtime_env": {"env_vars": dict(OFFLINE_ENV)},
    }
    accelerator = accelerator_type or pair.accelerator_type
    if accelerator:
        config["accelerator_type"] = accelerator
    return config


def gpu_app(
    root: DataRoot,
    catalog: ModelsCatalog,
    *,
    pairs: list[str] | None = None,
    host: str = "0.0.0.0",
    port: int = 8000,
    accelerator_type: str | None = None,
) -> dict[str, Any]:
    """The Serve config (`applications: [...]`) for the GPU pairs, or only those in `pairs`."""
    names = pairs or [n for n, p in catalog.pairs.items() if p.device == "gpu"]
    for name in names:
        if name not in catalog.pairs:
            known = ", ".join(sorted(catalog.pairs))
            raise RenderError(f"unknown pair {name!r}; known: {known}")
        if catalog.pairs[name].device != "gpu":
            raise RenderError(f"pair {name!r} is a CPU pair; the GPU profile serves GPU pairs")
    if not names:
        raise RenderError("configs/models.yaml has no GPU pair")
    configs = [
        llm_config(root, catalog.pairs[name], spec, accelerator_type)
        for name in names
        for spec in (catalog.pairs[name].normal, catalog.pairs[name].thinking)
    ]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": {"llm_configs": configs},
            },
            {
                # Serve's proxy on the front replica's own node (proxy_location EveryNode).
                "name": MESSAGES_APP_NAME,
                "route_prefix": MESSAGES_PREFIX,
                "import_path": MESSAGES_IMPORT_PATH,
                "args": {"upstream": f"http://127.0.0.1:{port}"},
            },
        ],
    }


def write(config: dict[str, Any], dest: Path) -> Path:
    """Write the config as YAML; `dest` may be a folder (then `serve-gpu.yaml` inside it)."""
    path = dest / "serve-gpu.yaml" if dest.is_dir() else dest
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Rendered by `autovibe models render --profile gpu`; `serve run` or deploy it.\n"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path
