"""The runner ends without the interpreter's teardown (`workers.runner.exit_now`), its output
whole: what it printed and logged last is not lost in a buffer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from contracts.settings import PROJECT_ROOT


def test_exit_now_flushes_what_was_printed_and_logged_and_keeps_the_status() -> None:
    code = (
        "import logging\n"
        "from common.logs import configure\n"
        "from workers.runner import exit_now\n"
        "configure()\n"
        "logging.getLogger('runner').warning('last words')\n"
        "print('printed last', end='')\n"  # stdout is a pipe: block-buffered
        "exit_now(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env=env,
        timeout=60,
    )

    assert done.returncode == 3
    assert done.stdout == "printed last"
    assert [json.loads(line)["msg"] for line in done.stderr.splitlines()] == ["last words"]
