"""Submission refuses a model that cannot run (issue 20): 422 naming the field, the model and
why, through the real control API; and `autovibe models ls` prints the same facts.

The refusals: a provider without a key in the secret store, a model without a price, a
provider not in configs/providers.yaml, a GPU pair the model plane does not serve (asked at
`GET <model_url>/models`), an agent that speaks none of the model's wire formats. The model
plane's stand-in lists the names given to it, as vLLM's /v1/models does (no GPU here).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fastapi.testclient import TestClient
from trial_runs import operator_api
from typer.testing import CliRunner

from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from orchestrator.catalog import Catalog
from orchestrator.cli import app as cli
from secretstore import get_store

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-openai-key-of-the-choices-test"


class _Plane(BaseHTTPRequestHandler):
    names: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": n} for n in self.names]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def plane() -> Iterator[int]:
    """A model plane serving `7b` (not `7b:thinking`); yields its port."""

    class Handler(_Plane):
        names: ClassVar[list[str]] = ["7b", "tiny"]

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def settings(tmp_path: Path, plane: int) -> Settings:
    """Configs of the repository; the openai key stored, no other; the plane above."""
    settings = Settings(data=tmp_path / "data", configs=ROOT / "configs", model_port=plane)
    get_store("file", DataRoot.at(settings.data)).put("providers/openai", KEY)
    return settings


def submit(
    client: TestClient, trial: dict[str, Any], agents: list[str], models: list[str]
) -> tuple[int, list[dict[str, Any]]]:
    body = {**trial, "agents": agents, "model_pairs": models}
    response = client.post("/v1/trials", json=body)
    detail = response.json().get("detail") if response.status_code == 422 else []
    return response.status_code, detail


def only_error(detail: list[dict[str, Any]]) -> tuple[list[Any], str]:
    assert len(detail) == 1, detail
    return list(detail[0]["loc"]), detail[0]["msg"]


def test_a_provider_model_with_its_key_and_price_is_accepted(
    settings: Settings, demo_trial: dict[str, Any]
) -> None:
    with operator_api(settings) as (client, _):
        status, detail = submit(client, demo_trial, ["builtin"], ["openai/gpt-4.1-mini", "7b"])
        assert status == 201, detail
        trial = client.get("/v1/trials").json()[0]
        view = client.get(f"/v1/trials/{trial['id']}").json()
    assert {a["model"] for a in view["assignments"]} <= {"openai/gpt-4.1-mini", "7b"}


REFUSALS = [
    (
        ["builtin"],
        ["tiny", "anthropic/claude-sonnet-4-5"],
        1,
        "'anthropic/claude-sonnet-4-5': provider 'anthropic' has no key: no key at "
        "providers/anthropic in the secret store; set it with "
        "`autovibe secrets set providers/anthropic`",
    ),
    (
        ["builtin"],
        ["openai/gpt-9-imaginary"],
        0,
        "'openai/gpt-9-imaginary' has no price in configs/prices.yaml (providers: openai: "
        "gpt-9-imaginary); an unpriced model is refused at submission, not at its first call; "
        "priced for openai: gpt-4.1, gpt-4.1-mini, gpt-4o-mini",
    ),
    (
        ["builtin"],
        ["acme/coder-1"],
        0,
        "'acme/coder-1': no provider 'acme' in configs/providers.yaml; known: openai, "
        "anthropic, deepseek, openrouter",
    ),
    (
        ["builtin"],
        ["7b", "7b:thinking"],
        1,
        "'7b:thinking' is not being served: GET http://127.0.0.1:{port}/v1/models lists 7b, tiny",
    ),
    (
        ["builtin", "claude-code"],
        ["openai/gpt-4.1-mini"],
        0,
        "agent 'claude-code' cannot speak to 'openai/gpt-4.1-mini': the agent speaks Anthropic "
        "Messages, the model is served in OpenAI chat/completions, and the proxy does not "
        "translate between them",
    ),
    (
        ["aider"],
        ["7b"],
        None,  # a GPU pair speaks both: OpenAI's app and the Messages front in front of it
        None,
    ),
    (["claude-code"], ["7b"], None, None),
    (
        ["cursor-cli"],
        ["tiny"],
        0,
        "agent 'cursor-cli' cannot speak to 'tiny': the agent speaks no wire format we serve",
    ),
    (
        ["builtin"],
        ["qwen-99b"],
        0,
        "unknown model pair 'qwen-99b'; allowed: 14b, 14b:thinking, 32b, 32b:thinking, 3b, "
        "3b:thinking, 7b, 7b:thinking, 9b, 9b:thinking, tiny, tiny:thinking, or "
        "<provider>/<model> with a provider of configs/providers.yaml",
    ),
]


@pytest.mark.parametrize(("agents", "models", "index", "message"), REFUSALS)
def test_submission_refuses_what_cannot_run_naming_field_model_and_why(
    settings: Settings,
    demo_trial: dict[str, Any],
    agents: list[str],
    models: list[str],
    index: int | None,
    message: str | None,
) -> None:
    with operator_api(settings) as (client, _):
        status, detail = submit(client, demo_trial, agents, models)
        if index is None:
            # Validated; only the agent's installation is missing here.
            assert status == 422 and [d["type"] for d in detail] == ["agent_not_installed"]
            return
        assert status == 422
        loc, msg = only_error(detail)
        assert client.get("/v1/trials").json() == [], "nothing is created on a refusal"
    assert loc == ["body", "model_pairs", index]
    assert message is not None
    assert message.format(port=settings.model_port) in msg


def test_an_unreachable_model_plane_refuses_gpu_pairs_with_the_error(
    tmp_path: Path, demo_trial: dict[str, Any]
) -> None:
    settings = Settings(data=tmp_path / "data", configs=ROOT / "configs", model_port=free_port())
    with operator_api(settings) as (client, _):
        status, detail = submit(client, demo_trial, ["builtin"], ["32b"])
    loc, msg = only_error(detail)
    assert (status, loc) == (422, ["body", "model_pairs", 0])
    assert (
        f"'32b' is not being served: GET http://127.0.0.1:{settings.model_port}/v1/models "
        "got no answer (ConnectError"
    ) in msg


def test_a_trial_file_is_checked_the_same_way(settings: Settings, tmp_path: Path) -> None:
    """`config check` reads the same catalogue: the refusal names the file's line."""
    from contracts.config import ConfigError, load_trial

    text = (ROOT / "configs/trials/demo.yaml").read_text()
    text = text.replace("model_pairs: [tiny]", "model_pairs: [deepseek/deepseek-chat]")
    assert "deepseek/deepseek-chat" in text
    path = ROOT / "configs/trials" / f".choices-{tmp_path.name}.yaml"
    path.write_text(text)
    try:
        with pytest.raises(ConfigError) as refused:
            load_trial(path, Catalog.load(settings).validation_context())
    finally:
        path.unlink()
    assert "model_pairs.0: 'deepseek/deepseek-chat': provider 'deepseek' has no key" in str(
        refused.value
    )


