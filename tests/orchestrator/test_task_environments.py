"""Task environments: a Debian root filesystem built with mmdebstrap from the packages a task
names, cached by content, and used as the sandbox's system folders for the agent and the tests.

The task needs `dc`, which this host lacks: its agent writes what `dc` computes, its test runs
`dc` itself. Through the real API, scheduler, runner and bubblewrap, the environment is built
once (timed: the figure is printed), the second trial finds it built, and both resolve; a
trial without the environment cannot (no `dc` on the host).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from trial_runs import run_to_the_end, sandboxed_api

from workers import environments
from workers.sandbox import require_tools

pytestmark = pytest.mark.slow  # an mmdebstrap build (network: the Debian mirror) and trials

TEST = """\
import subprocess
from pathlib import Path


def test_dc_computes_what_the_agent_wrote():
    dc = subprocess.run(["dc", "-e", "6 7 * p"], capture_output=True, text=True, check=True)
    assert dc.stdout == Path("answer.txt").read_text() == "42\\n"
"""
AGENT = ["sh", "-c", "dc -e '6 7 * p' > answer.txt"]


def trial(name: str, repo: Path, environment: dict[str, Any] | None) -> dict[str, Any]:
    task: dict[str, Any] = {
        "id": "needs-dc", "repo": str(repo), "prompt": "Write 6 x 7 by dc in answer.txt.",
        "test_command": "python -m pytest -q", "timeout_s": 120,
        "fail_to_pass": ["tests/test_dc.py::test_dc_computes_what_the_agent_wrote"],
        "agent_command": AGENT,
    }  # fmt: skip
    if environment is not None:
        task["environment"] = environment
    return {
        "name": name,
        "project": "envs",
        "budget": {"amount": "1", "currency": "CAD", "period": "monthly"},
        "agents": ["command"],
        "model_pairs": ["tiny"],
        "tasks": [task],
    }


def test_a_task_runs_in_the_environment_of_its_packages(tmp_path: Path) -> None:
    require_tools()
    if shutil.which("dc") is not None:
        pytest.fail("this test needs a host without `dc` (apt-get remove dc)")
    repo = tmp_path / "needs-dc"
    (repo / "tests").mkdir(parents=True)
    (repo / "tests" / "test_dc.py").write_text(TEST)
    outcomes = {}
    with sandboxed_api(tmp_path) as (client, platform):
        for name, env in (("bare", None), ("first", {"packages": ["dc"]}),
                          ("again", {"packages": ["dc"]})):  # fmt: skip
            started = time.monotonic()
            resp = client.post("/v1/trials", json=trial(name, repo, env))
            assert resp.status_code == 201, resp.text
            a = run_to_the_end(platform, resp.json()["id"], timeout_s=900)
            outcomes[name] = (a.state, a.status, round(time.monotonic() - started, 1), a)
    print({k: v[:3] for k, v in outcomes.items()})
    assert outcomes["bare"][:2] == ("finished", "unresolved")  # no dc on the host
    assert outcomes["first"][:2] == ("finished", "resolved"), outcomes["first"][3].result
    assert outcomes["again"][:2] == ("finished", "resolved"), outcomes["again"][3].result
    (built,) = (tmp_path / "data" / "environments").glob("*/manifest.json")
    manifest = json.loads(built.read_text())
    assert manifest["packages"] == ["dc"] and manifest["build_s"] > 0
    assert (built.parent / "root" / "usr" / "bin" / "dc").exists()
    # The second trial found it built: well under the build's time.
    assert outcomes["again"][2] < manifest["build_s"], (outcomes, manifest["build_s"])
    phases = outcomes["first"][3].result["phases"]
    assert "environment" in phases


def test_package_names_are_checked_before_mmdebstrap_reads_them(tmp_path: Path) -> None:
    with pytest.raises(environments.BuildFailed, match="not Debian package names: '--hook'"):
        environments.ensure(tmp_path, ["dc", "--hook"])
    assert not (tmp_path / "environments").exists()
