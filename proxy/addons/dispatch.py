"""Dispatch: mitmproxy's hook calls, planned once per hook instead of searched for each event.

For every event (each flow's `requestheaders`, `request`, `responseheaders`, `response`, the
connection events) mitmproxy's `AddonManager.trigger_event` walks the whole addon tree: for each
addon of the chain a context manager (`safecall`), a coroutine and two generators, then a
`getattr` on the addon and on each of its children (scripts, their modules, our addons), most
of which have no such hook. After each flow event it does the same again for `update`, which no
addon of a headless proxy implements. On this machine that walk was 18 % of the proxy's CPU
under streaming load, more than any of our own addons (py-spy, `python -m bench.proxy`'s sse
cell at 16 connections).

Once mitmdump runs, this addon gives the manager a `trigger_event` that does the same calls in
the same order from a plan: per hook name, the addons of the chain that have it, each with its
and its children's hook callables in tree order. An event with no hook anywhere costs one dict
lookup. Each top-level addon's calls still run under mitmproxy's `safecall` (an error is logged
and the next addon goes on), `AddonHalt` still stops the event, awaitables are awaited, and a
hook attribute that is neither callable nor a module still fails as mitmproxy's own
`AddonManagerError`. Plans are rebuilt after anything that changes the tree: `register` (every
`add`, and each script (re)load), `remove` (Lean's trim among them) and option changes (the
script loader reorders its scripts on `scripts`). An addon that grows a hook attribute at run
time outside those is not seen until the next of them: none of mitmproxy's or ours does.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import types
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, exceptions, hooks
from mitmproxy.addonmanager import AddonManager, safecall, traverse

log = logging.getLogger(__name__)

Plan = list[list[Callable[..., Any]]]
"""Per top-level addon that has the hook: its own and its children's callables, in order."""


def _not_callable(addon: Any, name: str) -> Callable[..., Any]:
    def fail(*_: Any) -> None:
        raise exceptions.AddonManagerError(f"Addon handler {name} ({addon}) not callable")

    return fail


def _raises(exc: Exception) -> Callable[..., Any]:
    def fail(*_: Any) -> None:
        raise exc

    return fail


def plan(chain: list[Any], name: str) -> Plan:
    """What mitmproxy's `_iter_hooks` would find for hook `name`, walking `chain` now.

    A walk that fails (an addon property that raises) leaves a call that raises the same
    error, so that `safecall` logs it on each event, as it does upstream."""
    planned: Plan = []
    for top in chain:
        found = []
        try:
            for addon in traverse([top]):
                func = getattr(addon, name, None)
                if not func or isinstance(func, types.ModuleType):
                    continue  # a module imported under a hook's name is no hook (as upstream)
                found.append(func if callable(func) else _not_callable(addon, name))
        except Exception as exc:
            found.append(_raises(exc))
        if found:
            planned.append(found)
    return planned


class Planned:
    """`trigger_event`, `register` and `remove` for one `AddonManager`, installed on it."""

    def __init__(self, manager: AddonManager) -> None:
        self.manager = manager
        self.plans: dict[str, Plan] = {}
        self._register = manager.register
        self._remove = manager.remove

    def install(self) -> None:
        manager: Any = self.manager  # instance attributes over the class's methods
        manager.trigger_event = self.trigger_event
        manager.register = self.register
        manager.remove = self.remove

    def uninstall(self) -> None:
        for name in ("trigger_event", "register", "remove"):
            self.manager.__dict__.pop(name, None)
        self.plans.clear()

    # Both run synchronously on the event loop: no event is dispatched while they change the
    # tree, so the plans need clearing only once they are done (or failed halfway).
    def register(self, addon: Any) -> Any:
        try:
            return self._register(addon)
        finally:
            self.plans.clear()

    def remove(self, addon: Any) -> None:
        try:
            self._remove(addon)
        finally:
            self.plans.clear()

    async def trigger_event(self, event: hooks.Hook) -> None:
        name = event.name
        planned = self.plans.get(name)
        if planned is None:
            planned = self.plans[name] = plan(self.manager.chain, name)
        if not planned:
            return
        args = event.args()
        for funcs in planned:
            try:
                with safecall():
                    for func in funcs:
                        result = func(*args)
                        if result is not None and inspect.isawaitable(result):
                            await result
            except exceptions.AddonHalt:
                return


class Dispatch:
    def __init__(self) -> None:
        self.planned: Planned | None = None

    def running(self) -> None:
        # After `running` has been offered to the whole chain, before the first flow.
        asyncio.get_running_loop().call_soon(self.install)

    def install(self) -> None:
        if self.planned is None:
            self.planned = Planned(ctx.master.addons)
            self.planned.install()
            count = len(list(traverse(ctx.master.addons.chain)))
            log.info("mitmproxy hooks called from plans (%d addons in the tree)", count)

    def configure(self, updated: set[str]) -> None:
        if self.planned is not None:
            self.planned.plans.clear()

    def done(self) -> None:
        if self.planned is not None:
            self.planned.uninstall()
            self.planned = None


addons = [Dispatch()]
"""Loaded as a script of its own (`mitmdump -s proxy/addons/dispatch.py`) beside lean.py by the
benchmark's `mitmdump-lean` row."""
