"""Child processes the platform and its tests start (servers, proxies, runners): stopping one."""

from __future__ import annotations

import subprocess


def stop(process: subprocess.Popen[bytes], timeout_s: float = 15) -> int:
    """SIGTERM, then SIGKILL if it is still running after `timeout_s`; reaps it and returns its
    exit status (negative: the signal that ended it)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
