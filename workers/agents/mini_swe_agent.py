"""mini-swe-agent (PyPI `mini-swe-agent`): the `mini` program, text-based actions, no prompts.

Run with the text-based config (`mini_textbased.yaml`: one bash block per reply; small local
models rarely produce well-formed tool calls), the model routed through litellm as
`openai/<model>` at the model plane's base URL, the `default` agent class (never asks a
person), a step limit and a wall-time limit below the runner's timeout. litellm knows no
price for our models: cost tracking is set to ignore, and the cost limit to 0 (off); the
proxy meters and limits spend. The trajectory (`trajectory.json`, mini-swe-agent-1.1
format) is the transcript; mini-swe-agent saves it after every step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.agents.base import AgentOutcome, AgentRun, AgentUsage, read_output
from workers.agents.installed import InstalledAgent, add_usage, exit_cause

TRAJECTORY = "trajectory.json"


@dataclass(frozen=True)
class MiniConfig:
    step_limit: int = 20
    """Model calls before mini-swe-agent stops with LimitsExceeded."""
    max_tokens: int = 256
    """Completion length per call."""
    command_timeout_s: int = 60
    """Each bash action is killed after this long."""
    wall_time_share: float = 0.9
    """Of the runner's timeout: the agent stops itself first and saves its trajectory."""
    retries: int = 2
    """Attempts per model call (mini-swe-agent's default of 10 waits minutes on a 402)."""
    compact: bool = False
    """Short system and instance templates instead of mini_textbased.yaml's ~1k tokens: for
    small local models with small contexts on a CPU."""


COMPACT_SYSTEM = (
    "You are a coding agent in a shell. Reply with one bash command in a ```mswea_bash_command "
    "block. When the task is done, run: echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"
)
COMPACT_INSTANCE = "{{task}}"


class MiniSweAgent(InstalledAgent):
    name = "mini-swe-agent"

    def __init__(self, root: Path | None = None, config: MiniConfig | None = None) -> None:
        super().__init__(root)
        self.config = config or MiniConfig()

    def command(self, run: AgentRun) -> list[str]:
        c = self.config
        wall = max(1, int(run.timeout_s * c.wall_time_share))
        return [
            *self.env_prefix(
                run,
                MSWEA_CONFIGURED="true",  # skips the first-run setup prompt
                MSWEA_SILENT_STARTUP="1",
                MSWEA_GLOBAL_CONFIG_DIR=str(run.artifacts / "mini-swe-agent"),
                MSWEA_COST_TRACKING="ignore_errors",
                MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT=str(c.retries),
                LITELLM_LOCAL_MODEL_COST_MAP="True",  # no price-list download at start
            ),
            str(self.program),
            "--config", "mini_textbased.yaml",
            "--config", f"agent.step_limit={c.step_limit}",
            "--config", f"agent.wall_time_limit_seconds={wall}",
            "--config", f"model.model_kwargs.api_base={run.endpoint}",
            "--config", f"model.model_kwargs.max_tokens={c.max_tokens}",
            "--config", "model.cost_tracking=ignore_errors",
            "--config", f"environment.timeout={c.command_timeout_s}",
            "--config", f"environment.cwd={run.workspace}",
            *self._compact(),
            "--agent-class", "default",
            "--model-class", "litellm_textbased",
            "--model", f"openai/{run.model}",
            "--task", run.prompt,
            "--yolo",
            "--exit-immediately",
            "--cost-limit", "0",
            "--output", str(run.artifacts / TRAJECTORY),
        ]  # fmt: skip

    def _compact(self) -> list[str]:
        if not self.config.compact:
            return []
        return [
            "--config", f"agent.system_template={COMPACT_SYSTEM}",
            "--config", f"agent.instance_template={COMPACT_INSTANCE}",
        ]  # fmt: skip

    def collect(self, run: AgentRun, exit_code: int | None, timed_out: bool) -> AgentOutcome:
        transcript = run.artifacts / TRAJECTORY
        trajectory = _load(transcript)
        info: dict[str, Any] = trajectory.get("info") or {}
        messages: list[dict[str, Any]] = trajectory.get("messages") or []
        usage = AgentUsage()
        for message in messages:
            extra = message.get("extra") or {}
            response = extra.get("response")
            if isinstance(response, dict):
                usage.calls += 1
                add_usage(usage, response.get("usage"))
        status = str(info.get("exit_status") or "")
        error = " ".join(
            str((m.get("extra") or {}).get("exception_str") or "")
            for m in messages
            if m.get("role") == "exit"
        )
        cause = exit_cause(exit_code, timed_out or status == "TimeExceeded", error)
        if trajectory:
            calls = (info.get("model_stats") or {}).get("api_calls", usage.calls)
            detail = f"exit status {status or 'none'} after {calls} model calls"
        else:
            detail = f"no {TRAJECTORY}: the agent ended before its first step"
        if error.strip():
            detail += f": {error.strip()[:300]}"
        return AgentOutcome(
            exit_cause=cause,
            exit_code=exit_code,
            transcript=transcript,
            usage=usage,
            version=self.version(),
            detail=detail,
        )


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_output(path) or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
