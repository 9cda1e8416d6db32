"""Loading the crypto payment method leaves the process able to refuse deep JSON."""

from __future__ import annotations

import subprocess
import sys

from contracts.settings import PROJECT_ROOT


def test_the_crypto_method_leaves_the_recursion_limit_alone() -> None:
    """py_ecc (under web3) raises the process's recursion limit to 100000 on import; the control
    API that loads the crypto method would then die of a deeply nested JSON request (a C stack
    overflow, SIGSEGV) instead of raising RecursionError."""
    probe = (
        "import json, sys; import ledger.methods.crypto; print(sys.getrecursionlimit()); "
        "json.loads('[' * 200000)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert proc.stdout.split() == ["1000"], proc.stderr
    assert proc.returncode == 1 and "RecursionError" in proc.stderr, proc.stderr
