"""Fuzz the control API from its own OpenAPI document (schemathesis, in-process): no 500s."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from contracts.dataroot import DataRoot
from contracts.settings import Settings
from orchestrator.api import create_app

ROOT = Path(__file__).resolve().parents[2]


def _app() -> tuple[object, str]:
    data = Path(tempfile.mkdtemp(prefix="autovibe-fuzz-"))
    app = create_app(
        Settings(data=data, configs=ROOT / "configs", rate_limit_admin=100_000),
        run_scheduler=False,
    )
    token = (DataRoot.at(data).secrets / "operator-token").read_text().strip()
    return app, token


APP, TOKEN = _app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP).exclude(
    path_regex=r".*/events$"  # an endless event stream; covered by the API tests
)


@schema.parametrize()
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Bearer {TOKEN}"},
        checks=[schemathesis.checks.not_a_server_error],
    )
