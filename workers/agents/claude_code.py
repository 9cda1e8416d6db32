"""Claude Code (npm `@anthropic-ai/claude-code`): `claude -p PROMPT --output-format stream-json`.

It speaks the Anthropic Messages API at `$ANTHROPIC_BASE_URL/v1/messages`; the model plane's
CPU server does not serve that route yet, so against local models it fails on its first
call (tested: command and parsing only). Permissions are skipped (`IS_SANDBOX=1` lets it do
so as root): the sandbox is the boundary. `--max-turns` is its step limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workers.agents.base import AgentRun
from workers.agents.headless import HeadlessAgent, origin


@dataclass(frozen=True)
class ClaudeConfig:
    max_turns: int = 20


class ClaudeCodeAgent(HeadlessAgent):
    name = "claude-code"

    def __init__(self, root: Path | None = None, config: ClaudeConfig | None = None) -> None:
        super().__init__(root)
        self.config = config or ClaudeConfig()

    def agent_argv(self, run: AgentRun) -> list[str]:
        return [
            *self.env_prefix(
                run,
                ANTHROPIC_BASE_URL=origin(run.endpoint),
                ANTHROPIC_API_KEY="autovibe-machine-credential",  # the proxy injects real keys
                ANTHROPIC_MODEL=run.model,
                IS_SANDBOX="1",
                DISABLE_AUTOUPDATER="1",
                DISABLE_TELEMETRY="1",
                DISABLE_ERROR_REPORTING="1",
                CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
            ),
            str(self.program),
            "-p", run.prompt,
            "--output-format", "stream-json",
            "--verbose",  # stream-json in -p mode requires it
            "--model", run.model,
            "--max-turns", str(self.config.max_turns),
            "--dangerously-skip-permissions",
        ]  # fmt: skip
