"""`oracle` and `empty`: the two agents `autovibe tasks validate` runs, never a trial.

The oracle applies the task's reference solution (SWE-bench's gold `patch`), which validation
puts in the agent's output folder as `gold.patch`, the way SWE-bench's harness applies a
patch (`git apply`, else `patch --fuzz`); for a Harbor task it runs `solution/solve.sh`
(validation puts its `solution/` folder in the output folder) with bash from where the agent
starts, as Harbor's oracle does. The empty agent changes nothing. A task is valid
when the oracle resolves it and the empty agent does not. Neither is in `AGENTS`, the names a
trial may use (`workers.agents.VALIDATION_AGENTS`), so a trial naming one is refused.
"""

from __future__ import annotations

from pathlib import Path

from workers.agents.base import AgentOutcome, AgentRun, ExitCause

GOLD_PATCH = "gold.patch"
"""The reference solution, in the output folder, for the oracle."""
SOLUTION = "solution"
"""A Harbor task's solution folder, in the output folder, for the oracle: `solve.sh` runs."""
_APPLY = (
    'git -c safe.directory="*" apply --verbose --whitespace=nowarn "$1" '
    '|| patch --batch --fuzz=5 -p1 -i "$1"'
)


def _outcome(run: AgentRun, exit_code: int | None, timed_out: bool) -> AgentOutcome:
    cause: ExitCause = "timeout" if timed_out else "finished" if exit_code == 0 else "crashed"
    return AgentOutcome(cause, exit_code, run.artifacts / "transcript.jsonl")


class OracleAgent:
    name = "oracle"

    def __init__(self, root: Path | None = None) -> None:
        """Nothing installed: git and patch are the host's."""

    def version(self) -> str:
        return "oracle"

    def command(self, run: AgentRun) -> list[str]:
        solve = run.artifacts / SOLUTION / "solve.sh"
        if solve.is_file():
            return ["bash", str(solve)]
        return ["sh", "-c", _APPLY, "oracle", str(run.artifacts / GOLD_PATCH)]

    def collect(self, run: AgentRun, exit_code: int | None, timed_out: bool) -> AgentOutcome:
        return _outcome(run, exit_code, timed_out)

    def read_only_paths(self, root: Path) -> list[Path]:
        return []


class EmptyAgent:
    name = "empty"

    def __init__(self, root: Path | None = None) -> None:
        """Nothing to find."""

    def version(self) -> str:
        return "empty"

    def command(self, run: AgentRun) -> list[str]:
        return ["true"]

    def collect(self, run: AgentRun, exit_code: int | None, timed_out: bool) -> AgentOutcome:
        return _outcome(run, exit_code, timed_out)

    def read_only_paths(self, root: Path) -> list[Path]:
        return []
