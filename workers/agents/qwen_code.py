"""Qwen Code (npm `@qwen-code/qwen-code`): headless `qwen -p PROMPT --output-format stream-json`.

OpenAI-compatible: `--auth-type openai` with the model plane's base URL and model name (also
in `OPENAI_BASE_URL` / `OPENAI_MODEL`); `--yolo` approves every tool call (the sandbox is
the boundary); `--max-session-turns` is its step limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workers.agents.base import AgentRun
from workers.agents.headless import HeadlessAgent


@dataclass(frozen=True)
class QwenConfig:
    max_turns: int = 20


class QwenCodeAgent(HeadlessAgent):
    name = "qwen-code"

    def __init__(self, root: Path | None = None, config: QwenConfig | None = None) -> None:
        super().__init__(root)
        self.config = config or QwenConfig()

    def agent_argv(self, run: AgentRun) -> list[str]:
        return [
            *self.env_prefix(
                run,
                OPENAI_BASE_URL=run.endpoint,
                OPENAI_MODEL=run.model,
                OPENAI_API_KEY="autovibe-machine-credential",  # the proxy injects real keys
            ),
            str(self.program),
            "-p", run.prompt,
            "--output-format", "stream-json",
            "--auth-type", "openai",
            "--openai-base-url", run.endpoint,
            "--model", run.model,
            "--yolo",
            "--max-session-turns", str(self.config.max_turns),
        ]  # fmt: skip
