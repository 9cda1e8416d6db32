"""The GPU profile's Ray Serve config, validated on CPU without Ray installed.

Every field we emit must be one Ray accepts. The allowed sets below are copied by hand from
Ray's own models, read in the ray-project/ray repository (master, via the source index):

- `LLMConfig`, `ModelLoadingConfig`: python/ray/llm/_internal/serve/core/configs/llm_config.py
  at commit 1190ecb4582207dd4bdbb9e6bfd5b950c06729c0 (re-exported by python/ray/serve/llm/
  __init__.py at 01624ad4bacdc5cf9a284a2cb376a4aff0682ccd, whose docstring shows the YAML form
  `applications: - import_path: ray.serve.llm:build_openai_app, args: {llm_configs: [...]}`).
- `LLMServingArgs` (the builder's `args`): python/ray/llm/_internal/serve/core/ingress/builder.py
  at 035b7933dc61a5647650de8883807fd6e08d718c; it also refuses duplicate model ids.
- `deployment_config` keys: the list in `LLMConfig.deployment_config`'s description (it is
  validated against `ray.serve._private.config.DeploymentConfig`).
- `AutoscalingConfig`: python/ray/serve/config.py at 00239d48f5be5e7020b58820e62271c8a4e9e21e
  (min_replicas ≥ 0, max_replicas ≥ 1 and ≥ min_replicas).
- Accelerator types: python/ray/util/accelerators/accelerators.py at
  00501e2bd10f17c70dc12cdf54a203cf2db02a09 (`LLMConfig.validate_accelerator_type`).
- `ServeDeploySchema` / `ServeApplicationSchema`: python/ray/serve/schema.py (the newest
  version in the source index; it has `target_capacity` and `external_scaler_enabled`).
- `engine_kwargs` is a free dict handed to vLLM's `EngineArgs`; the keys we use are fields of
  vllm/engine/arg_utils.py `EngineArgs` (`reasoning_parser` since vLLM moved it there from the
  OpenAI frontend's arguments).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from contracts.config import ModelsCatalog
from contracts.dataroot import DataRoot
from serving import rayserve
from serving.cli import app

# ray/llm/_internal/serve/core/configs/llm_config.py: class LLMConfig(BaseModelExtended)
LLM_CONFIG_FIELDS = {
    "runtime_env",
    "model_loading_config",
    "llm_engine",
    "engine_kwargs",
    "accelerator_type",
    "placement_group_config",
    "lora_config",
    "deployment_config",
    "experimental_configs",
    "log_engine_metrics",
    "callback_config",
}
# same file: class ModelLoadingConfig
MODEL_LOADING_FIELDS = {"model_id", "model_source", "tokenizer_source"}
# same file: LLMConfig.deployment_config's description ("Supported fields are: …")
DEPLOYMENT_CONFIG_FIELDS = {
    "name",
    "num_replicas",
    "ray_actor_options",
    "max_ongoing_requests",
    "autoscaling_config",
    "max_queued_requests",
    "user_config",
    "health_check_period_s",
    "health_check_timeout_s",
    "graceful_shutdown_wait_loop_s",
    "graceful_shutdown_timeout_s",
    "logging_config",
    "request_router_config",
}
# ray/serve/config.py: class AutoscalingConfig
AUTOSCALING_FIELDS = {
    "min_replicas",
    "initial_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "metrics_interval_s",
    "look_back_period_s",
    "smoothing_factor",
    "upscale_smoothing_factor",
    "downscale_smoothing_factor",
    "upscaling_factor",
    "downscaling_factor",
    "downscale_delay_s",
    "downscale_to_zero_delay_s",
    "upscale_delay_s",
    "prometheus_metrics",
    "policy",
}
# ray/util/accelerators/accelerators.py (the NVIDIA ones)
NVIDIA_ACCELERATORS = {
    "V100", "P100", "T4", "P4", "K80", "A10G", "L4", "L40S", "A100", "H100", "H200", "H20",
    "B200", "A100-40G", "A100-80G",
}  # fmt: skip
# ray/llm/_internal/serve/core/ingress/builder.py: class LLMServingArgs
SERVING_ARGS_FIELDS = {"llm_configs", "ingress_cls_config", "ingress_deployment_config", "api_key"}
# ray/serve/schema.py: class ServeApplicationSchema
APPLICATION_FIELDS = {
    "name",
    "route_prefix",
    "import_path",
    "runtime_env",
    "host",
    "port",
    "deployments",
    "autoscaling_policy",
    "args",
    "logging_config",
    "external_scaler_enabled",
}
# ray/serve/schema.py: class ServeDeploySchema (+ HTTPOptionsSchema)
DEPLOY_FIELDS = {
    "proxy_location",
    "http_options",
    "grpc_options",
    "logging_config",
    "applications",
    "target_capacity",
}
HTTP_OPTIONS_FIELDS = {"host", "port", "root_path", "request_timeout_s", "keep_alive_timeout_s"}
PROXY_LOCATIONS = {"Disabled", "HeadOnly", "EveryNode"}
# vllm/engine/arg_utils.py: EngineArgs fields we rely on
VLLM_ENGINE_ARGS_USED = {
    "tensor_parallel_size",
    "max_model_len",
    "gpu_memory_utilization",
    "reasoning_parser",
}


def assert_valid_serve_config(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Structure and field names as Ray validates them; returns the LLM configs."""
    assert set(doc) <= DEPLOY_FIELDS, set(doc) - DEPLOY_FIELDS
    assert doc["proxy_location"] in PROXY_LOCATIONS
    assert set(doc["http_options"]) <= HTTP_OPTIONS_FIELDS
    [application] = doc["applications"]
    assert set(application) <= APPLICATION_FIELDS, set(application) - APPLICATION_FIELDS
    # ServeDeploySchema.nested_host_and_port: in a multi-app config host/port are top-level only.
    assert not {"host", "port"} & set(application)
    module, _, attr = application["import_path"].partition(":")
    assert (module, attr) == ("ray.serve.llm", "build_openai_app")
    assert application["route_prefix"] == "/"
    assert set(application["args"]) <= SERVING_ARGS_FIELDS
    configs: list[dict[str, Any]] = application["args"]["llm_configs"]
    ids = [c["model_loading_config"]["model_id"] for c in configs]
    assert len(ids) == len(set(ids)), "LLMServingArgs refuses duplicate model ids"
    for c in configs:
        assert set(c) <= LLM_CONFIG_FIELDS, set(c) - LLM_CONFIG_FIELDS
        assert set(c["model_loading_config"]) <= MODEL_LOADING_FIELDS
        assert set(c["deployment_config"]) <= DEPLOYMENT_CONFIG_FIELDS
        scaling = c["deployment_config"]["autoscaling_config"]
        assert set(scaling) <= AUTOSCALING_FIELDS
        assert 0 <= scaling["min_replicas"] <= scaling["max_replicas"]
        assert scaling["max_replicas"] >= 1
        assert set(c["engine_kwargs"]) <= VLLM_ENGINE_ARGS_USED
        assert c.get("accelerator_type") in NVIDIA_ACCELERATORS | {None}
        assert set(c["runtime_env"]) == {"env_vars"}
        assert all(isinstance(v, str) for v in c["runtime_env"]["env_vars"].values())
    return configs


