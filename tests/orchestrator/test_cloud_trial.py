"""A trial mixing the local `tiny` pair and a cloud model gives one report comparing both
(issue 20).

Real: the control API (the trial goes in as an operator sends it), the scheduler with detached
runners, the built-in agent, grading, and mitmdump with the platform's addons in a mount
namespace whose /etc/hosts sends api.openai.com to the TLS provider stand-in
(`tests/security/provider_stand_ins.py`, OpenAI's documented answers). `tiny` is served by the
deterministic model server, which answers `return 1`; the stand-in's chat answer is prose, so
the cloud arm solves nothing. The built-in agent asks the cloud model for `/v1/completions`
first, gets OpenAI's 404 for a chat model, and goes on in chat completions.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "security"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "workers"))
from provider_stand_ins import CHAT_USAGE, ProviderStandIn
from trial_runs import operator_api
from worker_harness import proxy_to_providers, throwaway_certificate

from contracts.config import load_prices
from contracts.reports import TrialReport
from contracts.settings import PROJECT_ROOT
from orchestrator import report
from orchestrator.platform import Platform
from orchestrator.scheduler import Scheduler
from orchestrator.state import Trial
from tests.serving.model_harness import deterministic_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None,
        reason="a private /etc/hosts for mitmdump needs root and unshare",
    ),
]

KEY = "sk-proj-real-key-for-the-mixed-trial"
CLOUD = "openai/gpt-4.1-mini"
DEADLINE_S = 300


@dataclass(frozen=True)
class Stack:
    client: TestClient
    platform: Platform
    cloud: ProviderStandIn


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("cloud-trial")
    address = f"127.80.{os.getpid() % 250}.1"
    ca, server_pem = throwaway_certificate(base / "ca", address, ["api.openai.com"])
    cloud = ProviderStandIn(address, server_pem)
    try:
        with proxy_to_providers(
            base / "data", address, ["api.openai.com"], ca, {"openai": KEY},
            host="127.0.0.1", allow_unsandboxed=True, task_roots=[tmp_path_factory.getbasetemp()],
        ) as proxy, deterministic_server(proxy.settings, ["    return 1\n"]), \
                operator_api(proxy.settings) as (client, platform):  # fmt: skip
            yield Stack(client, platform, cloud)
    finally:
        cloud.stop()


def task_repo(base: Path) -> Path:
    """One stub and the test that grades it."""
    repo = base / "twokit"
    (repo / "twokit").mkdir(parents=True)
    (repo / "tests").mkdir()
    (repo / "twokit/__init__.py").write_text("")
    (repo / "twokit/two.py").write_text(
        'def one() -> int:\n    """Return 1."""\n    raise NotImplementedError\n'
    )
    (repo / "tests/test_two.py").write_text(
        "from twokit.two import one\n\n\ndef test_one():\n    assert one() == 1\n"
    )
    return repo


def mixed_trial(repo: Path) -> dict[str, Any]:
    return {
        "name": "mixed",
        "project": "mixed",
        "budget": {"amount": "5", "currency": "USD", "period": "monthly"},
        "machines": {"count": 1, "daily_allowance": "1"},
        "agents": ["builtin"],
        "model_pairs": ["tiny", CLOUD],
        "sandbox": {"kind": "none"},
        # Uniform draws: seed 2 gives the task's two runs tiny, then the cloud model.
        "assignment": {"seed": 2, "trials_per_task": 2},
        "tasks": [
            {
                "id": "one",
                "repo": str(repo),
                "prompt": "Implement `one`.",
                "test_command": "python -m pytest -q",
                "fail_to_pass": ["tests/test_two.py::test_one"],
                "timeout_s": 120,
            }
        ],
    }


def run_trial(platform: Platform, trial_id: str) -> None:
    """Tick a scheduler until the trial is finished (its judge's scores in)."""
    scheduler = Scheduler(platform)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while time.monotonic() < deadline:
            scheduler.tick()
            with platform.store.session() as s:
                trial = s.get_one(Trial, trial_id)
                states = [(a.state, a.result) for a in trial.assignments]
                if trial.status == "finished":
                    return
            time.sleep(0.2)
    finally:
        scheduler.stop()
    raise AssertionError(f"trial still running after {DEADLINE_S} s: {states}")


def test_a_trial_of_tiny_and_a_cloud_model_reports_both_side_by_side(
    stack: Stack, tmp_path: Path
) -> None:
    resp = stack.client.post("/v1/trials", json=mixed_trial(task_repo(tmp_path)))
    assert resp.status_code == 201, resp.text
    trial_id = resp.json()["id"]
    with stack.platform.store.session() as s:
        planned = [a.model for a in s.get_one(Trial, trial_id).assignments]
    assert sorted(planned) == sorted(["tiny", CLOUD]), planned
    seen = len(stack.cloud.seen)
    run_trial(stack.platform, trial_id)

    # The cloud arm's calls reached the provider with its real key only.
    calls = stack.cloud.seen[seen:]
    assert [c["path"] for c in calls][:2] == ["/v1/completions", "/v1/chat/completions"], calls
    for call in calls:
        headers = {name.lower(): value for name, value in call["headers"].items()}
        assert headers["authorization"] == f"Bearer {KEY}"
    chats = [c for c in calls if c["path"] == "/v1/chat/completions" and c["status"] == 200]
    assert chats

    # The report as the API serves it: one row per agent × model, both arms in it.
    served = stack.client.get(f"/v1/trials/{trial_id}/report")
    assert served.status_code == 200, served.text
    rep = TrialReport.model_validate(served.json())
    rows = {row.model: row for row in rep.rows}
    assert set(rows) == {"tiny", CLOUD} and {row.agent for row in rep.rows} == {"builtin"}
    tiny, cloud = rows["tiny"], rows[CLOUD]
    assert (tiny.n, tiny.resolved, tiny.success_rate) == (1, 1, 1.0)
    assert (cloud.n, cloud.resolved, cloud.success_rate) == (1, 0, 0.0)
    assert tiny.local_share == 1.0 and tiny.cost_usd > 0 and tiny.cost_per_resolved is not None
    assert cloud.local_share == 0.0 and cloud.local_tokens == 0
    assert cloud.cost_per_resolved is None
    # The cloud arm cost what the stand-in's usage costs at configs/prices.yaml's price.
    price = load_prices(PROJECT_ROOT / "configs").cost_usd(
        "openai", "gpt-4.1-mini", CHAT_USAGE["prompt_tokens"], CHAT_USAGE["completion_tokens"]
    )
    assert price is not None
    assert cloud.cost_usd == price * len(chats)
    assert cloud.llm_calls == len(chats)  # calls with usage: not the 404
    providers = {row.provider: row for row in rep.providers}
    assert set(providers) >= {"local", "openai"}
    assert providers["openai"].calls == len(calls)

    # One table compares them, and the comparison of the two arms is made.
    table = report.to_markdown(rep)
    assert "| builtin | tiny |" in table and f"| builtin | {CLOUD} |" in table, table
    [compared] = rep.comparisons.model_pairs
    assert {compared.a, compared.b} == {"tiny", CLOUD}
    assert (compared.a_n, compared.b_n) == (1, 1)
