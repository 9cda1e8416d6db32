"""JSON log lines from every plane: the proxy (a real mitmdump) and the worker runner."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.logs import JsonFormatter
from contracts.settings import Settings, free_port
from proxy.launch import mitmdump_argv, mitmdump_path, wait_ready
from workers import runner

SCRIPT = """
import logging

from proxy.addons.jsonlog import JsonLog


class Hello:
    def running(self):
        logging.getLogger("autovibe.proxy.test").warning("ready", extra={"trial": "t1"})
        logging.getLogger("autovibe.proxy.test").info("chatter")


addons = [JsonLog(), Hello()]
"""


@pytest.mark.parametrize("verbosity", ["info", "warn"])
def test_mitmdump_logs_json_lines_only(tmp_path: Path, verbosity: str) -> None:
    script = tmp_path / "addon.py"
    script.write_text(SCRIPT)
    port = free_port()
    argv = [
        str(mitmdump_path()),
        "--mode", f"regular@{port}",
        "--listen-host", "127.0.0.1",
        "-s", str(script),
        "--set", f"confdir={tmp_path / 'conf'}",
        "--set", f"termlog_verbosity={verbosity}",
    ]  # fmt: skip
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(argv, stdout=o, stderr=e)
        try:
            deadline = time.monotonic() + 30
            while '"ready"' not in err.read_text():
                assert proc.poll() is None, err.read_text() + out.read_text()
                assert time.monotonic() < deadline, err.read_text() + out.read_text()
                time.sleep(0.1)
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    # mitmdump's plain terminal log is gone, all but the line it prints (at info) before it
    # imports the script that replaces it.
    plain = out.read_text().splitlines()
    assert len(plain) == (verbosity == "info"), plain
    assert all(line.endswith(f"Loading script {script}") for line in plain), plain
    lines = [json.loads(line) for line in err.read_text().splitlines()]
    ready = next(x for x in lines if x["msg"] == "ready")
    assert (ready["level"], ready["logger"], ready["trial"]) == (
        "warning",
        "autovibe.proxy.test",
        "t1",
    )
    msgs = " ".join(x["msg"] for x in lines)
    # mitmproxy's own records go through the same formatter, at the chosen verbosity.
    assert ("proxy listening" in msgs) is (verbosity == "info")
    assert ("chatter" in msgs) is (verbosity == "info")


def test_the_platform_proxy_with_json_logs_starts_and_stops_cleanly(tmp_path: Path) -> None:
    """The real addons, started as the platform starts them (JsonLog first)."""
    configs = Path(__file__).resolve().parents[2] / "configs"
    settings = Settings(
        data=tmp_path / "data", configs=configs, host="127.0.0.1", proxy_port=free_port()
    )
    argv = [
        a if a != "termlog_verbosity=warn" else "termlog_verbosity=info"
        for a in mitmdump_argv(settings)
    ]
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(argv, stdout=o, stderr=e)
        try:
            wait_ready(settings.host, settings.proxy_port, timeout=30, process=proc)
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    assert proc.returncode == 0, err.read_text()
    assert len(out.read_text().splitlines()) == 1  # "Loading script …", before JsonLog exists
    lines = [json.loads(line) for line in err.read_text().splitlines()]
    assert any("proxy listening" in x["msg"] for x in lines), lines


def test_the_worker_runner_logs_json_from_the_start(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        with pytest.raises(FileNotFoundError):
            runner.main(["runner", str(tmp_path / "missing-spec.json")])
        [handler] = root.handlers
        assert isinstance(handler.formatter, JsonFormatter)
        assert getattr(handler, "stream", None) is sys.stderr
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
