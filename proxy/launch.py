"""How the proxy process is started: the mitmdump command line, and waiting for it to listen."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from contracts.dataroot import DataRoot
from contracts.settings import Settings

ADDON_SCRIPT = Path(__file__).resolve().parent / "addon.py"


def mitmdump_path() -> Path:
    """mitmdump from the virtual environment running this interpreter."""
    # Not resolved: a venv's python is a symlink to the base interpreter, outside the venv.
    path = Path(sys.executable).parent / "mitmdump"
    if not path.exists():
        raise FileNotFoundError(
            f"no mitmdump next to {sys.executable}; install the project (uv sync) in that venv"
        )
    return path


def mitmdump_argv(settings: Settings) -> list[str]:
    """The command that runs the metering proxy on `settings.host:settings.proxy_port`."""
    root = DataRoot.at(settings.data)
    return [
        str(mitmdump_path()),
        "--mode",
        f"regular@{settings.proxy_port}",
        "--listen-host",
        settings.host,
        "-s",
        str(ADDON_SCRIPT),
        "--set",
        f"confdir={root.proxy_confdir}",
        "--set",
        f"autovibe_data={root.root}",
        "--set",
        f"autovibe_configs={Path(settings.configs).resolve()}",
        "--set",
        f"autovibe_model_hosts={settings.host}:{settings.model_port}",
        *_budget_options(settings),
        "--set",
        "termlog_verbosity=warn",
        "--set",
        "flow_detail=0",
    ]


def wait_ready(
    host: str,
    port: int,
    timeout: float,
    process: subprocess.Popen[bytes] | subprocess.Popen[str] | None = None,
) -> None:
    """Return once `host:port` accepts connections; TimeoutError after `timeout` seconds.

    With `process`, fail at once (RuntimeError) if it exits before listening.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from exc
        time.sleep(0.05)


def _budget_options(settings: Settings) -> list[str]:
    """The counter store, only when not the embedded default: a second `--set` of the same
    option (a caller adding its own) must not compete with ours."""
    options = []
    if settings.budget_store != "sqlite":
        options += ["--set", f"autovibe_budget_store={settings.budget_store}"]
    if settings.budget_redis_url:
        options += ["--set", f"autovibe_budget_redis_url={settings.budget_redis_url}"]
    return options
