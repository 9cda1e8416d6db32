"""`python -m traffic.indexer` beside a real mitmdump started with its in-process indexer off.

The proxy only spools; the separate process indexes what it spooled, takes in on SIGTERM what
came after its last round, and after a restart goes on from its offsets with no flow twice.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy.test import taddons

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))
from proxy_harness import Proxy, Upstream, proxy_settings, running_proxy, serve

from budget import open_ample
from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from orchestrator import stack
from proxy.addons.indexer import Indexer
from proxy.launch import mitmdump_argv
from traffic.indexer import READY_FILE, ready_pid, run


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    yield from serve()


@pytest.fixture(scope="module")
def spooling_proxy(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    """mitmdump as the stack starts it: `mitmdump_argv(..., indexer=False)`."""
    settings, root, key = proxy_settings(tmp_path_factory, upstream.port)
    open_ample(root.budget_counters, "p1", ["m1"])
    argv = mitmdump_argv(settings, indexer=False)
    assert "autovibe_indexer=false" in argv
    with running_proxy(settings, root, key, argv) as proxy:
        yield proxy


def call(proxy: Proxy, upstream: Upstream, n: int, tag: str) -> None:
    """`n` metered completions through the proxy, then wait until all are spooled."""
    before = len(proxy.spooled())
    with proxy.client(Proxy.identity("a1")) as client:
        for i in range(n):
            answer = client.post(
                f"{upstream.url}/v1/completions",
                json={"model": "tiny", "prompt": f"{tag}-{i}", "max_tokens": 5},
            )
            assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 5
    while len(proxy.spooled()) < before + n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(proxy.spooled()) == before + n


def start_indexer(proxy: Proxy, interval_s: float, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOVIBE_")}
    env |= {"AUTOVIBE_DATA": str(proxy.root.root), "AUTOVIBE_INDEX_INTERVAL_S": str(interval_s)}
    with log.open("ab") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "traffic.indexer"],
            stderr=err,
            stdout=subprocess.DEVNULL,
            env=env,
        )
    deadline = time.monotonic() + 30
    while ready_pid(proxy.root) != process.pid:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the indexer never got ready"
        time.sleep(0.05)
    # Batch work behind the spool: it yields the CPU to the proxy (Settings.index_nice).
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, process.pid) == min(mine + 10, 19)
    return process


def stop(process: subprocess.Popen[bytes], log: Path) -> dict[str, object]:
    """SIGTERM, exit 0; the `indexer stopped` JSON log line."""
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0, log.read_text()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    stopped: dict[str, object] = [r for r in lines if r["msg"] == "indexer stopped"][-1]
    assert stopped["pid"] == process.pid and stopped["level"] == "info"
    return stopped


def indexed(root: DataRoot) -> tuple[list[str], int, dict[str, int]]:
    """(flow ids as stored, rows in the full-text table, offsets) read straight from SQLite."""
    db = sqlite3.connect(root.traffic_index)
    try:
        ids = [row[0] for row in db.execute("SELECT id FROM flows")]
        (fts,) = db.execute("SELECT count(*) FROM flows_fts").fetchone()
        offsets = dict(db.execute("SELECT path, offset FROM offsets").fetchall())
    finally:
        db.close()
    return ids, fts, offsets


def assert_index_matches_spool(proxy: Proxy) -> None:
    ids, fts, offsets = indexed(proxy.root)
    spooled = [r.id for r in proxy.spooled()]
    assert sorted(ids) == sorted(spooled) and len(set(ids)) == len(ids)
    assert fts == len(ids)
    sizes = {
        p.relative_to(proxy.root.traffic_logs).as_posix(): p.stat().st_size
        for p in proxy.root.traffic_logs.glob("*/*/flows.jsonl")
    }
    assert offsets == sizes


def test_the_indexer_process_indexes_what_the_proxy_spools(
    spooling_proxy: Proxy, upstream: Upstream, tmp_path: Path
) -> None:
    proxy, log = spooling_proxy, tmp_path / "indexer.log"
    call(proxy, upstream, 3, "first")
    # The proxy itself indexes nothing: its store is never opened.
    time.sleep(1.5)  # longer than the in-process indexer's interval
    assert not proxy.root.traffic_index.exists()

    # A long interval: after the first round, only the final catch-up on SIGTERM indexes.
    indexer = start_indexer(proxy, 60, log)
    deadline = time.monotonic() + 15
    while not proxy.root.traffic_index.exists() or len(indexed(proxy.root)[0]) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    call(proxy, upstream, 2, "during")
    assert stop(indexer, log)["flows"] == 5
    assert not (proxy.root.run / READY_FILE).exists()
    assert_index_matches_spool(proxy)

    # Spooled while no indexer runs; a restart takes in exactly those, from its offsets.
    call(proxy, upstream, 2, "down")
    indexer = start_indexer(proxy, 0.1, log)
    call(proxy, upstream, 1, "after")
    deadline = time.monotonic() + 15
    while len(indexed(proxy.root)[0]) < 8:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert stop(indexer, log)["flows"] == 3
    assert_index_matches_spool(proxy)
    started = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["msg"] for r in started].count("indexer started") == 2
    assert all(r["store"] == "sqlite" for r in started if r["msg"].startswith("indexer "))


def test_the_addon_turned_off_opens_no_store_and_starts_no_thread(tmp_path: Path) -> None:
    indexer = Indexer()
    with taddons.context(indexer) as ctx:
        ctx.configure(indexer, autovibe_data=str(tmp_path), autovibe_indexer=False)
        indexer.running()
        assert indexer.store is None and indexer.catch_up() == 0
        assert "autovibe-indexer" not in {t.name for t in threading.enumerate()}
        indexer.done()
    assert not DataRoot.at(tmp_path).traffic_index.exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"traffic_store": "solr"}, r"AUTOVIBE_TRAFFIC_STORE: unknown store 'solr'"),
        ({"traffic_store": "elasticsearch"}, r"AUTOVIBE_ELASTICSEARCH_URL must be .*got ''"),
        ({"index_body_max": -1}, r"AUTOVIBE_INDEX_BODY_MAX must be 0 or more bytes, got -1"),
    ],
)
def test_bad_settings_name_the_variable(
    tmp_path: Path, settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        run(Settings.model_validate({"data": tmp_path, **settings}), threading.Event())
    assert ready_pid(DataRoot.at(tmp_path)) is None


def test_the_stack_runs_the_indexer_and_turns_the_proxys_off(tmp_path: Path) -> None:
    settings = Settings(data=tmp_path, proxy_port=free_port(), api_port=free_port())
    services = {svc.name: svc for svc in stack.services(settings)}
    assert "autovibe_indexer=false" in services["proxy"].argv
    assert services["indexer"].argv == [sys.executable, "-m", "traffic.indexer"]
    # Stopped in reverse: the proxy before the indexer, whose last round follows its last flow.
    names = stack.services_names()
    assert names.index("indexer") < names.index("proxy")
    assert names == [*services, "intake"]  # intake only when AUTOVIBE_INTAKE_CONFIG is set
    root = DataRoot.at(tmp_path)
    try:
        stack.up(settings, ["indexer"], timeout_s=30)
        pid = stack.running_pid(root, "indexer")
        assert pid is not None and ready_pid(root) == pid
    finally:
        assert stack.down(settings) == ["indexer"]
    assert ready_pid(root) is None
    assert '"msg": "indexer stopped"' in (root.run / "indexer.log").read_text()
