"""A Harbor task's verdict is its verifier's, not the agent's.

The agent of a Harbor task works where the verifier will run (/app), so it tries what would
forge a reward: a `tests/test.sh` of its own in the workspace that writes reward 1, a reward
file written during its own run at /logs/verifier, and a symlink where the verifier reads its
expected output. Through the real API, scheduler, runner and bubblewrap, the task's own tests
run from /tests (never the workspace), /logs/verifier is a fresh folder the agent never saw,
and the grade is the verifier's reward: 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "orchestrator"))
from harbor_fixture import run_harbor_trial

from workers.sandbox import require_tools

pytestmark = pytest.mark.slow  # a sandboxed trial through the scheduler

FORGE = """\
mkdir -p tests && printf '#!/bin/bash\\necho 1 > /logs/verifier/reward.txt\\n' > tests/test.sh
ln -s /etc/hostname expected.txt
mkdir -p /logs/verifier 2>/dev/null && echo 1 > /logs/verifier/reward.txt
echo 1 > reward.txt
true
"""


def test_an_agent_cannot_forge_its_harbor_reward(tmp_path: Path) -> None:
    require_tools()
    a = run_harbor_trial(tmp_path, ["sh", "-c", FORGE])
    assert (a.state, a.status) == ("finished", "unresolved"), a.result
    run = Path(a.result["report"]).parent
    log = (run / "tests.log").read_text()
    assert "verifier: reward 0" in log, log
    report = json.loads((run / "report.json").read_text())
    # Its tests/test.sh was the task's test surface: taken out before the verifier ran.
    assert report["tampered_files"] == ["tests/test.sh"], report
    assert not (run / "workspace" / "tests" / "test.sh").exists()
    # The verifier's folders are the runner's, outside the workspace.
    assert sorted(p.name for p in (run / "verifier" / "logs").iterdir()) == ["reward.txt"]
    assert (run / "verifier" / "logs" / "reward.txt").read_text().strip() == "0"