def test_every_gpu_pair_rendered_with_ray_fields(catalog: ModelsCatalog, tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    configs = assert_valid_serve_config(rayserve.gpu_app(root, catalog))
    by_id = {c["model_loading_config"]["model_id"]: c for c in configs}
    gpu_pairs = [n for n, p in catalog.pairs.items() if p.device == "gpu"]
    assert set(by_id) == {name for p in gpu_pairs for name in (p, f"{p}:thinking")}
    assert "tiny" not in by_id
    for name, c in by_id.items():
        thinking = name.endswith(":thinking")
        assert c["engine_kwargs"].get("reasoning_parser") == ("deepseek_r1" if thinking else None)
        source = Path(c["model_loading_config"]["model_source"])
        assert source.is_relative_to(root.model_weights), "weights come from the data root"
        assert c["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"
    big = by_id["32b"]["engine_kwargs"]
    assert big == {"tensor_parallel_size": 2, "max_model_len": 32768, "gpu_memory_utilization": 0.9}
    assert by_id["32b:thinking"]["model_loading_config"]["model_source"] == str(
        root.model_weights / "deepseek-r1-distill/DeepSeek-R1-Distill-Qwen-32B"
    )


def test_one_pair_with_accelerator_override(catalog: ModelsCatalog, tmp_path: Path) -> None:
    doc = rayserve.gpu_app(DataRoot.at(tmp_path), catalog, pairs=["3b"], accelerator_type="L4")
    configs = assert_valid_serve_config(doc)
    assert [c["model_loading_config"]["model_id"] for c in configs] == ["3b", "3b:thinking"]
    assert {c["accelerator_type"] for c in configs} == {"L4"}


@pytest.mark.parametrize(("pair", "message"), [("tiny", "CPU pair"), ("70b", "unknown pair")])
def test_refuses_cpu_and_unknown_pairs(catalog: ModelsCatalog, pair: str, message: str) -> None:
    with pytest.raises(rayserve.RenderError, match=message):
        rayserve.gpu_app(DataRoot.at("/nonexistent"), catalog, pairs=[pair])


def test_cli_render_gpu_writes_serve_yaml(tmp_path: Path) -> None:
    env = {"AUTOVIBE_DATA": str(tmp_path / "data"), "AUTOVIBE_MODEL_PORT": "8600"}
    result = CliRunner().invoke(
        app, ["render", "--profile", "gpu", "--pair", "7b", str(tmp_path)], env=env
    )
    assert result.exit_code == 0, result.output
    text = (tmp_path / "serve-gpu.yaml").read_text()
    doc = yaml.safe_load(text)
    assert_valid_serve_config(doc)
    assert doc["http_options"]["port"] == 8600
    assert "7b:thinking" in text


def test_cli_render_rejects_unknown_profile(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["render", "--profile", "tpu", str(tmp_path)])
    assert result.exit_code == 2
    assert "allowed: gpu, cpu" in result.output
