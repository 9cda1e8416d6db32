"""Control API contract: auth, 201/422/409, nothing half-created, reads and SSE."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from trial_runs import operator_api

from contracts.dataroot import DataRoot
from contracts.reports import TrialReport
from contracts.settings import Settings
from orchestrator.api import create_app

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, DataRoot]]:
    settings = Settings(data=tmp_path / "data", configs=ROOT / "configs")
    with operator_api(settings) as (client, platform):
        yield client, platform.root


def count_trials(client: TestClient) -> int:
    return len(client.get("/v1/trials").json())


def test_token_is_created_once_with_private_mode(tmp_path: Path) -> None:
    settings = Settings(data=tmp_path, configs=ROOT / "configs")
    create_app(settings, run_scheduler=False)
    path = DataRoot.at(tmp_path).secrets / "operator-token"
    first = path.read_text()
    create_app(settings, run_scheduler=False)
    assert path.read_text() == first
    assert path.stat().st_mode & 0o777 == 0o600


def test_requires_bearer_token(api: tuple[TestClient, DataRoot]) -> None:
    client, _ = api
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        assert client.get("/v1/trials", headers=headers).status_code == 401
    assert client.get("/healthz", headers={"Authorization": ""}).status_code == 200


def test_submit_list_show(api: tuple[TestClient, DataRoot], demo_trial: dict[str, Any]) -> None:
    client, root = api
    resp = client.post("/v1/trials", json=demo_trial)
    assert resp.status_code == 201, resp.text
    trial_id = resp.json()["id"]
    view = client.get(f"/v1/trials/{trial_id}").json()
    assert view["status"] == "queued"
    # 3 tasks × 2 trials per task, all with the one agent and pair
    assert len(view["assignments"]) == 6
    assert {a["state"] for a in view["assignments"]} == {"queued"}
    spend = view["spend"]
    assert (Decimal(spend["amount"]), spend["currency"], Decimal(spend["budget"])) == (
        0,
        "CAD",
        Decimal("5"),
    )
    assert [t["id"] for t in client.get("/v1/trials").json()] == [trial_id]
    assert root.ledger("demo").exists()
    assert client.get("/v1/trials/nope").status_code == 404


@pytest.mark.parametrize(
    ("mutate", "loc", "needle"),
    [
        (
            lambda d: d.update(agents=["aider-x"]),
            ["body", "agents", 0],
            "unknown agent 'aider-x'; allowed: aider, builtin, claude-code",
        ),
        (
            lambda d: d.update(model_pairs=["big"]),
            ["body", "model_pairs", 0],
            "unknown model pair 'big'; allowed: 14b, 14b:thinking, 32b, 32b:thinking, "
            "3b, 3b:thinking, "
            "7b, 7b:thinking, 9b, 9b:thinking, tiny, tiny:thinking",
        ),
        (
            lambda d: d["budget"].update(amount="-1"),
            ["body", "budget", "amount"],
            "greater than or equal to 0",
        ),
        (
            lambda d: d["tasks"][1].pop("fail_to_pass"),
            ["body", "tasks", 1, "fail_to_pass"],
            "Field required",
        ),
        (
            lambda d: d["tasks"][0].update(repo="/no/such/repo"),
            ["body", "tasks", 0, "repo"],
            "must be a folder under the task roots",
        ),
        (
            lambda d: d["tasks"][0].update(repo=str(ROOT / "examples" / "no-such-kit")),
            ["body", "tasks", 0, "repo"],
            "does not exist",
        ),
        (lambda d: d.update(driver="k8s"), ["body", "driver"], "'local'"),
        (
            lambda d: d.update(agents=["builtin", "aider"]),
            ["body", "agents", 1],
            "not installed: run `autovibe agents install aider`",
        ),
        (
            lambda d: d.update(sandbox={"network": "transparent"}),
            ["body", "sandbox", "network"],
            "AUTOVIBE_PROXY_TRANSPARENT_PORT",
        ),
    ],
)
def test_bad_input_is_422_naming_field_and_nothing_is_created(
    api: tuple[TestClient, DataRoot],
    demo_trial: dict[str, Any],
    mutate: Any,
    loc: list[Any],
    needle: str,
) -> None:
    client, root = api
    bad = copy.deepcopy(demo_trial)
    mutate(bad)
    resp = client.post("/v1/trials", json=bad)
    assert resp.status_code == 422, resp.text
    errors = resp.json()["detail"]
    assert any(e["loc"] == loc and needle in e["msg"] for e in errors), errors
    assert count_trials(client) == 0
    assert not root.ledger("demo").exists()


def test_duplicate_name_is_409_and_leaves_first_alone(
    api: tuple[TestClient, DataRoot], demo_trial: dict[str, Any]
) -> None:
    client, root = api
    assert client.post("/v1/trials", json=demo_trial).status_code == 201
    ledger_before = root.ledger("demo").read_text()
    again = client.post("/v1/trials", json=demo_trial)
    assert again.status_code == 409
    assert "exists already" in again.json()["detail"]
    assert count_trials(client) == 1
    assert root.ledger("demo").read_text() == ledger_before


def test_cancel_queued_trial_and_events(
    api: tuple[TestClient, DataRoot], demo_trial: dict[str, Any]
) -> None:
    client, _ = api
    trial_id = client.post("/v1/trials", json=demo_trial).json()["id"]
    view = client.post(f"/v1/trials/{trial_id}/cancel").json()
    assert view["status"] == "cancelled"
    assert {a["state"] for a in view["assignments"]} == {"cancelled"}
    with client.stream("GET", f"/v1/trials/{trial_id}/events") as resp:
        body = "".join(resp.iter_text())
    assert "event: trial_submitted" in body
    assert body.rstrip().split("\n")[-2] == "event: trial_cancelled"


def test_metrics_are_prometheus_text(api: tuple[TestClient, DataRoot]) -> None:
    client, _ = api
    text = client.get("/metrics").text
    assert 'autovibe_assignments{state="queued"}' in text
    assert "autovibe_spend_usd" in text


def test_the_openapi_document_shows_the_trial_schema(api: tuple[TestClient, DataRoot]) -> None:
    client, _ = api
    resp = client.get("/openapi.json")
    assert resp.status_code == 200, resp.text
    body = resp.json()["paths"]["/v1/trials"]["post"]["requestBody"]
    trial = {"$ref": "#/components/schemas/TrialConfig"}
    assert body["content"]["application/json"]["schema"] == trial
    assert "budget" in resp.json()["components"]["schemas"]["TrialConfig"]["properties"]


def test_the_report_route_serves_the_trial_report(
    api: tuple[TestClient, DataRoot], demo_trial: dict[str, Any]
) -> None:
    client, _ = api
    trial_id = client.post("/v1/trials", json=demo_trial).json()["id"]
    resp = client.get(f"/v1/trials/{trial_id}/report")
    assert resp.status_code == 200, resp.text
    data = resp.json()
    report = TrialReport.model_validate(data)
    assert (report.id, report.status, report.currency) == (trial_id, "queued", "CAD")
    (row,) = data["rows"]
    assert (row["assignments"], row["pending"], row["n"], row["success_rate"]) == (6, 6, 0, None)
    assert (row["cost_usd"], row["cost"], row["cost_per_resolved"]) == ("0", "0.000000", None)
    assert row["success_ci95"] == [0.0, 1.0]
    assert data["comparisons"] == {"agents": [], "model_pairs": [], "arms": []}
    assert data["local_share"] == {"local_tokens": 0, "local_share": None, "target": 0.85}
    assert client.get("/v1/trials/nope/report").status_code == 404

    paths = client.get("/openapi.json").json()["paths"]
    ok = paths["/v1/trials/{trial_id}/report"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TrialReport"
    }
