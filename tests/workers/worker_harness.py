"""What the worker tests share: handles on the real model server and the real metering proxy."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

from contracts.credentials import MachineIdentity, mint, proxy_url
from contracts.dataroot import DataRoot
from contracts.records import FlowRecord
from contracts.settings import PROJECT_ROOT, Settings
from workers.agents.base import AgentOutcome, AgentRun, ExitCause

EXAMPLES = PROJECT_ROOT / "examples"
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def direct_env(**extra: str) -> dict[str, str]:
    """This process's environment without proxy settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    return {**env, **extra}


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass(frozen=True)
class ModelServer:
    settings: Settings

    @property
    def url(self) -> str:
        """OpenAI-compatible base URL, …/v1."""
        return self.settings.model_url


@dataclass(frozen=True)
class MeteringProxy:
    settings: Settings
    root: DataRoot
    key: bytes

    def url_for(self, assignment: str) -> str:
        """HTTP_PROXY value carrying a fresh machine credential for `assignment`."""
        identity = MachineIdentity(
            project="p1",
            trial="t1",
            assignment=assignment,
            machine="m1",
            expires=time.time() + 3600,
        )
        return proxy_url(
            self.settings.host, self.settings.proxy_port, "m1", mint(self.key, identity)
        )

    def spooled(self, assignment: str) -> list[FlowRecord]:
        records = []
        for path in sorted(self.root.traffic_logs.glob("*/*/flows.jsonl")):
            for line in path.read_bytes().splitlines():
                record = FlowRecord.model_validate_json(line)
                if record.assignment == assignment:
                    records.append(record)
        return records


class ScriptAgent:
    """Runs its prompt as a Python program in the workspace: a scripted, model-free agent
    (register it in `workers.agents.AGENTS` as `worker_harness:ScriptAgent`)."""

    name = "script"

    def version(self) -> str:
        return "script"

    def command(self, run: AgentRun) -> list[str]:
        return [sys.executable, "-c", run.prompt]

    def collect(self, run: AgentRun, exit_code: int | None, timed_out: bool) -> AgentOutcome:
        cause: ExitCause = "timeout" if timed_out else "finished" if exit_code == 0 else "crashed"
        return AgentOutcome(cause, exit_code, run.artifacts / "agent.log")
