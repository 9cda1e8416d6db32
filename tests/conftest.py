"""Shared fixtures: the demo trial as a dict with absolute task repos; and the order in which
the test files are handed to the workers (longest first, tests/durations.py)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import durations

ROOT = Path(__file__).resolve().parent.parent


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first, by the tests selected (after `-m`), each file's tests in their
    own order (a stable sort)."""
    seconds = durations.file_seconds(item.nodeid for item in items)
    items.sort(key=lambda item: -seconds[item.nodeid.partition("::")[0]])


@pytest.fixture
def demo_trial() -> dict[str, Any]:
    """configs/trials/demo.yaml with task repos made absolute."""
    data: dict[str, Any] = yaml.safe_load((ROOT / "configs/trials/demo.yaml").read_text())
    for task in data["tasks"]:
        task["repo"] = str((ROOT / "configs/trials" / task["repo"]).resolve())
    return data


RECURSION_LIMIT = sys.getrecursionlimit()


@pytest.fixture(autouse=True)
def _recursion_limit() -> Iterator[None]:
    """Each test starts at the interpreter's recursion limit: a library imported by an earlier
    test in the same worker may have raised it (py_ecc, under web3, sets 100000), and then a
    test of deeply nested input overflows the C stack (a segfault) instead of raising
    RecursionError."""
    sys.setrecursionlimit(RECURSION_LIMIT)
    yield


@pytest.fixture(autouse=True)
def _mitmproxy_log_handlers() -> Iterator[None]:
    """No mitmproxy master outlives its test on the root logger. A master made in-process
    (mitmproxy.test.taddons.context, a DumpMaster built to read its addon chain) installs a
    handler that forwards every log record to its event loop, and only its `done` removes it;
    left behind, a record logged after that loop closed (asyncio's own debug line as the next
    loop starts, when an earlier test has left the level at DEBUG) raises 'Event loop is
    closed' in whichever test logs it."""
    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for handler in list(root.handlers):
        if handler not in before and type(handler).__module__ == "mitmproxy.log":
            root.removeHandler(handler)
