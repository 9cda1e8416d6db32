"""`Lean`: mitmproxy's unused built-ins leave the chain; one put to use by an option stays."""

from __future__ import annotations

import asyncio
import json

import pytest
from proxy_harness import Proxy, Upstream, proxy_settings, running_proxy

from budget import open_ample
from proxy.addons.lean import IN_USE, unused
from proxy.launch import mitmdump_argv, with_options


def _chain_names(**options: object) -> tuple[set[str], set[str]]:
    """(every addon of a real DumpMaster, those `unused` removes) with `options` set."""
    from mitmproxy.options import Options
    from mitmproxy.tools.dump import DumpMaster

    async def build() -> tuple[set[str], set[str]]:
        master = DumpMaster(Options(), with_termlog=False)
        master.options.update(**options)
        chain = master.addons.chain
        return {type(a).__name__ for a in chain}, {
            type(a).__name__ for a in unused(chain, master.options)
        }

    return asyncio.run(build())


def test_every_removable_builtin_exists_and_its_options_are_real() -> None:
    everything, removed = _chain_names(flow_detail=0)
    # A renamed built-in or option (a mitmproxy upgrade) fails here, not silently.
    assert set(IN_USE) <= everything
    assert removed == set(IN_USE)
    kept = everything - removed
    assert {"Proxyserver", "TlsConfig", "NextLayer", "ScriptLoader", "Block"} <= kept


def test_a_builtin_whose_option_is_set_stays() -> None:
    _, removed = _chain_names(anticache=True, hardump="flows.har", flow_detail=1)
    assert not {"AntiCache", "SaveHar", "Dumper"} & removed
    assert {"MapLocal", "Onboarding", "StickyCookie"} <= removed
    _, removed = _chain_names(mode=["reverse:https://example.com"])
    assert "UpdateAltSvc" not in removed  # a reverse proxy has its Alt-Svc headers rewritten


def test_the_running_proxy_removes_them_and_keeps_modify_headers_when_set(
    tmp_path_factory: pytest.TempPathFactory, upstream: Upstream, website: Upstream
) -> None:
    settings, root, key = proxy_settings(tmp_path_factory, upstream.port)
    open_ample(root.budget_counters, "p1", ["m1"])
    argv = with_options(
        mitmdump_argv(settings), ["termlog_verbosity=info", "modify_headers=/~q/X-Lean/kept"]
    )
    with running_proxy(settings, root, key, argv) as proxy:
        identity = Proxy.identity("a-lean")
        with proxy.client(identity) as client:
            assert client.get(f"{website.url}/lean").status_code == 200
            answer = client.post(
                f"{upstream.url}/v1/completions",
                json={"model": "tiny", "prompt": "hi", "max_tokens": 4},
            )
            assert answer.status_code == 200, answer.text
        assert proxy.spooled_one(path="/lean").status == 200
        assert proxy.spooled_one(path="/v1/completions").usage is not None
    logged = [
        json.loads(line)
        for line in (root.root / "mitmdump.log").read_text().splitlines()
        if "unused mitmproxy built-ins" in line
    ]
    assert len(logged) == 1, logged
    removed = set(logged[0]["msg"].partition(": ")[2].split(", "))
    assert removed == set(IN_USE) - {"ModifyHeaders"}
    # ModifyHeaders stayed, and did its work on both calls.
    assert [seen["headers"].get("X-Lean") for seen in website.seen] == ["kept"]
    assert upstream.seen[-1]["headers"].get("X-Lean") == "kept"
