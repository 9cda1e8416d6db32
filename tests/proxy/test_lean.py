"""`Lean`: mitmproxy's unused built-ins leave the chain; one put to use by an option stays."""

from __future__ import annotations

import asyncio
import json

from proxy_harness import LoggedRun

from proxy.addons.lean import IN_USE, unused


def _chain_names(**options: object) -> tuple[set[str], set[str]]:
    """(every addon of a real DumpMaster, those `unused` removes) with `options` set."""
    from mitmproxy.options import Options
    from mitmproxy.tools.dump import DumpMaster

    async def build() -> tuple[set[str], set[str]]:
        master = DumpMaster(Options(), with_termlog=False)
        master.options.update(**options)
        chain = master.addons.chain
        names = (
            {type(a).__name__ for a in chain},
            {type(a).__name__ for a in unused(chain, master.options)},
        )
        # Master.done's first step without the addons' done hook (SaveHar would write its
        # file): the master's log handler off the root logger again.
        master._legacy_log_events.uninstall()
        return names

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
    logged_run: LoggedRun,
) -> None:
    logged = [
        json.loads(line)
        for line in logged_run.log.splitlines()
        if "unused mitmproxy built-ins" in line
    ]
    assert len(logged) == 1, logged
    removed = set(logged[0]["msg"].partition(": ")[2].split(", "))
    assert removed == set(IN_USE) - {"ModifyHeaders"}
    # The proxy served its calls; ModifyHeaders stayed, and did its work on every one.
    assert {(r.path, r.status) for r in logged_run.spooled} == {
        ("/page", 200),
        ("/v1/completions", 200),
    }
    assert all(r.usage is not None for r in logged_run.spooled if r.path == "/v1/completions")
    assert [seen["headers"].get("X-Lean") for seen in logged_run.website.seen] == ["kept"]
    upstream = [seen["headers"].get("X-Lean") for seen in logged_run.upstream.seen]
    assert upstream == ["kept", "kept"]
