"""Control-API access: every route × every scope, hashed tokens, rate limits, CORS, audit."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Route
from typer.testing import CliRunner

from contracts.credentials import MachineIdentity, load_or_create_key, mint, revoke
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
    # Every route once per scope: more calls than a machine token's 10 a minute.
    app, root = make_app(tmp_path_factory.mktemp("matrix"), rate_limit_machine=1000)
    store = TokenStore(root)
    tokens = {
        str(s): store.create(s, "p1", "m1" if s is TokenScope.machine else None)[1]
        for s in ALL_SCOPES
    }
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
    _, token = TokenStore(root).create(TokenScope.machine, "p1", "m1")
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
    made = runner.invoke(
        tokens_app, ["create", "--scope", "machine", "--project", "p1", "--machine", "m1"]
    )
    assert made.exit_code == 0, made.output
    token_id, token = made.output.split()[0], made.output.splitlines()[-1]
    listed = runner.invoke(tokens_app, ["ls"])
    assert token_id in listed.output and token not in listed.output
    assert runner.invoke(tokens_app, ["create", "--scope", "machine"]).exit_code != 0
    assert runner.invoke(tokens_app, ["revoke", token_id]).exit_code == 0
    assert TokenStore(DataRoot.at(tmp_path)).authenticate(token) is None
    assert runner.invoke(tokens_app, ["revoke", "tok_none"]).exit_code != 0


def test_a_workers_machine_credential_pays_as_its_machine(tmp_path: Path) -> None:
    """The credential a worker holds for the proxy is also its machine token on the API: its
    project and machine come from the signed credential, and it dies with its assignment."""
    app, root = make_app(tmp_path)
    identity = MachineIdentity(
        project="p1", trial="t1", assignment="a1", machine="m2", expires=time.time() + 600
    )
    credential = mint(load_or_create_key(root), identity)
    body = {"item": "x", "amount": "1", "currency": "USD", "justification": "j",
            "free_alternatives_considered": ["none free"]}  # fmt: skip
    with TestClient(app, headers={"Authorization": f"Bearer {credential}"}) as client:
        # No ledger for p1 here: refused by the broker (403 no_ledger), past the guard.
        paid = client.post("/v1/projects/p1/payments", json=body)
        assert (paid.status_code, paid.json()["reason"]) == (403, "no_ledger")
        assert paid.json()["machine"] == "m2"
        assert client.post("/v1/projects/p2/payments", json=body).status_code == 403
        assert client.post("/v1/projects/p1/payments", json={**body, "machine": "m1"}).json() == {
            "detail": "machine 'm2' cannot pay as 'm1'"
        }
        assert client.get("/v1/trials").status_code == 403
        forged = credential[:-2] + ("AA" if not credential.endswith("AA") else "BB")
        bad = client.post(
            "/v1/projects/p1/payments", json=body, headers={"Authorization": f"Bearer {forged}"}
        )
        assert bad.status_code == 401
        revoke(root, "a1")
        assert client.post("/v1/projects/p1/payments", json=body).status_code == 401
    store = TokenStore(root)
    with pytest.raises(access.TokenError, match="--machine"):
        store.create(TokenScope.machine, "p1")
