"""A real mitmdump with our addons, started once per module in front of two small servers."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from proxy_harness import PRICES_YAML, Proxy, Upstream, serve

from contracts.credentials import load_or_create_key
from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from ledger.counters import open_ample
from proxy.index import TrafficIndex
from proxy.launch import mitmdump_argv, wait_ready


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    """The model server the proxy knows as the local model plane."""
    yield from serve()


@pytest.fixture(scope="module")
def website() -> Iterator[Upstream]:
    """Some other server: not a provider, so flows to it are captured but not metered."""
    yield from serve()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    """mitmdump started exactly as the platform starts it, on a fresh data root."""
    configs = tmp_path_factory.mktemp("configs")
    (configs / "prices.yaml").write_text(PRICES_YAML)
    settings = Settings(
        data=tmp_path_factory.mktemp("data"),
        configs=configs,
        host="127.0.0.1",
        proxy_port=free_port(),
        model_port=upstream.port,
    )
    root = DataRoot.at(settings.data)
    key = load_or_create_key(root)
    # The proxy refuses calls no budget covers: give the tests' project an ample one.
    open_ample(root.budget_counters, "p1", ["m1", "m2"])
    log = (root.root / "mitmdump.log").open("wb")
    process = subprocess.Popen(mitmdump_argv(settings), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(settings.host, settings.proxy_port, timeout=30, process=process)
        yield Proxy(settings, root, key)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    output = (root.root / "mitmdump.log").read_text()
    assert "Traceback" not in output, output
    assert process.returncode == 0, output
    # The indexer's last catch-up, on shutdown, leaves nothing of the spool unindexed.
    spooled = {record.id for record in Proxy(settings, root, key).spooled()}
    with TrafficIndex(root.traffic_index) as index:
        assert {flow.id for flow in index.flows()} == spooled
