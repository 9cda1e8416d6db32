"""The model server dies mid-trial (SIGKILL), on the real stack: llama.cpp, mitmdump, API.

With restarts allowed, the scheduler's supervisor starts it again, the assignments whose calls
fell in the gap end `model_unreachable` and run again, and the report names the failed calls.
With no restart allowed, every assignment ends `infra_error` (never `unresolved`) and
`autovibe demo` exits non-zero naming them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from orchestrator import stack
from orchestrator.client import Client
from tests.test_e2e import wait_finished
from traffic.sqlite_store import SqliteTrafficStore

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
AUTOVIBE = str(Path(sys.executable).parent / "autovibe")


def start_stack(data: Path, **overrides: Any) -> Settings:
    settings = Settings(
        data=data,
        configs=ROOT / "configs",
        api_port=free_port(),
        proxy_port=free_port(),
        model_port=free_port(),
        **overrides,
    )
    stack.up(settings)
    return settings


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[Settings]:
    settings = start_stack(tmp_path / "data")
    yield settings
    stack.down(settings)


@pytest.fixture
def not_restartable(tmp_path: Path) -> Iterator[Settings]:
    settings = start_stack(tmp_path / "data", model_restarts=0)
    yield settings
    stack.down(settings)


def kill_model_once_calls_flow(root: DataRoot, timeout_s: float = 180) -> int:
    """SIGKILL the model server's whole group as soon as an agent's call went through it (the
    agent is mid-run: its next call falls in the gap); the killed pid."""
    deadline = time.monotonic() + timeout_s
    with SqliteTrafficStore(root.traffic_index) as index:
        while time.monotonic() < deadline:
            index.catch_up(root.traffic_logs)
            if any(f.status == 200 for f in index.flows(project="demo")):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("no model call went through the proxy")
    pid = stack.running_pid(root, "model")
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    return pid


def quick_trial(demo_trial: dict[str, Any], name: str) -> dict[str, Any]:
    """The demo's quickest task twice: two assignments on two machines. The tiny model fills
    both of mathkit's stubs at the first, greedy attempt; textkit's second stub takes three
    attempts, and its run again after the gap was most of the first test's time."""
    trial = {**demo_trial, "name": name, "tasks": demo_trial["tasks"][:1]}
    trial["assignment"] = {**trial["assignment"], "trials_per_task": 2}
    return trial


def test_killed_model_server_is_restarted_and_the_gap_is_retried(
    restartable: Settings, demo_trial: dict[str, Any]
) -> None:
    settings, root = restartable, DataRoot.at(restartable.data)
    client = Client(settings)
    trial = quick_trial(demo_trial, "outage")
    trial_id = client.submit(trial)["id"]
    env = {**os.environ, **settings.as_env()}
    watch = subprocess.Popen(
        [AUTOVIBE, "trial", "watch", trial_id],
        env={**env, "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    killed = kill_model_once_calls_flow(root)

    view = wait_finished(client, trial_id)
    events = list(client.events(trial_id))
    restarts = [d for kind, d in events if kind == "model_server_restarted"]
    assert restarts and restarts[0]["ok"] is True, events
    retried = [d for kind, d in events if kind == "assignment_retried"]
    assert retried, f"no assignment hit the gap: {events}"
    assert {d["cause"] for d in retried} == {"model_unreachable"}
    # Run again after the restart, and scored on that run: none is left an infra error.
    by_id = {a["id"]: a for a in view["assignments"]}
    for d in retried:
        assert by_id[d["assignment"]]["attempts"] >= 2
    assert [a["state"] for a in view["assignments"]] == ["finished"] * 2
    assert all(a["status"] in ("resolved", "partial", "unresolved") for a in by_id.values())
    new_pid = stack.running_pid(root, "model")
    assert new_pid is not None and new_pid != killed

    report = client.report(trial_id)
    assert report["infra_errors"] == []
    assert sum(r["failed_calls"] for r in report["rows"]) >= len(retried)

    out, _ = watch.communicate(timeout=60)
    assert watch.returncode == 0, out
    assert "2/2" in out and "3/2" not in out, out
    assert "run again after model_unreachable" in out, out


def test_demo_exits_non_zero_when_the_model_server_dies_for_good(
    not_restartable: Settings, demo_trial: dict[str, Any], tmp_path: Path
) -> None:
    settings, root = not_restartable, DataRoot.at(not_restartable.data)
    trial_file = tmp_path / "trial.yaml"
    trial_file.write_text(yaml.safe_dump(quick_trial(demo_trial, "demo")))
    demo = subprocess.Popen(
        [AUTOVIBE, "demo", "--file", str(trial_file)],
        cwd=ROOT,
        env={**os.environ, **settings.as_env(), "COLUMNS": "250"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    kill_model_once_calls_flow(root)
    out, _ = demo.communicate(timeout=600)
    assert demo.returncode == 1, out
    assert "ended in infra_error" in out and "model_unreachable" in out, out
    assert "Infrastructure errors:" in out, out
    client = Client(settings)
    (trial,) = client.trials()
    view = client.trial(trial["id"])
    failed = [a for a in view["assignments"] if a["status"] == "infra_error"]
    assert failed, view
    assert all(a["state"] == "failed" and a["attempts"] == 3 for a in failed), failed
    # Never scored as the agent's: no assignment that met the outage is `unresolved`.
    report = client.report(trial["id"])
    assert len(report["infra_errors"]) == len(failed)
    kinds = [kind for kind, _ in client.events(trial["id"])]
    assert "model_server_down" in kinds
