"""The concierge: a request in plain language → a draft trial, its problems stated, never
submitted by itself.

Real: the control API (uvicorn), the metering proxy (mitmdump with the platform's addons),
the deterministic model server (scripted drafts; it refuses to answer with one that breaks the
JSON schema the request carries, as a grammar-constrained model cannot), the budget counters,
the spool and the ledger. The model's words are scripted here; the `model` test at the end
lets the tiny llama.cpp model write a draft under the schema's grammar.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from trial_runs import operator_api, operator_token, served_api
from typer.testing import CliRunner

from budget import Reserved
from budget.scopes import project_scope
from contracts.config import TrialConfig, load_models
from contracts.dataroot import DataRoot
from contracts.settings import PROJECT_ROOT, Settings, free_port
from contracts.tasksets import SET_FILE
from orchestrator import cli
from orchestrator.intake.concierge import choices_for, draft_schema
from orchestrator.platform import Platform
from proxy.launch import mitmdump_argv, wait_ready
from serving.llamacpp import server_argv
from tests.serving.model_harness import deterministic_server
from tests.workers.worker_harness import direct_env, stop

EXAMPLES = PROJECT_ROOT / "examples"


def draft(name: str, agents: list[str], repos: list[str], amount: float, **extra: Any) -> str:
    tasks = [
        {
            "id": f"{repo}-tests",
            "repo": str(EXAMPLES / repo),
            "prompt": f"Make the failing tests of {repo} pass.",
            "test_command": "python -m pytest -q",
            "fail_to_pass": ["tests/test_basic.py::test_add"],
        }
        for repo in repos
    ]
    return json.dumps(
        {
            "name": name,
            "project": "requests",
            "budget": {"amount": amount, "currency": "CAD"},
            "agents": agents,
            "unknown_agents": extra.pop("unknown_agents", []),
            "model_pairs": ["tiny"],
            "tasks": tasks,
            **extra,
        }
    )


SCRIPT = [
    draft("fix-mathkit", ["builtin"], ["mathkit"], 5),
    # A small model's figures: the budget the request states wins, repeats are dropped.
    draft("text-and-seq", ["builtin", "builtin"], ["textkit", "seqkit"], 100),
    draft("all-three", ["builtin"], ["mathkit", "textkit", "seqkit"], 1.5),
    draft("with-foobot", ["builtin"], ["mathkit"], 5, unknown_agents=["aider", "foobot"]),
    draft("on-a-shoestring", ["builtin"], ["mathkit", "textkit", "seqkit"], 0.01),
    draft("off-schema", ["builtin", "gpt-engineer"], ["mathkit"], 5),
    draft("asked-from-the-shell", ["builtin"], ["textkit"], 3),
    draft("shell-with-foobot", ["builtin"], ["textkit"], 3, unknown_agents=["foobot"]),
    draft("shell-submitted", ["builtin"], ["seqkit"], 3),
]
REQUESTS = [
    "Run the builtin agent on mathkit's failing tests, 5 CAD max.",
    "Try builtin on textkit and seqkit with the tiny pair, no more than 2 CAD.",
    "All three example repos with builtin, 1.50 CAD.",
    "Compare aider, foobot and builtin on mathkit, 5 CAD max.",
    "All three example repos with builtin for one cent.",
    "Anything at all.",
]


@dataclass
class Stack:
    api: httpx.Client
    platform: Platform
    settings: Settings


def _settings(tmp: Path, timeout_s: float = 60) -> Settings:
    intake = tmp / "intake.yaml"
    concierge = {"project": "concierge", "budget": "1", "timeout_s": timeout_s}
    intake.write_text(yaml.safe_dump({"concierge": concierge}))
    return Settings(
        data=tmp / "data", configs=PROJECT_ROOT / "configs", host="127.0.0.1",
        proxy_port=free_port(), model_port=free_port(), api_port=free_port(),
        intake_config=intake,
    )  # fmt: skip


@contextmanager
def _proxy_and_api(settings: Settings) -> Iterator[Stack]:
    """The metering proxy in front of the model server already on `settings.model_port`, and
    the control API sending the concierge's calls through it."""
    root = DataRoot.at(settings.data)
    DataRoot.ensure(root.root)
    with (root.root / "mitmdump.log").open("wb") as log:
        proxy = subprocess.Popen(
            mitmdump_argv(settings), stdout=log, stderr=subprocess.STDOUT,
            env=direct_env(**settings.as_env()),
        )  # fmt: skip
    try:
        wait_ready(settings.host, settings.proxy_port, timeout=60, process=proxy)
        # Served for real, so that `autovibe ask` can reach it as an operator does.
        with served_api(settings) as platform:
            headers = {"Authorization": f"Bearer {operator_token(settings.data)}"}
            with httpx.Client(
                base_url=settings.api_url, headers=headers, trust_env=False, timeout=120
            ) as client:
                yield Stack(client, platform, settings)
    finally:
        stop(proxy)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = _settings(tmp_path_factory.mktemp("concierge"))
    with deterministic_server(settings, SCRIPT), _proxy_and_api(settings) as running:
        yield running


