"""`autovibe up` proves the model plane before it says ready, and leaves nothing behind when
it cannot: a model file that does not load, or a server that fails its first completion."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from common.processes import cmdline, pids
from contracts.dataroot import DataRoot
from contracts.settings import PROJECT_ROOT, Settings, free_port
from orchestrator import stack
from orchestrator.cli import app

TINY = "gemma3-270m/gemma3-270m-q4_k_m.gguf"


def settings_at(data: Path, configs: Path = PROJECT_ROOT / "configs") -> Settings:
    return Settings(
        data=data,
        configs=configs,
        model_port=free_port(),
        proxy_port=free_port(),
        api_port=free_port(),
    )


def left_running(data: Path) -> list[str]:
    """Command lines of processes that still name this data root."""
    return [line for pid in pids() if str(data) in (line := cmdline(pid))]


@pytest.mark.model
def test_up_with_a_model_file_that_does_not_load_fails_names_the_log_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    weights = DataRoot.at(data).model_weights / TINY
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"GGUF" + b"\0" * 4096)  # the magic, then nothing a loader can read
    settings = settings_at(data)
    for key, value in settings.as_env().items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["up"], env={"COLUMNS": "250"})
    assert result.exit_code == 1, result.output
    log = DataRoot.at(data).run / "model.log"
    text = " ".join(result.output.split())
    assert "model did not start" in text and str(log) in text, result.output
    assert "last lines" in text and "|" in result.output, "the log's tail is shown"
    assert stack.status(settings) == {name: None for name in stack.services_names()}
    assert not list(DataRoot.at(data).run.glob("*.pid"))
    assert left_running(data) == []


@pytest.mark.model
def test_up_fails_when_a_served_model_cannot_complete_one_token(tmp_path: Path) -> None:
    """The server loads and answers /v1/models, but every completion is an error (a context
    too small for the probe's prompt): not ready, and stopped again."""
    configs = tmp_path / "configs"
    shutil.copytree(PROJECT_ROOT / "configs", configs)
    models = yaml.safe_load((configs / "models.yaml").read_text())
    models["pairs"]["tiny"]["thinking"]["context"] = 2
    (configs / "models.yaml").write_text(yaml.safe_dump(models))
    data = tmp_path / "data"
    settings = settings_at(data, configs)
    with pytest.raises(stack.StackError) as failed:
        stack.up(settings, ["model"])
    message = str(failed.value)
    assert "model failed its first use" in message
    assert "model tiny:thinking" in message and "one-token completion" in message
    assert str(DataRoot.at(data).run / "model.log") in message
    assert stack.status(settings)["model"] is None
    assert left_running(data) == []