def test_models_ls_lists_pairs_and_providers_with_evidence_keys_and_prices(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOVIBE_DATA", str(settings.data))
    monkeypatch.setenv("AUTOVIBE_MODEL_PORT", str(settings.model_port))
    result = CliRunner().invoke(cli, ["models", "ls"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    url = f"http://127.0.0.1:{settings.model_port}/v1"

    def line_of(start: str) -> str:
        return next(line for line in lines if line.strip().startswith(start))

    assert lines[0] == f"Local pairs (model plane {url}):"
    assert line_of("7b ").split()[1:3] == ["gpu", "served"]
    assert line_of("7b:thinking").split()[1:4] == ["gpu", "NOT", "served"]
    assert f"evidence: GET {url}/models lists 7b, tiny" in result.output
    assert line_of("tiny ").endswith("in 0.666667 out 0.666667 USD/Mtok")
    assert "speaks OpenAI chat/completions  key present (providers/openai)" in line_of("openai ")
    assert "key MISSING (providers/anthropic)" in line_of("anthropic ")
    assert "set it with `autovibe secrets set providers/anthropic`" in result.output
    assert line_of("openrouter ").split()[:2] == ["openrouter", "https://openrouter.ai/api"]
    assert line_of("anthropic/claude-sonnet-4-5").endswith(
        "in 3.00 out 15.00 cache read 0.30 cache write 3.75 USD/Mtok (as of 2025-10-01)"
    )
    assert "deepseek/deepseek-chat" in result.output
    assert "POST /v1/embeddings (input tokens)" in line_of("endpoints metered: POST /v1/chat")
    assert line_of("Agents speak:").count("claude-code (Anthropic Messages)") == 1
    assert KEY not in result.output
