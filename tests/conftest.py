"""Shared fixtures: the demo trial as a dict with absolute task repos."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo_trial() -> dict[str, Any]:
    """configs/trials/demo.yaml with task repos made absolute."""
    data: dict[str, Any] = yaml.safe_load((ROOT / "configs/trials/demo.yaml").read_text())
    for task in data["tasks"]:
        task["repo"] = str((ROOT / "configs/trials" / task["repo"]).resolve())
    return data
