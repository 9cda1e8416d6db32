"""The proxy's Prometheus endpoint, read from a real mitmdump after real flows."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from proxy_harness import PRICES_YAML, Proxy, Upstream

from budget import open_ample, open_counters, open_project
from common.processes import stop
from contracts.credentials import MachineIdentity, load_or_create_key
from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from proxy.addons.metrics import EXPORTED
from proxy.launch import mitmdump_argv, wait_ready, with_options


@pytest.fixture(scope="module")
def metered_proxy(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    configs = tmp_path_factory.mktemp("configs")
    (configs / "prices.yaml").write_text(PRICES_YAML)
    settings = Settings(
        data=tmp_path_factory.mktemp("data"),
        configs=configs,
        proxy_port=free_port(),
        model_port=upstream.port,
        proxy_metrics_port=free_port(),
    )
    root = DataRoot.at(settings.data)
    key = load_or_create_key(root)
    open_ample(root.budget_counters, "p1", ["m1"])
    open_ample(root.budget_counters, "p2", ["m1"])
    store = open_counters("sqlite", path=root.budget_counters)
    try:  # p3 may spend nothing: every call of it is refused
        open_project(
            store,
            "p3",
            ["m1"],
            amount=Decimal(0),
            daily_allowance=Decimal(0),
            currency="USD",
            period="once",
            now=time.time(),
        )
    finally:
        store.close()
    # p2's spool folder cannot be made: its flows are answered but lost to the spool.
    root.traffic_logs.mkdir(parents=True, exist_ok=True)
    (root.traffic_logs / "p2").write_text("not a folder\n")
    log = (root.root / "mitmdump.log").open("wb")
    process = subprocess.Popen(mitmdump_argv(settings), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(settings.host, settings.proxy_port, timeout=30, process=process)
        wait_ready(settings.host, settings.proxy_metrics_port, timeout=10, process=process)
        yield Proxy(settings, root, key)
    finally:
        stop(process)
        log.close()


def _scrape(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://{proxy.settings.host}:{proxy.settings.proxy_metrics_port}/metrics"
    text = httpx.get(url, timeout=5, trust_env=False).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _call(proxy: Proxy, upstream: Upstream, project: str | None) -> int:
    identity = None
    if project is not None:
        identity = MachineIdentity(
            project=project, trial="t1", assignment=f"{project}-a1", machine="m1",
            expires=time.time() + 3600,
        )  # fmt: skip
    with proxy.client(identity) as client:
        response = client.post(
            f"{upstream.url}/v1/completions",
            json={"model": "tiny", "prompt": "hi", "max_tokens": 8},
        )
    return response.status_code


def test_metrics_count_what_the_proxy_did(metered_proxy: Proxy, upstream: Upstream) -> None:
    statuses = [
        _call(metered_proxy, upstream, "p1"),
        _call(metered_proxy, upstream, "p1"),
        _call(metered_proxy, upstream, "p2"),  # answered, not spooled
        _call(metered_proxy, upstream, "p3"),  # no budget
        _call(metered_proxy, upstream, None),  # no credential
    ]
    assert statuses == [200, 200, 200, 402, 407]
    deadline = time.monotonic() + 5  # the last flow's hooks may finish just after the reply
    while (m := _scrape(metered_proxy)).get(
        ("autovibe_proxy_flows_total", (("status", "4xx"),)), 0
    ) < 2:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert m[("autovibe_proxy_flows_total", (("status", "2xx"),))] == 3
    assert m[("autovibe_proxy_flows_total", (("status", "4xx"),))] == 2
    assert m[("autovibe_proxy_budget_refusals_total", (("reason", "budget_exhausted"),))] == 1
    # Only the three forwarded calls have an upstream latency.
    assert m[("autovibe_proxy_upstream_seconds_count", ())] == 3
    assert 0 < m[("autovibe_proxy_upstream_seconds_sum", ())] < 30
    assert m[("autovibe_proxy_bytes_total", (("direction", "request"),))] > 0
    assert m[("autovibe_proxy_bytes_total", (("direction", "response"),))] > 0
    assert m[("autovibe_proxy_spool_errors_total", ())] == 1
    assert m[("autovibe_proxy_reservations_open", ())] == 0
    names = {name for name, _ in m}
    assert set(EXPORTED) <= names, set(EXPORTED) - names
    # p1's flows were spooled; p2's was the one lost.
    assert {r.project for r in metered_proxy.spooled()} >= {"p1"}
    assert "p2" not in {r.project for r in metered_proxy.spooled()}


def test_metrics_are_off_unless_a_port_is_set(tmp_path: Path) -> None:
    argv = mitmdump_argv(Settings(data=tmp_path))
    assert not any(a.startswith("autovibe_metrics_port=") for a in argv)
    argv = mitmdump_argv(Settings(data=tmp_path, proxy_metrics_port=9464))
    assert argv[argv.index("autovibe_metrics_port=9464") - 1] == "--set"


def test_a_deployment_option_replaces_ours(tmp_path: Path) -> None:
    argv = mitmdump_argv(Settings(data=tmp_path, model_port=8500))
    argv = with_options(argv, ["autovibe_model_hosts=model:8500,ray:8500", "flow_detail=1"])
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert [s for s in sets if s.startswith("autovibe_model_hosts=")] == [
        "autovibe_model_hosts=model:8500,ray:8500"
    ]
    assert [s for s in sets if s.startswith("flow_detail=")] == ["flow_detail=1"]
    with pytest.raises(ValueError, match="option=value"):
        with_options(argv, ["nonsense"])
