"""Cursor CLI: the `cursor-agent` binary at `$AUTOVIBE_CURSOR_AGENT` (or on PATH).

It cannot be installed here (closed download) and talks only to Cursor's own service, with
`CURSOR_API_KEY`; it takes no model base URL. Headless: `-p PROMPT --output-format
stream-json --force` (`--force` runs commands without asking; the sandbox is the boundary).
Tested on command construction and output parsing only.
"""

from __future__ import annotations

from pathlib import Path

from workers.agents import install
from workers.agents.base import AgentRun
from workers.agents.headless import HeadlessAgent


class CursorCliAgent(HeadlessAgent):
    name = "cursor-cli"

    @property
    def program(self) -> Path:
        return install.cursor_binary()

    def version(self) -> str:
        return install.cursor_version()

    def read_only_paths(self, root: Path) -> list[Path]:
        return []  # outside the data root: the sandbox shows the host read-only already

    def agent_argv(self, run: AgentRun) -> list[str]:
        return [
            *self.env_prefix(run),
            str(self.program),
            "-p", run.prompt,
            "--output-format", "stream-json",
            "--force",
            "--model", run.model,
        ]  # fmt: skip
