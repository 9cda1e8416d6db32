"""A real mitmdump with our addons, started once per module in front of two small servers,
and one run of it logging at info that the running proxy's tests of Lean and Dispatch read."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from proxy_harness import (
    LoggedRun,
    Proxy,
    Upstream,
    listen,
    proxy_settings,
    running_proxy,
    serve,
)

from budget import open_ample
from proxy.launch import mitmdump_argv, with_options
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


@pytest.fixture(scope="session")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggedRun]:
    """One mitmdump as the platform starts it, logging at info, with modify_headers set (X-Lean:
    kept on every request): a page of a website fetched, a completion and a streamed one, then
    stopped. One start serves the tests of Lean and of Dispatch in the running proxy."""
    upstream, website = listen(), listen()
    try:
        settings, root, key = proxy_settings(tmp_path_factory, upstream.port)
        open_ample(root.budget_counters, "p1", ["m1"])
        argv = with_options(
            mitmdump_argv(settings), ["termlog_verbosity=info", "modify_headers=/~q/X-Lean/kept"]
        )
        with running_proxy(settings, root, key, argv) as proxy:
            with proxy.client(Proxy.identity("a-logged")) as client:
                assert client.get(f"{website.url}/page").status_code == 200
                for stream in (False, True):
                    body = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "stream": stream}
                    answer = client.post(f"{upstream.url}/v1/completions", json=body)
                    assert answer.status_code == 200, answer.text
            # A streamed flow is spooled when its stream ends, just after the client's last read.
            deadline = time.monotonic() + 5
            while len(spooled := proxy.spooled()) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
        yield LoggedRun((root.root / "mitmdump.log").read_text(), spooled, website, upstream)
    finally:
        for server in (upstream.server, website.server):
            server.shutdown()
            server.server_close()
