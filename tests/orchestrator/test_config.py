"""A bad trial file names the file, the line, the field and the allowed values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import TypeAdapter

from contracts.config import ConfigError, TrialConfig, load_trial, read_yaml
from contracts.settings import Settings
from orchestrator.catalog import Catalog

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = Catalog.load(Settings(configs=ROOT / "configs")).validation_context()


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_demo_trial_is_valid() -> None:
    config = load_trial(ROOT / "configs/trials/demo.yaml", CONTEXT)
    assert config.agents == ["builtin"]
    assert config.model_pairs == ["tiny"]
    assert all(Path(t.repo).is_dir() for t in config.tasks)


def test_schema_file_is_current() -> None:
    committed = (ROOT / "configs/trial.schema.json").read_text()
    assert json.loads(committed) == TypeAdapter(TrialConfig).json_schema()


@pytest.mark.parametrize(
    ("mutate", "field", "needle", "expected"),
    [
        (
            lambda d: d.update(agents=["builtin", "aidr"]),
            "agents.1",
            "aidr",
            "unknown agent 'aidr'; allowed: aider, builtin, claude-code",
        ),
        (
            lambda d: d.update(model_pairs=["qwen-99b"]),
            "model_pairs.0",
            "qwen-99b",
            "unknown model pair 'qwen-99b'; allowed: 14b, 14b:thinking, 32b, 32b:thinking, "
            "3b, 3b:thinking, "
            "7b, 7b:thinking, 9b, 9b:thinking, tiny, tiny:thinking",
        ),
        (
            lambda d: d["budget"].update(amount=-5),
            "budget.amount",
            "amount: -5",
            "greater than or equal to 0",
        ),
        (lambda d: d.update(driver="kubernetes"), "driver", "kubernetes", "'local'"),
        (
            lambda d: d["budget"].update(currency="XYZ"),
            "budget.currency",
            "XYZ",
            "unknown currency 'XYZ'; allowed: CAD, EUR, USD",
        ),
        (
            lambda d: d["tasks"][0].pop("fail_to_pass"),
            "tasks.0.fail_to_pass",
            "- id:",
            "Field required",
        ),
        (
            lambda d: d["tasks"][0].update(fail_to_pass=[]),
            "tasks.0.fail_to_pass",
            "fail_to_pass: []",
            "at least 1 item",
        ),
        (lambda d: d["tasks"][0].update(colour="red"), "tasks.0.colour", "colour", "unknown field"),
    ],
)
def test_bad_trial_file_names_file_line_field_and_allowed(
    tmp_path: Path,
    demo_trial: dict[str, Any],
    mutate: Any,
    field: str,
    needle: str,
    expected: str,
) -> None:
    mutate(demo_trial)
    path = write(tmp_path, demo_trial)
    with pytest.raises(ConfigError) as info:
        load_trial(path, CONTEXT)
    message = str(info.value)
    assert f"{path}: line {line_of(path, needle)}: {field}: " in message, message
    assert expected in message


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nproject: [unclosed\nbudget: 1\n")
    with pytest.raises(ConfigError) as info:
        load_trial(path, CONTEXT)
    assert str(info.value).startswith(f"{path}: line ")
    assert "not valid YAML" in str(info.value)


def test_yaml_a_file_cannot_build_is_a_config_error(tmp_path: Path) -> None:
    """Read once for the line numbers and the data: a key YAML cannot build (a list) is
    refused as safe_load refuses it, and a merge key's fields point at their own lines."""
    path = tmp_path / "unhashable.yaml"
    path.write_text("name: x\n? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML: found unhashable key"):
        load_trial(path, CONTEXT)
    path = tmp_path / "merged.yaml"
    path.write_text("base: &b\n  x: 1\nname:\n  <<: *b\n  y: 2\n")
    data, lines = read_yaml(path)
    assert data == {"base": {"x": 1}, "name": {"x": 1, "y": 2}}
    assert lines[("name", "<<")] == 4
    assert lines[("name", "y")] == 5


def test_cli_reports_bad_file_with_exit_2(tmp_path: Path, demo_trial: dict[str, Any]) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    demo_trial["agents"] = ["nope"]
    path = write(tmp_path, demo_trial)
    result = CliRunner().invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 2
    # Rich wraps the message at the console's width: compare with whitespace collapsed.
    assert "unknown agent 'nope'; allowed: aider, builtin, claude-code" in " ".join(
        result.output.split()
    )
