"""The GPU profile's Ray Serve config, validated by the installed Ray's own models.

`ray[serve]` (a default dependency) brings Serve's deploy schema and its deployment and
autoscaling configs; `LLMConfig` is defined in `ray.llm._internal.serve.core.configs.llm_config`,
which imports with `ray[serve]` alone, while its public name `ray.serve.llm.LLMConfig` (and the
builder's `LLMServingArgs`) import only with vLLM, the `gpu` extra. So the default suite checks
every rendered model with Ray's `LLMConfig`; the builder's arguments and the engine arguments
(vLLM's `EngineArgs`) are checked when the `gpu` extra is installed and skipped, saying so,
when it is not.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from contracts.config import ModelsCatalog
from contracts.dataroot import DataRoot
from serving import rayserve
from serving.cli import app

GPU_EXTRA = "needs the `gpu` extra (`uv sync --extra gpu`: ray[llm] with vLLM)"


def ray_llm_config() -> Any:
    """Ray's `LLMConfig`: the public name with the `gpu` extra, else where Ray defines it."""
    try:
        from ray.serve.llm import LLMConfig
    except ImportError:  # ray.serve.llm imports vLLM; the model itself does not need it
        try:
            from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
        except ImportError as exc:
            pytest.skip(f"Ray's LLMConfig does not import ({exc}); {GPU_EXTRA}")
    return LLMConfig


def assert_valid_serve_config(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The config as `serve run` reads it (Serve's schema) and every model as
    `build_openai_app` reads it (Ray's `LLMConfig`); returns the LLM configs."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, ServeDeploySchema

    # Serve's schemas accept unknown keys; a typo would be silently dropped, so check names too.
    assert set(doc) <= set(ServeDeploySchema.model_fields)
    assert set(doc["http_options"]) <= set(HTTPOptionsSchema.model_fields)
    deploy = ServeDeploySchema.model_validate(doc)
    models, messages = deploy.applications
    assert (models.import_path, models.route_prefix) == (rayserve.IMPORT_PATH, "/")
    # The Messages front, at its own prefix, asks the OpenAI app through Serve's port.
    assert messages.import_path == rayserve.MESSAGES_IMPORT_PATH
    assert messages.route_prefix == "/v1/messages"
    assert messages.args == {"upstream": f"http://127.0.0.1:{doc['http_options']['port']}"}
    module, _, builder = messages.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), builder))
    args = doc["applications"][0]["args"]
    assert set(args) == {"llm_configs"}
    configs: list[dict[str, Any]] = args["llm_configs"]
    ids = [c["model_loading_config"]["model_id"] for c in configs]
    assert len(ids) == len(set(ids)), "LLMServingArgs refuses duplicate model ids"
    llm_config = ray_llm_config()
    for c in configs:
        llm_config.model_validate(c)  # unknown fields, accelerator types, replicas: Ray's checks
        options = c["deployment_config"]
        assert set(options) <= set(DeploymentSchema.model_fields), options
        AutoscalingConfig.model_validate(options["autoscaling_config"])
        assert set(c["runtime_env"]) == {"env_vars"}
        assert all(isinstance(v, str) for v in c["runtime_env"]["env_vars"].values())
    return configs


def test_ray_refuses_what_we_must_not_render(catalog: ModelsCatalog, tmp_path: Path) -> None:
    """The check above has teeth: Ray's models refuse a bad field, type or replica count."""
    llm_config = ray_llm_config()
    good = rayserve.gpu_app(DataRoot.at(tmp_path), catalog)["applications"][0]["args"]
    first = good["llm_configs"][0]
    bad_configs = [
        {**first, "engine_args": {}},
        {**first, "accelerator_type": "H1000"},
        {**first, "model_loading_config": {**first["model_loading_config"], "path": "/x"}},
        {
            **first,
            "deployment_config": {"autoscaling_config": {"min_replicas": 2, "max_replicas": 1}},
        },
    ]
    for bad in bad_configs:
        with pytest.raises(ValueError):
            llm_config.model_validate(bad)


def test_builder_arguments_and_engine_kwargs_with_the_gpu_extra(
    catalog: ModelsCatalog, tmp_path: Path
) -> None:
    """`build_openai_app`'s own argument model and vLLM's `EngineArgs` (the `gpu` extra)."""
    try:
        from ray.llm._internal.serve.core.ingress.builder import LLMServingArgs
        from vllm.engine.arg_utils import EngineArgs
    except ImportError as exc:
        pytest.skip(f"{GPU_EXTRA}: {exc}")
    doc = rayserve.gpu_app(DataRoot.at(tmp_path), catalog)
    args = doc["applications"][0]["args"]
    LLMServingArgs.model_validate(args)
    engine_fields = {f.name for f in dataclasses.fields(EngineArgs)}
    for c in args["llm_configs"]:
        assert set(c["engine_kwargs"]) <= engine_fields, set(c["engine_kwargs"]) - engine_fields


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
