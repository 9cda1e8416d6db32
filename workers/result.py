"""The runner's `result.json` as the orchestrator reads it back: a `contracts.results.RunnerResult`.

The file lies in the host-only artifacts folder, but it is still read as untrusted: never
through a symlink, at most `LIMIT` bytes, and nothing the runner does not write (a
`confidence`, a `cancelled`) is accepted from it; a cancel is the orchestrator's own decision.
"""

from __future__ import annotations

from pathlib import Path

from contracts.dataroot import read_untrusted
from contracts.results import RunnerResult

LIMIT = 16 * 1024 * 1024
"""Most bytes read of a result.json; a larger one is cut short and so fails to parse."""


def read_result(path: Path, assignment: str) -> RunnerResult:
    """The result.json at `path` for `assignment`; `OSError` (a symlink, not a regular file)
    or `ValueError` (malformed, not this assignment's) with the reason."""
    result = RunnerResult.model_validate_json(read_untrusted(path, path.parent, LIMIT))
    if result.assignment != assignment:
        raise ValueError(f"it is assignment {result.assignment!r}'s, not {assignment!r}'s")
    return result


def read_patch(artifacts: Path) -> str:
    """The patch the runner wrote in an assignment's folder (`DataRoot.assignment_dir`), ""
    when there is none; never read through a symlink, never from a path a result names."""
    try:
        return read_untrusted(artifacts / "patch.diff", artifacts, LIMIT).decode(errors="replace")
    except OSError:
        return ""
