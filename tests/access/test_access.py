"""Control-API access: every route × every scope, hashed tokens, rate limits, CORS, audit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Route
from typer.testing import CliRunner

from contracts.dataroot import DataRoot
from contracts.settings import Settings
from orchestrator import access
from orchestrator.access import ALL_SCOPES, TokenScope, TokenStore, rule_for
from orchestrator.api import create_app
from orchestrator.tokens_cli import app as tokens_app

ROOT = Path(__file__).resolve().parents[2]
ANONYMOUS = "anonymous"


def make_app(tmp_path: Path, **overrides: object) -> tuple[FastAPI, DataRoot]:
    settings = Settings(data=tmp_path / "data", configs=ROOT / "configs", **overrides)
    return create_app(settings, run_scheduler=False), DataRoot.at(settings.data)


@pytest.fixture(scope="module")
def matrix_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, dict]]:
    app, root = make_app(tmp_path_factory.mktemp("matrix"))
    store = TokenStore(root)
    tokens = {str(s): store.create(s, "p1")[1] for s in ALL_SCOPES}
    with TestClient(app) as client:
        yield client, tokens


def endpoints(app: FastAPI) -> list[tuple[str, str]]:
    found = []
    for route in app.routes:
        assert isinstance(route, APIRoute | Route), route
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                found.append((method, route.path))
    return found


def test_every_route_has_a_rule(matrix_app: tuple[TestClient, dict]) -> None:
    client, _ = matrix_app
    missing = [e for e in endpoints(client.app) if rule_for(*e) is None]  # type: ignore[arg-type]
    assert not missing, f"routes without a rule in orchestrator.access.RULES: {missing}"


@pytest.mark.parametrize("who", [ANONYMOUS, *map(str, ALL_SCOPES)])
def test_authorization_matrix(matrix_app: tuple[TestClient, dict], who: str) -> None:
    client, tokens = matrix_app
    headers = {} if who == ANONYMOUS else {"Authorization": f"Bearer {tokens[who]}"}
    for method, path in endpoints(client.app):  # type: ignore[arg-type]
        rule = rule_for(method, path)
        assert rule is not None
        url = path.replace("{trial_id}", "t-none")
        status = client.request(method, url, headers=headers, json={}).status_code
        if rule.public:
            expected = "allowed"
        elif who == ANONYMOUS:
            expected = "401"
        elif TokenScope(who) in rule.scopes and who != "machine":
            expected = "allowed"
        else:
            expected = "403"
        got = "allowed" if status not in (401, 403) and status < 500 else str(status)
        assert got == expected, f"{who} {method} {path}: {status}"


def test_tokens_are_stored_hashed_and_operator_file_is_admin(tmp_path: Path) -> None:
    app, root = make_app(tmp_path)
    operator = (root.secrets / "operator-token").read_text().strip()
    record, token = TokenStore(root).create(TokenScope.viewer)
    stored = (root.secrets / access.TOKENS_FILE).read_text()
    assert token not in stored and operator not in stored
    assert (root.secrets / access.TOKENS_FILE).stat().st_mode & 0o777 == 0o600
    with TestClient(app) as client:
        admin = {"Authorization": f"Bearer {operator}"}
        viewer = {"Authorization": f"Bearer {token}"}
        assert client.get("/v1/trials", headers=admin).status_code == 200
        assert client.get("/v1/trials", headers=viewer).status_code == 200
        assert client.post("/v1/trials/x/cancel", headers=viewer).status_code == 403
        TokenStore(root).revoke(record.id)  # as the CLI would, beside the running API
        assert client.get("/v1/trials", headers=viewer).status_code == 401
    # A second start adopts the same operator token once, not twice.
    make_app(tmp_path)
    assert [t.id for t in TokenStore(root).tokens()].count(access.OPERATOR_TOKEN_ID) == 1


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    app, root = make_app(tmp_path, rate_limit_machine=3)
    _, token = TokenStore(root).create(TokenScope.machine, "p1")
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        assert [client.get("/v1/trials").status_code for _ in range(3)] == [403] * 3
        resp = client.get("/v1/trials")
    assert resp.status_code == 429
    assert 1 <= int(resp.headers["Retry-After"]) <= 60


def test_cors_allowlist_and_no_wildcard(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, cors_origins=["https://dash.example.com"])
    with TestClient(app) as client:
        for origin, allowed in (("https://dash.example.com", True), ("https://evil.test", False)):
            resp = client.options(
                "/v1/trials",
                headers={"Origin": origin, "Access-Control-Request-Method": "GET"},
            )
            assert (resp.headers.get("access-control-allow-origin") == origin) is allowed
    with pytest.raises(ValueError, match="no '\\*'"):
        make_app(tmp_path, cors_origins=["*"])


def test_audit_logs_mutating_calls_without_tokens(tmp_path: Path) -> None:
    app, root = make_app(tmp_path)
    operator = (root.secrets / "operator-token").read_text().strip()
    with TestClient(app) as client:
        client.post("/v1/trials/t-none/cancel", headers={"Authorization": f"Bearer {operator}"})
        client.post("/v1/trials/t-none/cancel", headers={"Authorization": "Bearer wrong"})
        client.get("/v1/trials", headers={"Authorization": f"Bearer {operator}"})
    files = list((root.root / "audit").glob("api-*.jsonl"))
    assert len(files) == 1
    text = files[0].read_text()
    assert operator not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(e["who"], e["method"], e["path"], e["status"]) for e in lines] == [
        ("operator", "POST", "/v1/trials/t-none/cancel", 404),
        ("anonymous", "POST", "/v1/trials/t-none/cancel", 401),
    ]
    assert all(e["ts"].endswith("Z") for e in lines)


def test_tokens_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOVIBE_DATA", str(tmp_path))
    runner = CliRunner()
    made = runner.invoke(tokens_app, ["create", "--scope", "machine", "--project", "p1"])
    assert made.exit_code == 0, made.output
    token_id, token = made.output.split()[0], made.output.splitlines()[-1]
    listed = runner.invoke(tokens_app, ["ls"])
    assert token_id in listed.output and token not in listed.output
    assert runner.invoke(tokens_app, ["create", "--scope", "machine"]).exit_code != 0
    assert runner.invoke(tokens_app, ["revoke", token_id]).exit_code == 0
    assert TokenStore(DataRoot.at(tmp_path)).authenticate(token) is None
    assert runner.invoke(tokens_app, ["revoke", "tok_none"]).exit_code != 0
