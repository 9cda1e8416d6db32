"""The agent adapter port: workspace + prompt + endpoint in; outcome, transcript, usage out.

An adapter only says how to start its agent and how to read what it left behind; the runner
(`workers.runner`) starts it in its own process group, enforces the timeout and grades.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from contracts.dataroot import read_untrusted
from contracts.results import ExitCause as ExitCause  # the adapters take it from here


@dataclass(frozen=True)
class AgentRun:
    """Everything an agent is given for one assignment."""

    workspace: Path
    """The agent's own copy of the task repository; the only place it should write."""
    prompt: str
    """Task prompt, starting with the budget preamble."""
    endpoint: str
    """OpenAI-compatible base URL of the model plane, e.g. http://127.0.0.1:8500/v1."""
    model: str
    """Served model name, `<pair>` or `<pair>:thinking`."""
    artifacts: Path
    """Folder for the transcript and anything else the agent leaves for the operator (the
    assignment's `output/`, writable in the sandbox like the workspace)."""
    timeout_s: int
    log: Path | None = None
    """The runner's copy of the agent's stdout and stderr (host-only); None: not kept."""
    agent_command: tuple[str, ...] = ()
    """The program the `command` agent runs (the task's `agent_command`)."""


@dataclass
class AgentUsage:
    """What the agent itself says it used (the proxy's metering is the authority)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class AgentOutcome:
    exit_cause: ExitCause
    exit_code: int | None
    transcript: Path
    usage: AgentUsage = field(default_factory=AgentUsage)
    version: str = "unknown"
    detail: str = ""

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["transcript"] = str(self.transcript)
        return data


class Agent(Protocol):
    """One coding agent, picked by `name` in the trial config."""

    name: str

    def version(self) -> str:
        """Version recorded with every run."""
        ...

    def command(self, run: AgentRun) -> list[str]:
        """argv that runs the agent to completion, non-interactively, in `run.workspace`."""
        ...

    def collect(self, run: AgentRun, exit_code: int | None, timed_out: bool) -> AgentOutcome:
        """Read what the agent left in `run.artifacts` after its process group ended."""
        ...

    def read_only_paths(self, root: Path) -> list[Path]:
        """Folders under data root `root` the agent needs, shown read-only in the sandbox."""
        ...


class UntrustedFile(OSError):
    """A file the agent left cannot be read safely: a symlink, a folder, a device, …"""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path} refused: not a regular file ({why})")
        self.path = path


def read_output(path: Path) -> str:
    """Text of a file the agent wrote ("" when there is none), never through a symlink: the
    agent may have planted `transcript.jsonl -> /etc/shadow`. Refused: `UntrustedFile`."""
    try:
        data = read_untrusted(path, below=path.parent)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise UntrustedFile(path, exc.strerror or str(exc)) from exc
    return data.decode(errors="replace")


def read_jsonl(path: Path) -> list[dict[str, object]]:
    """Complete lines of a JSONL file; a last line cut short by a kill is left out."""
    out = []
    for line in read_output(path).splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
