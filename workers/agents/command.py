"""`command`: any executable as the agent, a user's own agent or the hostile suite's.

The trial names it per task (`agent_command`: argv whose program is a file under the task
roots or a bare name found on PATH, checked when the trial is submitted). It runs like every
agent: in the workspace, sandboxed, with the worker's environment (proxy, CA, model endpoint)
and two more variables: AUTOVIBE_PROMPT_FILE (the prompt, budget preamble first) and
AUTOVIBE_OUTPUT (the output folder: a transcript written to `transcript.jsonl` there is read
back). Its exit code is its ending: 0 finished, any other crashed; killed at the timeout.
"""

from __future__ import annotations

from pathlib import Path

from workers.agents.base import AgentOutcome, AgentRun, ExitCause, read_jsonl

TRANSCRIPT = "transcript.jsonl"
PROMPT = "prompt.txt"


class CommandAgent:
    name = "command"

    def __init__(self, root: Path | None = None) -> None:
        """Nothing to find: the task names the program (`agent_command`)."""

    def version(self) -> str:
        return "command"

    def command(self, run: AgentRun) -> list[str]:
        if not run.agent_command:
            raise ValueError("the `command` agent needs the task's `agent_command`")
        return [
            "env",
            f"AUTOVIBE_PROMPT_FILE={run.artifacts / PROMPT}",
            f"AUTOVIBE_OUTPUT={run.artifacts}",
            *run.agent_command,
        ]

    def collect(self, run: AgentRun, exit_code: int | None, timed_out: bool) -> AgentOutcome:
        transcript = run.artifacts / TRANSCRIPT
        events = read_jsonl(transcript)
        cause: ExitCause = "timeout" if timed_out else "finished" if exit_code == 0 else "crashed"
        return AgentOutcome(cause, exit_code, transcript, detail=f"{len(events)} transcript events")

    def read_only_paths(self, root: Path) -> list[Path]:
        return []  # its program, when under the data root, is shown by the scheduler