def test_requests_become_drafts_with_their_problems_stated_and_metered(stack: Stack) -> None:
    answers = []
    for request in REQUESTS[:5]:
        resp = stack.api.post("/v1/concierge", json={"request": request})
        assert resp.status_code == 200, resp.text
        answers.append(resp.json())
    context = stack.platform.catalog.validation_context()
    # Three plain requests: drafts that validate as trials, with no problem.
    for answer in answers[:3]:
        assert answer["valid"] and answer["problems"] == [], answer["problems"]
        TrialConfig.model_validate(answer["draft"], context=context)
    # An unknown agent and an impossible budget: stated, not a crash.
    foobot, shoestring = answers[3], answers[4]
    assert not foobot["valid"]
    assert foobot["problems"] == [
        "agents: agent 'aider' is not installed: run `autovibe agents install aider`",
        "agents: unknown agent 'foobot'; known: aider, builtin, claude-code, cursor-cli, "
        "mini-swe-agent, qwen-code",
    ]
    second = answers[1]
    assert second["draft"]["budget"] == {"amount": "2", "currency": "CAD"}
    assert second["draft"]["agents"] == ["builtin"]
    assert second["notes"] == [
        "agents: repeats dropped",
        "budget: 2 CAD as the request says (the model wrote 100 CAD)",
    ]
    assert not shoestring["valid"]
    (budget,) = shoestring["problems"]
    assert budget.startswith("budget.amount: impossible budget: 0.01 CAD for 3 assignments")
    # Nothing was submitted; a valid draft is submitted only when asked.
    assert stack.api.get("/v1/trials").json() == []
    created = stack.api.post("/v1/trials", json=answers[0]["draft"])
    assert created.status_code == 201, created.text
    # Each call went through the proxy as the concierge's project and was metered.
    usage = stack.platform.usage(trial="concierge")
    assert sum(u.calls for u in usage) == 5
    assert sum(u.total_tokens for u in usage) == sum(a["tokens"] for a in answers) > 0
    assert sum(u.cost_usd for u in usage) > 0
    # The sixth scripted answer names an agent outside the schema's enum: the deterministic
    # server, like a grammar, cannot give it, so the concierge says it is unavailable.
    refused = stack.api.post("/v1/concierge", json={"request": REQUESTS[5]})
    assert refused.status_code == 503
    assert "breaks the requested schema" in refused.json()["detail"]
    assert "gpt-engineer" in refused.json()["detail"]


def test_autovibe_ask_shows_the_draft_and_submits_only_when_told(stack: Stack) -> None:
    # Runs after the test above: the scripted answers are taken in order.
    env = {
        "AUTOVIBE_DATA": str(stack.settings.data),
        "AUTOVIBE_API_PORT": str(stack.settings.api_port),
    }
    runner = CliRunner()
    shown = runner.invoke(cli.app, ["ask", "builtin on textkit, 3 CAD"], env=env)
    assert shown.exit_code == 0, shown.output
    assert yaml.safe_load(shown.stdout)["name"] == "asked-from-the-shell"
    assert "run again with --submit" in shown.stderr
    refused = runner.invoke(cli.app, ["ask", "--submit", "foobot on textkit, 3 CAD"], env=env)
    assert refused.exit_code == 2
    assert "problem: agents: unknown agent 'foobot'" in refused.stderr
    submitted = runner.invoke(cli.app, ["ask", "--submit", "builtin on seqkit, 3 CAD"], env=env)
    assert submitted.exit_code == 0, submitted.output
    assert "submitted trial shell-submitted: id t" in submitted.stdout
    names = [t["name"] for t in stack.api.get("/v1/trials").json()]
    assert "shell-submitted" in names and "asked-from-the-shell" not in names


