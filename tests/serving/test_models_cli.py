"""`models check` / `models render --profile cpu` through typer's CliRunner, on real files."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from contracts.dataroot import DataRoot
from serving.cli import app


def run(args: list[str], data: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, args, env={"AUTOVIBE_DATA": str(data)})
    return result.exit_code, result.output


def test_check_all_pairs_as_json(tiny_root: DataRoot) -> None:
    code, out = run(["check", "--json"], tiny_root.root)
    assert code == 0, out  # no --pair: a report, not a gate
    reports = {r["pair"]: r for r in json.loads(out)}
    assert set(reports) == {"32b", "14b", "9b", "7b", "3b", "tiny"}
    assert reports["tiny"]["ready"] is True
    assert [m["state"] for m in reports["tiny"]["models"]] == ["complete", "complete"]
    assert reports["7b"]["ready"] is False
    assert reports["32b"]["gpus"] == 4
    assert reports["32b"]["formula"][0].startswith("KV = 2 (K,V) x layers")


def test_check_pair_ready_exits_zero(tiny_root: DataRoot) -> None:
    code, out = run(["check", "--pair", "tiny"], tiny_root.root)
    assert code == 0, out
    assert "complete" in out
    assert "KV = 2 (K,V) x layers x kv_heads x head_dim x 2 B x context" in out


def test_check_incomplete_pair_fails_with_what_is_missing(tmp_path: Path) -> None:
    code, out = run(["check", "--pair", "7b"], tmp_path)
    assert code == 1
    assert "weights not ready" in out
    assert "7b is missing" in out
    assert "Qwen/Qwen2.5-Coder-7B-Instruct" in out
    assert "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B" in out


def test_check_unknown_pair_exits_2(tmp_path: Path) -> None:
    code, out = run(["check", "--pair", "70b"], tmp_path)
    assert code == 2
    assert "unknown pair 70b; known: 14b, 32b, 3b, 7b, 9b, tiny" in out


def test_render_cpu_writes_llamacpp_config(tiny_root: DataRoot, tmp_path: Path) -> None:
    code, out = run(["render", "--profile", "cpu", str(tmp_path)], tiny_root.root)
    assert code == 0, out
    config = json.loads((tmp_path / "llamacpp-server.json").read_text())
    assert [m["model_alias"] for m in config["models"]] == ["tiny", "tiny:thinking"]
