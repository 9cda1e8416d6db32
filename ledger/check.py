"""Run the real `bean-check` on a ledger file: the same verdict an operator gets by hand."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def bean_check_executable() -> str:
    """`bean-check` from this interpreter's environment, else from PATH."""
    beside = Path(sys.executable).parent / "bean-check"
    if beside.exists():
        return str(beside)
    found = shutil.which("bean-check")
    if found is None:
        raise FileNotFoundError(
            f"bean-check not found next to {sys.executable} nor on PATH; install beancount>=3.1"
        )
    return found


def bean_check(path: Path, timeout_s: float = 120) -> list[str]:
    """The error lines `bean-check` prints for `path`; an empty list means the ledger passes."""
    proc = subprocess.run(
        [bean_check_executable(), str(path)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if proc.returncode != 0 and not lines:
        lines = [f"bean-check exited with status {proc.returncode}"]
    return lines if proc.returncode != 0 else []
