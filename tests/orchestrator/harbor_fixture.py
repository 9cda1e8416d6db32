"""A Harbor task folder in Harbor's layout, and a trial that runs it with the `command`
agent through the API and the scheduler, sandboxed (shared by the orchestrator's tests and the
security suite's)."""

from __future__ import annotations

from pathlib import Path

from trial_runs import run_to_the_end, sandboxed_api

from orchestrator.harborimport import import_harbor
from orchestrator.state import Assignment

TEST_SH = """\
#!/bin/bash
# Harbor's verifier: run from the task's workdir, its files at /tests, the reward to /logs.
cd /app
expected=$(cat /tests/expected.txt)
if [ "$(bash greet.sh)" = "$expected" ]; then
  echo 1 > /logs/verifier/reward.txt
else
  echo 0 > /logs/verifier/reward.txt
fi
"""
SOLVE_SH = "#!/bin/bash\nprintf 'echo \"Hello, world!\"\\n' > /app/greet.sh\n"


def write_task(folder: Path, *, solved: bool = False) -> Path:
    (folder / "environment").mkdir(parents=True)
    (folder / "tests").mkdir()
    (folder / "solution").mkdir()
    (folder / "task.toml").write_text(
        'version = "1.0"\n\n[metadata]\ndifficulty = "easy"\n\n'
        "[agent]\ntimeout_sec = 120.0\n\n[verifier]\ntimeout_sec = 60.0\n"
    )
    (folder / "instruction.md").write_text("Make /app/greet.sh print `Hello, world!`.\n")
    (folder / "environment" / "Dockerfile").write_text("FROM debian:bookworm\nWORKDIR /app\n")
    greeting = "Hello, world!" if solved else "Helo wrld"
    (folder / "environment" / "greet.sh").write_text(f'echo "{greeting}"\n')
    (folder / "tests" / "test.sh").write_text(TEST_SH)
    (folder / "tests" / "expected.txt").write_text("Hello, world!\n")
    (folder / "solution" / "solve.sh").write_text(SOLVE_SH)
    return folder


def run_harbor_trial(tmp_path: Path, agent_command: list[str]) -> Assignment:
    """Import `write_task(tmp_path / "fix-greeting")` and run it in a trial with the `command`
    agent running `agent_command`, sandboxed; the assignment when it ended."""
    trial = {
        "name": "harbor-trial",
        "project": "harbor",
        "budget": {"amount": "1", "currency": "CAD", "period": "monthly"},
        "agents": ["command"],
        "model_pairs": ["tiny"],
        "tasks": {"set": tmp_path.name, "ids": ["fix-greeting"], "agent_command": agent_command},
    }
    with sandboxed_api(tmp_path) as (client, platform):
        import_harbor(write_task(tmp_path / "fix-greeting").parent, platform.root)
        resp = client.post("/v1/trials", json=trial)
        assert resp.status_code == 201, resp.text
        return run_to_the_end(platform, resp.json()["id"])
