"""Lean: the mitmproxy built-ins that a headless capture proxy leaves unused, out of the chain.

mitmdump loads about 35 addons of its own, and offers every event of every flow to each one
(`requestheaders`, `request`, `responseheaders`, `response`, the connection events). Most of
them are interactive tools (map local/remote, modify headers/body, replay, sticky cookies,
HAR and flow files, the console's commands, the `mitm.it` onboarding app) that the autovibe
proxy never uses; offering them each flow costs CPU on the proxy's one event loop. Once mitmdump
is running, this addon removes them (`python -m bench.proxy` measures the effect: the
`mitmdump-lean` rows are bare mitmdump with this addon alone).

A built-in stays when it is put to use: an operator who sets `map_local`, `modify_headers`,
`save_stream_file`, … on the command line, or a `flow_detail` above 0, keeps the addon that
option belongs to (`IN_USE`). Kept in every case: the proxy server, TLS, the next-layer
logic, blocking of non-local clients, proxy and upstream authentication, DNS, the script
loader (our own addons), logging. The onboarding app is always removed: workers get the CA
from their environment or cloud-init, not from `http://mitm.it`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx

log = logging.getLogger(__name__)

IN_USE: dict[str, Callable[[Any], bool]] = {
    "AntiCache": lambda o: bool(o.anticache),
    "AntiComp": lambda o: bool(o.anticomp),
    "BlockList": lambda o: bool(o.block_list),
    "Browser": lambda o: False,  # the `browser.start` command
    "CommandHistory": lambda o: False,  # the console's command history
    "Comment": lambda o: False,  # the `flow.comment` command
    "Cut": lambda o: False,  # the `cut` commands
    "Dumper": lambda o: o.flow_detail > 0,
    "Export": lambda o: False,  # the `export` commands
    "MapLocal": lambda o: bool(o.map_local),
    "MapRemote": lambda o: bool(o.map_remote),
    "ModifyBody": lambda o: bool(o.modify_body),
    "ModifyHeaders": lambda o: bool(o.modify_headers),
    "Onboarding": lambda o: False,
    "Save": lambda o: bool(o.save_stream_file),
    "SaveHar": lambda o: bool(o.hardump),
    "ServerPlayback": lambda o: bool(o.server_replay),
    "StickyAuth": lambda o: bool(o.stickyauth),
    "StickyCookie": lambda o: bool(o.stickycookie),
    # Rewrites a response's Alt-Svc for reverse-proxy modes only; asked on every response.
    "UpdateAltSvc": lambda o: any(str(mode).startswith("reverse") for mode in o.mode),
}
"""The removable built-ins (by class name), each with what says it is in use: kept if true."""


def unused(chain: list[Any], options: Any) -> list[Any]:
    """The addons of `chain` that `IN_USE` names and says are not in use, in chain order."""
    return [
        addon
        for addon in chain
        if (in_use := IN_USE.get(type(addon).__name__)) is not None and not in_use(options)
    ]


class Lean:
    def running(self) -> None:
        # Not while `running` is being offered to the chain (removing from a list under
        # iteration would skip an addon's hook): just after, before the first flow.
        asyncio.get_running_loop().call_soon(self.trim)

    def trim(self) -> None:
        manager = ctx.master.addons
        removed = unused(manager.chain, ctx.options)
        for addon in removed:
            manager.remove(addon)
        if removed:
            names = ", ".join(type(a).__name__ for a in removed)
            log.info("removed %d unused mitmproxy built-ins: %s", len(removed), names)


addons = [Lean()]
"""Loaded as a script of its own (`mitmdump -s proxy/addons/lean.py`), it trims bare mitmdump."""
