"""Qwen Code (npm `@qwen-code/qwen-code`): headless `qwen -p PROMPT --output-format stream-json`.

OpenAI-compatible: `--auth-type openai` with the model plane's base URL and model name (also
in `OPENAI_BASE_URL` / `OPENAI_MODEL`); `--yolo` approves every tool call (the sandbox is
the boundary); `--max-session-turns` is its step limit. It reaches the model through the
worker's `HTTPS_PROXY` (its `proxy` setting defaults to it). Its settings file in the agent's
HOME turns off usage statistics, telemetry and the update check: nothing but model calls
leaves the sandbox. A reply with no text is retried twice, then reported as an `[API Error`
answer, which `collect` counts as a crash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from workers.agents.base import AgentRun
from workers.agents.headless import HeadlessAgent

COMPACT_SYSTEM = (
    "You are a coding agent working in the current directory. Use the tools to read and edit "
    "files and to run shell commands. Stop when the task is done."
)
COMPACT_TOOLS = ("read_file", "edit", "run_shell_command")
"""Tools offered in compact mode; the full set's schemas alone are ~6k tokens."""
ALWAYS_ON_TOOLS = (
    "agent", "skill", "tool_search", "task_stop", "send_message", "ask_user_question",
    "exit_plan_mode",
)  # fmt: skip
"""Tools qwen-code adds whatever `--core-tools` says; compact mode excludes them by name."""
SETTINGS = {
    "privacy": {"usageStatisticsEnabled": False},
    "telemetry": {"enabled": False},
    "general": {"enableAutoUpdate": False},
    "memory": {"enableManagedAutoMemory": False},
}
"""`~/.qwen/settings.json`: no traffic but model calls (usage statistics go to Alibaba Cloud by
default), and no memory across sessions (every assignment starts from an empty HOME anyway;
the memory instructions alone are ~2k tokens of prompt). `--bare` would ignore this file."""


@dataclass(frozen=True)
class QwenConfig:
    max_turns: int = 20
    """Session turns before qwen-code stops (`--max-session-turns`)."""
    max_tokens: int | None = None
    """Completion length per call (`QWEN_CODE_MAX_OUTPUT_TOKENS`); None: qwen-code's own
    adaptive limit (8k, retried at 64k when cut)."""
    compact: bool = False
    """A short system prompt and three tools instead of qwen-code's ~8k-token prompt: for
    small local models with small contexts on a CPU."""


class QwenCodeAgent(HeadlessAgent):
    name = "qwen-code"

    def __init__(self, root: Path | None = None, config: QwenConfig | None = None) -> None:
        super().__init__(root)
        self.config = config or QwenConfig()

    def agent_argv(self, run: AgentRun) -> list[str]:
        c = self.config
        settings = self.home(run) / ".qwen" / "settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps(SETTINGS, indent=2) + "\n")
        limits = {} if c.max_tokens is None else {"QWEN_CODE_MAX_OUTPUT_TOKENS": str(c.max_tokens)}
        compact = []
        if c.compact:
            compact = ["--system-prompt", COMPACT_SYSTEM]
            for tool in COMPACT_TOOLS:
                compact += ["--core-tools", tool]
            for tool in ALWAYS_ON_TOOLS:
                compact += ["--exclude-tools", tool]
        return [
            *self.env_prefix(
                run,
                OPENAI_BASE_URL=run.endpoint,
                OPENAI_MODEL=run.model,
                OPENAI_API_KEY="autovibe-machine-credential",  # the proxy injects real keys
                QWEN_TELEMETRY_ENABLED="false",
                **limits,
            ),
            str(self.program),
            "-p", run.prompt,
            "--output-format", "stream-json",
            "--auth-type", "openai",
            "--openai-base-url", run.endpoint,
            "--model", run.model,
            "--yolo",
            "--max-session-turns", str(c.max_turns),
            *compact,
        ]  # fmt: skip
