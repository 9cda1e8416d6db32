"""A hostile agent through the whole platform (issue 17, the hostile suite): a trial submitted
to the control API, started by the scheduler on the local driver, run by the runner in
bubblewrap, every call through the real mitmdump.

The trial's `command` agent (`hostile/agent.py trial`) tries, in one run, every way out the
suite knows (forged results and reports, links to host files, reads of its control files, the
data root and another assignment, a signal to a host process, a routing policy allowing the
cloud, cloud calls through the proxy), then meets the limits of the trial's `sandbox:` section
(processes, /tmp, memory, workspace: each small, so each is reached). Asserted from the
scheduler's recorded ending, the API's report, the artifacts and the proxy's capture: the
grade is the real tests', nothing of the host changed, no secret reached what the host shows,
every tick ran and the trial finished, and each attempt is on record.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_hostile_agent import AGENT, digest, tree_digest
from test_secret_exposure import CommandLineWatch, readable_by_others

from contracts.dataroot import DataRoot
from contracts.settings import PROJECT_ROOT, free_port
from orchestrator.state import Assignment
from workers import sandbox
from workers.spec import AssignmentSpec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "orchestrator"))
from proxy_harness import Proxy, metering_proxy
from trial_runs import operator_api, run_to_the_end, trial_settings

SECRET = "orchestrator-secret-" + uuid.uuid4().hex[:8]
PROVIDER_KEY = "sk-proj-" + uuid.uuid4().hex
LIMITS = {"processes": 16, "tmp_mb": 16, "workspace_mb": 16, "memory_mb": 256}
"""The trial's `sandbox:` limits, each far below its default."""
MIB = 1024 * 1024
RUNNERS_FILES = ("agent.log", "tests.log", "runner.log", "patch.diff", "report.json", "result.json")
"""What the runner writes in the artifacts folder, which the agent tries to replace by links."""

pytestmark = pytest.mark.slow  # mitmdump, the API, a runner and two sandboxes: ~10 s on 2 cores


@pytest.fixture
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """mitmdump as the platform starts it, with a provider key in its secret store."""
    running = metering_proxy(
        tmp_path_factory, free_port(), secrets={"providers/openai": PROVIDER_KEY}
    )
    yield next(running)
    next(running, None)


def hostile_trial(repo: Path, agent: list[str]) -> dict[str, object]:
    return {
        "name": "hostile",
        "project": "p1",
        "budget": {"amount": "1", "currency": "USD", "period": "monthly"},
        "agents": ["command"],
        "model_pairs": ["tiny"],
        "confidence": {"enabled": False},
        "sandbox": LIMITS,
        "tasks": [
            {
                "id": "mathkit",
                "repo": str(repo),
                "prompt": "Implement `add`.",
                # Without the plugins of our environment: 0.3 s of pytest, not 3-8 s.
                "test_command": "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python -m pytest -q",
                "fail_to_pass": ["tests/test_basic.py::test_add"],
                "pass_to_pass": ["tests/test_basic.py::test_subtract"],
                "timeout_s": 60,
                "agent_command": agent,
            }
        ],
    }


