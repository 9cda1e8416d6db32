"""Claude Code (npm `@anthropic-ai/claude-code`): `claude -p PROMPT --output-format stream-json`.

It speaks the Anthropic Messages API at `$ANTHROPIC_BASE_URL/v1/messages`, which the model
plane serves for local models too (vLLM natively, the CPU server by translation), and reaches
it through the worker's `HTTP(S)_PROXY`. Every model name it may use (main, small/fast, the
haiku/sonnet/opus aliases) is the run's model: a call to any other would be refused by the
proxy, which has no price for it. Permissions are skipped (`IS_SANDBOX=1` lets it do so as
root): the sandbox is the boundary. `--max-turns` is its step limit. When a reply stops at
max_tokens, Claude Code asks the model to go on (up to three times) within the same turn.

Its prompt is large: ~2.9k tokens of system prompt and skill/agent listings (the CPU server
does not show the model the ~16k tokens of tool schemas). Compact mode replaces the system
prompt and drops the skill listing (~0.6k tokens in all), for small models with small contexts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workers.agents.base import AgentRun
from workers.agents.headless import HeadlessAgent, origin

COMPACT_SYSTEM = (
    "You are a coding agent working in the current directory. Use the tools to read and edit "
    "files and to run shell commands. Stop when the task is done."
)


@dataclass(frozen=True)
class ClaudeConfig:
    max_turns: int = 20
    """Agentic turns before Claude Code stops (`--max-turns`)."""
    max_output_tokens: int | None = None
    """Completion length per call (`CLAUDE_CODE_MAX_OUTPUT_TOKENS`); None: Claude Code's own
    (32k), which the CPU server caps at the context left."""
    compact: bool = False
    """A short system prompt and no skill listing (`--system-prompt`,
    `--disable-slash-commands`): for small local models with small contexts on a CPU."""


class ClaudeCodeAgent(HeadlessAgent):
    name = "claude-code"

    def __init__(self, root: Path | None = None, config: ClaudeConfig | None = None) -> None:
        super().__init__(root)
        self.config = config or ClaudeConfig()

    def agent_argv(self, run: AgentRun) -> list[str]:
        c = self.config
        limits = {}
        if c.max_output_tokens is not None:
            limits["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(c.max_output_tokens)
        compact = []
        if c.compact:
            compact = ["--system-prompt", COMPACT_SYSTEM, "--disable-slash-commands"]
        return [
            *self.env_prefix(
                run,
                ANTHROPIC_BASE_URL=origin(run.endpoint),
                ANTHROPIC_API_KEY="autovibe-machine-credential",  # the proxy injects real keys
                ANTHROPIC_MODEL=run.model,
                ANTHROPIC_SMALL_FAST_MODEL=run.model,
                ANTHROPIC_DEFAULT_HAIKU_MODEL=run.model,
                ANTHROPIC_DEFAULT_SONNET_MODEL=run.model,
                ANTHROPIC_DEFAULT_OPUS_MODEL=run.model,
                IS_SANDBOX="1",
                DISABLE_AUTOUPDATER="1",
                DISABLE_TELEMETRY="1",
                DISABLE_ERROR_REPORTING="1",
                CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
                **limits,
            ),
            str(self.program),
            "-p", run.prompt,
            "--output-format", "stream-json",
            "--verbose",  # stream-json in -p mode requires it
            "--model", run.model,
            "--max-turns", str(c.max_turns),
            "--dangerously-skip-permissions",
            *compact,
        ]  # fmt: skip
