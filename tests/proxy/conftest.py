"""A real mitmdump with our addons, started once per module in front of two small servers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from proxy_harness import Proxy, Upstream, proxy_settings, running_proxy, serve

from budget import open_ample
from proxy.launch import mitmdump_argv
from traffic.sqlite_store import SqliteTrafficStore


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    """The model server the proxy knows as the local model plane."""
    yield from serve()


@pytest.fixture(scope="module")
def website() -> Iterator[Upstream]:
    """Some other server: not a provider, so flows to it are captured but not metered."""
    yield from serve()


@pytest.fixture(scope="module")
def cloud() -> Iterator[Upstream]:
    """A cloud provider: `openai` to the proxies of `proxy_with_cloud`."""
    yield from serve()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    """mitmdump started exactly as the platform starts it, on a fresh data root."""
    settings, root, key = proxy_settings(tmp_path_factory, upstream.port)
    # The proxy refuses calls no budget covers: give the tests' project an ample one.
    open_ample(root.budget_counters, "p1", ["m1", "m2"])
    with running_proxy(settings, root, key, mitmdump_argv(settings)) as proxy:
        yield proxy
    # The indexer's last catch-up, on shutdown, leaves nothing of the spool unindexed.
    spooled = {record.id for record in Proxy(settings, root, key).spooled()}
    with SqliteTrafficStore(root.traffic_index) as index:
        assert {flow.id for flow in index.flows()} == spooled
