"""`autovibe --help` and a command that only talks to the API over HTTP import none of the heavy
modules (the state DB, the API framework, the ledger, the intake channels, the Nomad client):
each command imports what it uses, so the CLI starts in a fraction of the time of all of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from trial_runs import served_api

from contracts.settings import PROJECT_ROOT, Settings, free_port

HEAVY = (
    "sqlalchemy",
    "fastapi",
    "beancount",
    "telegram",
    "githubkit",
    "redis",
    "nomad",
    "prometheus_client",
    "orchestrator.state",
    "orchestrator.platform",
    "orchestrator.intake.service",
    "ledger.book",
    "workers.nomad",
)

# Runs the console script's `app` as `autovibe <args>` would, then writes the heavy modules it
# loaded to a file (stdout is the command's own).
RUN = """
import json, sys
from orchestrator.cli import app
try:
    app(sys.argv[2:], prog_name="autovibe")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = sorted(m for m in json.loads(sys.argv[1]) if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}), file=open("loaded.json", "w"))
"""


def run_cli(tmp_path: Path, settings: Settings, *args: str) -> tuple[dict[str, object], str]:
    env = {
        **os.environ,
        "AUTOVIBE_DATA": str(settings.data),
        "AUTOVIBE_HOST": settings.host,
        "AUTOVIBE_API_PORT": str(settings.api_port),
    }
    env.pop("AUTOVIBE_TOKEN", None)
    done = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(HEAVY), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads((tmp_path / "loaded.json").read_text()), done.stdout


def test_help_imports_no_heavy_module(tmp_path: Path) -> None:
    loaded, out = run_cli(tmp_path, Settings(data=tmp_path / "data"), "--help")
    assert loaded == {"code": 0, "heavy": []}
    assert "autovibe: run coding agents unattended" in out


def test_a_command_over_http_imports_no_heavy_module(tmp_path: Path) -> None:
    settings = Settings(
        data=tmp_path / "data", configs=PROJECT_ROOT / "configs", api_port=free_port()
    )
    with served_api(settings):
        loaded, out = run_cli(tmp_path, settings, "trial", "list")
    assert loaded == {"code": 0, "heavy": []}
    assert out == ""  # no trials yet: the API answered an empty list