def test_the_draft_schema_compiles_to_a_llama_cpp_grammar(stack: Stack) -> None:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    schema = draft_schema(choices_for(stack.platform))
    grammar = json_schema_to_gbnf(json.dumps(schema))
    # Every choice is a literal of the grammar: the model can write nothing else there.
    tasks = stack.platform.root.root / "tasks"  # a task root by default
    for folder in ("mirrors", "trees", "a-set", "my-repo"):
        (tasks / folder).mkdir(parents=True, exist_ok=True)
    (tasks / "a-set" / SET_FILE).write_text("{}")
    choices = choices_for(stack.platform)
    assert choices.agents == ["builtin"]  # what is installed here and speaks to a pair
    assert choices.task_sets == ["a-set"]
    mine = [r for r in choices.repos if r.startswith(str(tasks.resolve()))]
    assert mine == [str((tasks / "my-repo").resolve())]  # no mirror, tree or set

    def literal(name: str) -> str:  # a JSON string as GBNF writes it: "\"name\""
        return '\\"' + name + '\\"'

    for name in (*choices.agents, *choices.pairs, str(EXAMPLES / "mathkit")):
        assert literal(name) in grammar
    assert literal("claude-code") not in grammar and literal("command") not in grammar
    assert "unknown_agents" in grammar


def test_a_spent_concierge_budget_refuses_the_next_draft(stack: Stack) -> None:
    # Last of the module's tests on the shared stack: it spends the concierge's whole budget.
    counters = stack.platform.counters()
    try:
        scope = project_scope("concierge")
        left = counters.remaining(scope)
        assert isinstance(counters.reserve("spend-it-all", [scope], left), Reserved)
        assert counters.settle("spend-it-all", left, "response")
    finally:
        counters.close()
    resp = stack.api.post("/v1/concierge", json={"request": "builtin on mathkit, 1 CAD"})
    assert resp.status_code == 503
    assert "the concierge's budget refused the call" in resp.json()["detail"]
    assert "project:concierge" in resp.json()["detail"]


def test_the_concierge_is_off_unless_configured(tmp_path: Path) -> None:
    settings = Settings(data=tmp_path / "data", configs=PROJECT_ROOT / "configs")
    with operator_api(settings) as (client, _):
        resp = client.post("/v1/concierge", json={"request": "anything"})
    assert resp.status_code == 404 and "not configured" in resp.json()["detail"]


# On demand (`pytest -m live -k tiny_model`): the tiny model writes ~390 tokens under the
# grammar, 40 s on an idle 2-core machine and 160 s on a loaded one, beyond the suite's budget.
@pytest.mark.live
@pytest.mark.model
@pytest.mark.slow
def test_the_tiny_model_writes_a_draft_within_the_schema(tmp_path: Path) -> None:
    """The real model plane: llama.cpp's grammar from the schema keeps the tiny model to known
    agents, pairs and folders; the naive draft that comes back validates as a trial."""
    settings = _settings(tmp_path, timeout_s=600)  # ~8 tokens/s under the grammar, 2 cores
    DataRoot.ensure(settings.data)
    log_path = settings.data / "llamacpp.log"
    with log_path.open("wb") as log:
        model = subprocess.Popen(
            server_argv(settings, load_models(settings.configs)), stdout=log,
            stderr=subprocess.STDOUT, env=direct_env(), cwd=settings.data,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not _serving(settings):
            assert model.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        with _proxy_and_api(settings) as running:
            resp = running.api.post("/v1/concierge", json={"request": REQUESTS[1]})
            assert resp.status_code == 200, resp.text
            answer = resp.json()
            schema = draft_schema(choices_for(running.platform))
    finally:
        stop(model)
    # Naive perhaps, but JSON of the schema (known agents, pairs, folders only) and a trial.
    print(json.dumps(answer, indent=1))
    written = answer["draft"]  # the budget as the request states it is a decimal string
    budget = {**written["budget"], "amount": float(written["budget"]["amount"])}
    jsonschema.validate({**written, "budget": budget, "unknown_agents": []}, schema)
    assert answer["valid"], answer["problems"]
    assert answer["draft"]["budget"] == {"amount": "2", "currency": "CAD"}
    assert answer["tokens"] > 0


def _serving(settings: Settings) -> bool:
    try:
        return httpx.get(f"{settings.model_url}/models", trust_env=False, timeout=2).is_success
    except httpx.TransportError:
        return False