def test_a_hostile_trial_changes_nothing_but_its_own_grade(
    tmp_path: Path, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox.require_tools()
    root = proxy.root
    monkeypatch.setenv("AUTOVIBE_TEST_SECRET", SECRET)  # the orchestrator's, and so its runners'
    settings = trial_settings(
        tmp_path,
        sandboxed=True,
        data=proxy.settings.data,
        proxy_port=proxy.settings.proxy_port,
        model_port=proxy.settings.model_port,
    )
    repo = shutil.copytree(PROJECT_ROOT / "examples" / "mathkit", tmp_path / "mathkit")
    tag = uuid.uuid4().hex[:8]
    marker = Path("/root") / f"autovibe-marker-{tag}"  # a host secret
    target = Path("/etc") / f"autovibe-target-{tag}"  # a host file the sandbox shows
    other = DataRoot.ensure(root.assignment_dir("p1", "t-other", "a-other") / "workspace")
    (other / "solution.py").write_text("theirs")
    admin = root.secrets / "admin-token"
    admin.write_text("vault-admin-" + uuid.uuid4().hex)
    admin.chmod(0o600)  # as a secret under the data root is kept
    sleeper = subprocess.Popen(["sleep", "300"])
    marker.write_text("host secret " + tag)
    target.write_text("host file\n")
    try:
        with (
            CommandLineWatch([SECRET, PROVIDER_KEY]) as watch,
            operator_api(settings) as (client, platform),
        ):
            reads = [str(marker), str(admin), str(root.secrets / "operator-token"),
                     str(other / "solution.py"), "/etc/shadow"]  # fmt: skip
            agent = ["python3", str(AGENT), "trial", str(sleeper.pid), str(target),
                     str(LIMITS["memory_mb"]), str(LIMITS["tmp_mb"]), *reads]  # fmt: skip
            host = {p: digest(p) for p in (marker, target)} | tree_digest(root.secrets)
            host |= tree_digest(other.parent)
            resp = client.post("/v1/trials", json=hostile_trial(repo, agent))
            assert resp.status_code == 201, resp.text
            trial_id = resp.json()["id"]
            # Every tick in the test's thread: one that raised would fail the test here.
            a = run_to_the_end(platform, trial_id, timeout_s=90)
            view = client.get(f"/v1/trials/{trial_id}").json()
            report = client.get(f"/v1/trials/{trial_id}/report").json()
            with platform.store.session() as s:
                ending = s.get_one(Assignment, a.id).ending
            events = [e.kind for e in platform.store.events_after(trial_id, 0)]
        assert sleeper.poll() is None, "the host's sleep was killed"
        after = {p: digest(Path(p)) for p in host}
    finally:
        sleeper.kill()
        sleeper.wait()
        marker.unlink()
        target.unlink()

    artifacts = root.assignment_dir("p1", trial_id, a.id)
    log = (artifacts / "agent.log").read_text(errors="replace")
    seen = json.loads(next(line for line in log.splitlines() if line.startswith('{"uid"')))

    # The grade is the tests': add still fails, subtract passes; the forgeries were written.
    assert seen["forged"][str(artifacts / "workspace" / "result.json")] == "ok", log
    assert seen["forged"][str(artifacts / "output" / "report.json")] == "ok", log
    assert (view["status"], a.state, a.status) == ("finished", "finished", "unresolved"), ending
    assert ending.grade is not None and ending.grade.status == "unresolved", ending
    assert ending.grade.fail_to_pass == {"tests/test_basic.py::test_add": "FAILED"}, ending
    assert ending.grade.pass_to_pass == {"tests/test_basic.py::test_subtract": "PASSED"}, ending
    assert [(r["resolved"], r["n"]) for r in report["rows"]] == [(0, 1)], report["rows"]
    runner_report = json.loads((artifacts / "report.json").read_text())
    assert (runner_report["assignment"], runner_report["resolved"]) == (a.id, False)
    assert "assignment_retried" not in events and a.attempts == 1, events

    # Nothing of the host changed: its files, the data root's secrets, another assignment.
    assert after == host
    for name in RUNNERS_FILES:
        assert not (artifacts / name).is_symlink(), name
    assert all(v == "ok" for k, v in seen["linked"].items() if "/output/" in k), seen["linked"]
    # What it could not see it could not read, list, signal or rewrite.
    # (/etc/shadow reads empty: /dev/null stands in its place.)
    unread = ("FileNotFoundError", "PermissionError")
    assert all(v == "" or v.startswith(unread) for v in seen["read"].values()), seen["read"]
    assert seen["listed"] == {
        str(artifacts): ["output", "workspace"],
        str(artifacts.parent): [a.id],
        str(artifacts.parent.parent): [trial_id],
    }
    assert seen["signal"]["kill"].startswith("ProcessLookupError"), seen["signal"]
    assert seen["routing"]["found"] == [], seen["routing"]

    # The cloud: `auto` is refused by the trial's routing policy, a provider's host over the
    # proxy by the egress policy; both in the capture, neither an infrastructure failure.
    cloud = seen["cloud"]
    assert "cloud_not_allowed" in cloud["auto"]["body"], cloud
    assert "egress_refused" in cloud["provider"]["body"], cloud
    captured = sorted((r.status, r.error) for r in proxy.spooled() if r.assignment == a.id)
    assert captured == [(403, "cloud_not_allowed"), (403, "egress_refused")], captured

    # The trial's limits reached its spec and its sandbox, and held.
    spec = AssignmentSpec.model_validate_json((artifacts / "spec.json").read_text())
    assert spec.sandbox is not None
    assert {k: getattr(spec.sandbox, k) for k in LIMITS} == LIMITS
    assert seen["limits"] == {
        "processes": LIMITS["processes"],
        "address_space": LIMITS["memory_mb"] * MIB,
        "file_size": LIMITS["workspace_mb"] * MIB,
        "tmp_bytes": LIMITS["tmp_mb"] * MIB,
    }, seen["limits"]
    assert seen["memory"] == "MemoryError"
    assert seen["tmp"]["written_mb"] <= LIMITS["tmp_mb"], seen["tmp"]
    assert "No space left" in seen["tmp"]["error"], seen["tmp"]
    assert seen["processes"]["children"] < LIMITS["processes"], seen["processes"]
    assert "BlockingIOError" in seen["processes"]["error"], seen["processes"]
    assert ending.agent is not None and ending.agent.exit_cause == "crashed", ending
    assert f"over the {LIMITS['workspace_mb'] * MIB} limit" in ending.agent.detail, ending

    # No secret in what the host shows: the artifacts, the API's answers, the capture.
    secrets = [
        SECRET,
        PROVIDER_KEY,
        admin.read_text(),
        (root.secrets / "operator-token").read_text(),
    ]
    shown = [json.dumps(view).encode(), json.dumps(report).encode()]
    shown += [p.read_bytes() for p in artifacts.rglob("*") if p.is_file() and not p.is_symlink()]
    shown += [path.read_bytes() for path in root.traffic_logs.glob("*/*/flows.jsonl")]
    assert not [s for s in secrets if any(s.strip().encode() in data for data in shown)]
    assert not any(b"[REDACTED]" in data for data in shown)  # nor had any to be taken out
    # Nor on any process's command line while the trial ran (API, scheduler, proxy, tmux,
    # runner, bubblewrap, the agent, grading), the machine's minted credential included; and
    # every file of the data root holding one is its owner's alone, but for what the agent
    # wrote itself with the credential it was given (its transcript dumps its environment).
    token = spec.env["AUTOVIBE_MACHINE_TOKEN"]
    assert watch.rounds > 0
    assert not [line for line in watch.lines if any(s.strip() in line for s in [*secrets, token])]
    assert readable_by_others(root.root, [s.strip() for s in secrets]) == []
    agents = (
        artifacts.relative_to(root.root) / "workspace",
        artifacts.relative_to(root.root) / "output",
    )
    exposed = [
        f
        for f in readable_by_others(root.root, [token])
        if not f.startswith(tuple(map(str, agents)))
    ]
    assert exposed == []
    assert "AUTOVIBE_TEST_SECRET" not in seen["environ"]
