"""End to end on the embedded defaults: real llama.cpp server, real mitmdump, real API.

One stack per module (separate processes on free ports, a fresh data root); the trial goes in
through the control API exactly as `make demo` sends it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from budget.scopes import JUDGE_MACHINE
from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from ledger.book import Ledger
from ledger.check import bean_check
from ledger.reconcile import reconcile
from orchestrator import stack
from orchestrator.client import Client
from traffic.sqlite_store import SqliteTrafficStore

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = Settings(
        data=tmp_path_factory.mktemp("e2e-data"),
        configs=ROOT / "configs",
        api_port=free_port(),
        proxy_port=free_port(),
        model_port=free_port(),
    )
    stack.up(settings)
    yield settings
    stack.down(settings)


def small_trial(demo_trial: dict[str, Any], name: str, per_task: int) -> dict[str, Any]:
    """The demo's quickest task (mathkit: the tiny model fills both of its stubs at the first,
    greedy attempt, so no assignment waits on hotter retries) `per_task` times."""
    trial = {**demo_trial, "name": name, "tasks": demo_trial["tasks"][:1]}
    trial["assignment"] = {**trial["assignment"], "trials_per_task": per_task}
    return trial


def wait_finished(client: Client, trial_id: str, timeout_s: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = client.trial(trial_id)
        if view["status"] in ("finished", "cancelled"):
            return view
        time.sleep(1)
    raise AssertionError(f"trial {trial_id} did not finish: {client.trial(trial_id)}")


def transcripts(root: DataRoot, project: str, trial_id: str) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for path in sorted(
        (root.root / "worker-artifacts" / project / trial_id).glob("*/output/transcript.jsonl")
    ):
        out[path.parent.parent.name] = [
            json.loads(x) for x in path.read_text().splitlines() if x.strip()
        ]
    return out


def kill_the_api_while_runners_work(settings: Settings, trial_id: str) -> None:
    """SIGKILL the API once two runners have started and an assignment is still queued, then
    start it again."""
    client, root = Client(settings), DataRoot.at(settings.data)
    folder = root.root / "worker-artifacts" / "demo" / trial_id
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = [a["state"] for a in client.trial(trial_id)["assignments"]]
        started = list(folder.glob("*/runs.jsonl"))
        # Kill while runners are mid-work and another still waits for a machine.
        if len(started) == 2 and states.count("queued") >= 1:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"never saw two runners working and another queued: {states}")
    api_pid = stack.running_pid(root, "api")
    assert api_pid is not None
    os.killpg(api_pid, signal.SIGKILL)
    time.sleep(2)
    stack.up(settings, ["api"])


def assert_each_started_and_ended_once(
    client: Client, root: DataRoot, trial_id: str, view: dict[str, Any]
) -> None:
    """No runner was started twice, and every ending was recorded once."""
    assert [a["attempts"] for a in view["assignments"]] == [1] * len(view["assignments"])
    finished = Counter(
        data["assignment"]
        for kind, data in client.events(trial_id)
        if kind == "assignment_finished"
    )
    assert finished == {a["id"]: 1 for a in view["assignments"]}
    folder = root.root / "worker-artifacts" / "demo" / trial_id
    for a in view["assignments"]:
        runs = (folder / a["id"] / "runs.jsonl").read_text().splitlines()
        assert len(runs) == 1, f"{a['id']} started {len(runs)} times"


def test_trial_end_to_end_through_an_orchestrator_restart(
    settings: Settings, demo_trial: dict[str, Any]
) -> None:
    """Three assignments on two machines; the orchestrator is killed (SIGKILL) while two
    runners work and the third assignment waits for a machine, and started again. One trial
    proves both: what the platform reports, meters and books, and that the restart starts no
    runner twice and records every ending once (they were two trials of the same shape before,
    each a few minutes of llama.cpp). The three are one task's, the demo's quickest: its other
    two tasks added only the tiny model's hotter retries, minutes of them."""
    client = Client(settings)
    root = DataRoot.at(settings.data)
    trial_id = client.submit(small_trial(demo_trial, "e2e", per_task=3))["id"]
    kill_the_api_while_runners_work(settings, trial_id)
    events = [kind for kind, _ in client.events(trial_id)]
    assert events[-1] == "trial_finished"
    view = wait_finished(client, trial_id)
    assert [a["state"] for a in view["assignments"]] == ["finished"] * 3
    assert all(a["status"] in ("resolved", "partial", "unresolved") for a in view["assignments"])
    assert_each_started_and_ended_once(client, root, trial_id, view)

    # The report adds up: per agent × pair, the counts and the metered cost.
    report = client.report(trial_id)
    (row,) = report["rows"]
    assert (row["agent"], row["model"], row["assignments"]) == ("builtin", "tiny", 3)
    assert row["resolved"] + row["partial"] + row["unresolved"] == 3
    assert row["llm_calls"] > 0 and row["tokens"] > 0
    assert float(row["cost"]) > 0, "local models are priced: no task costs zero"
    assert row["success_rate"] == round(row["resolved"] / 3, 4)

    # Every LLM call went through the proxy, and what it metered is exactly what the model
    # server reported to the agent, request by request.
    index = SqliteTrafficStore(root.traffic_index)
    index.catch_up(root.traffic_logs)
    flows = index.flows(trial=trial_id)
    judged = [f for f in flows if f.machine == JUDGE_MACHINE]
    metered = {f.response_id: f for f in flows if f.response_id and f.machine != JUDGE_MACHINE}
    calls = [
        line
        for lines in transcripts(root, "demo", trial_id).values()
        for line in lines
        if line["type"] == "llm_call" and line.get("status") == 200
    ]
    assert calls and len(calls) == len(metered) == row["llm_calls"]
    for call in calls:
        flow = metered[call["response_id"]]
        assert flow.usage is not None and not flow.usage.estimated
        assert (flow.usage.prompt_tokens, flow.usage.completion_tokens) == (
            call["usage"]["prompt_tokens"],
            call["usage"]["completion_tokens"],
        )
        assert (flow.trial, flow.machine, flow.provider) == (trial_id, flow.machine, "local")
        assert flow.machine in ("m1", "m2")
    # The confidence judge called through the proxy too: as machine `judge`, for
    # `<assignment>-judge`, metered and priced, apart from the agents' calls.
    ids = {a["id"] for a in view["assignments"]}
    assert judged and {f.assignment for f in judged} == {f"{i}-judge" for i in ids}
    assert all(f.usage is not None and f.cost_usd > 0 for f in judged)

    # The ledger passes bean-check and holds exactly the metered spend: hourly transactions
    # per machine × model, one leg per assignment, reconciled with the index to the cent.
    ledger_path = root.ledger("demo")
    assert bean_check(ledger_path) == []
    result = reconcile(Ledger(ledger_path), index, "demo")
    assert result.ok, [line.describe(result.currency) for line in result.mismatches]
    lines = {line.key: line for line in result.lines}
    for a in view["assignments"]:
        assert lines[a["id"]].kind == "match"
        # Each leg is rounded to 6 decimals, the assignment's cost once: rounding only.
        assert abs(lines[a["id"]].posted - Decimal(a["cost"])) <= Decimal("0.000003")
    for judge in {f.assignment for f in judged}:
        # The judge's spend: posted with the project's next posting (an ending, or the hour's
        # close), so the last ones may still wait; never a mismatch.
        assert lines[judge].kind in ("match", "pending"), lines[judge]
    posted = sum(lines[a["id"]].posted for a in view["assignments"])
    assert abs(posted - Decimal(report["total_cost"])) <= Decimal("0.000003")

    # Patches and grading reports are kept with each assignment; every prompt opens with
    # the budget preamble in the primary currency.
    for a in view["assignments"]:
        folder = root.assignment_dir("demo", trial_id, a["id"])
        assert (folder / "patch.diff").exists() and (folder / "tests.log").exists()
        prompt = (folder / "output" / "prompt.txt").read_text()
        assert prompt.startswith("## Budget\nProject demo has ")
        assert "CAD left of its 5.00 CAD biweekly budget" in prompt
