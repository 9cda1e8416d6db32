"""`Dispatch`: mitmproxy's own `AddonManager`, events triggered before and after the planned
dispatch is installed; the same hooks are called in the same order with the same outcome.
The proxy's end-to-end tests (real mitmdump) run with it installed too."""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from mitmproxy import exceptions, hooks
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.test import taddons, tflow
from proxy_harness import LoggedRun

from proxy.addons.dispatch import Dispatch, Planned, plan

Calls = list[str]


class Recorder:
    """Records its hook calls; `fail` maps a hook name to what it raises there."""

    def __init__(self, name: str, calls: Calls, hooks: tuple[str, ...], **fail: Exception) -> None:
        self.name = name
        for hook in hooks:
            setattr(self, hook, self._hook(hook, calls, fail.get(hook)))

    def _hook(self, hook: str, calls: Calls, fail: Exception | None) -> Callable[..., None]:
        def called(*args: Any) -> None:
            calls.append(f"{self.name}.{hook}")
            if fail is not None:
                raise fail

        return called


class AsyncRecorder:
    def __init__(self, name: str, calls: Calls) -> None:
        self.name = name
        self.calls = calls

    async def response(self, flow: Any) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"{self.name}.response (async)")


class Broken:
    """An addon whose `request` attribute cannot be read once armed (mitmproxy reads every
    attribute when it registers an addon)."""

    name = "broken"
    armed = False

    @property
    def request(self) -> Callable[..., None] | None:
        if Broken.armed:
            raise RuntimeError("broken property")
        return None


class Parent:
    """An addon with children, as mitmproxy's script loader has its scripts."""

    def __init__(self, name: str, calls: Calls, children: list[Any]) -> None:
        self.name = name
        self.addons = children
        self.calls = calls

    def request(self, flow: Any) -> None:
        self.calls.append(f"{self.name}.request")


def _tree(calls: Calls) -> list[Any]:
    module_named_request = types.ModuleType("request")
    return [
        Recorder("a", calls, ("request", "response")),
        AsyncRecorder("b", calls),
        Parent(
            "p",
            calls,
            [
                Recorder("c", calls, ("request",), request=ValueError("c broke")),
                Recorder("d", calls, ("request", "response")),  # after c: skipped on request
            ],
        ),
        Recorder("e", calls, ("request",)),
        types.SimpleNamespace(name="mod", request=module_named_request),  # no hook (upstream)
        types.SimpleNamespace(name="bad", request=5),  # not callable: an AddonManagerError
        Broken(),
        Recorder("halt", calls, ("response",), response=exceptions.AddonHalt()),
        Recorder("after-halt", calls, ("request", "response")),
    ]


def _events() -> list[hooks.Hook]:
    flow = tflow.tflow(resp=True)
    return [HttpRequestHook(flow), HttpResponseHook(flow), hooks.UpdateHook([flow])]


def _run(body: Callable[[taddons.context], Awaitable[None]], *addons: Any) -> None:
    async def go() -> None:
        with taddons.context(*addons, loadcore=False) as tctx:
            await body(tctx)

    asyncio.run(go())


def _outcome(
    tctx: taddons.context, caplog: pytest.LogCaptureFixture, calls: Calls
) -> Callable[[], Awaitable[tuple[list[str], list[str]]]]:
    async def trigger_all() -> tuple[list[str], list[str]]:
        calls.clear()
        caplog.clear()
        for event in _events():
            await tctx.master.addons.handle_lifecycle(event)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        return list(calls), errors

    return trigger_all


def test_planned_dispatch_calls_what_mitmproxy_calls_in_the_same_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: Calls = []

    async def body(tctx: taddons.context) -> None:
        trigger_all = _outcome(tctx, caplog, calls)
        Broken.armed = True
        upstream = await trigger_all()
        planned = Planned(tctx.master.addons)
        planned.install()
        ours = await trigger_all()
        assert ours == upstream
        assert upstream[0] == [
            "a.request", "p.request", "c.request", "e.request", "after-halt.request",
            "a.response", "b.response (async)", "d.response", "halt.response",
        ]  # fmt: skip
        assert upstream[1] == [
            "Addon error: c broke",
            "Addon error: Addon handler request (namespace(name='bad', request=5)) not callable",
            "Addon error: broken property",
        ]
        # Nobody has an `update` hook: its plan is empty, so the event costs a lookup.
        assert planned.plans["update"] == []
        planned.uninstall()
        assert await trigger_all() == upstream
        assert "trigger_event" not in vars(tctx.master.addons)

    try:
        _run(body, *_tree(calls))
    finally:
        Broken.armed = False


def test_plans_follow_addons_added_removed_and_children_changed_with_the_options(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: Calls = []
    first = Recorder("first", calls, ("request",))
    parent = Parent("parent", calls, [])
    dispatch = Dispatch()

    async def body(tctx: taddons.context) -> None:
        trigger_all = _outcome(tctx, caplog, calls)
        dispatch.install()
        assert dispatch.planned is not None
        assert (await trigger_all())[0] == ["first.request", "parent.request"]

        late = Recorder("late", calls, ("request",))
        tctx.master.addons.add(late)
        assert (await trigger_all())[0] == ["first.request", "parent.request", "late.request"]

        tctx.master.addons.remove(first)
        assert (await trigger_all())[0] == ["parent.request", "late.request"]

        # A parent changing its children on an option change (the script loader on `scripts`).
        parent.addons.append(Recorder("child", calls, ("request",)))
        tctx.options.update(ssl_insecure=True)
        assert (await trigger_all())[0] == ["parent.request", "child.request", "late.request"]

        dispatch.done()
        assert dispatch.planned is None
        assert "register" not in vars(tctx.master.addons)

    _run(body, first, parent, dispatch)


def test_plan_is_the_tree_walk_of_upstream() -> None:
    calls: Calls = []
    chain = _tree(calls)
    assert len(plan(chain, "request")) == 5  # Broken's `request` reads None: no hook
    Broken.armed = True
    try:
        planned = plan(chain, "request")
    finally:
        Broken.armed = False
    assert len(planned) == 6  # a, p (with c, d), e, bad, broken, after-halt
    assert [len(funcs) for funcs in planned] == [1, 3, 1, 1, 1, 1]
    assert plan(chain, "websocket_message") == []


def test_the_running_proxy_dispatches_through_the_plan(logged_run: LoggedRun) -> None:
    (page,) = [r for r in logged_run.spooled if r.path == "/page"]
    assert page.status == 200
    (streamed,) = [r for r in logged_run.spooled if r.streamed]
    assert streamed.path == "/v1/completions"
    assert streamed.usage is not None and streamed.usage.estimated is False
    assert "hooks called from plans" in logged_run.log
    assert "Addon error" not in logged_run.log
