"""Shared fixtures: free ports, an isolated data root, the demo trial as a dict."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def demo_trial() -> dict[str, Any]:
    """configs/trials/demo.yaml with task repos made absolute."""
    data: dict[str, Any] = yaml.safe_load((ROOT / "configs/trials/demo.yaml").read_text())
    for task in data["tasks"]:
        task["repo"] = str((ROOT / "configs/trials" / task["repo"]).resolve())
    return data
