"""How the proxy says no: a JSON error answered by the proxy itself, never forwarded."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from mitmproxy import http

log = logging.getLogger(__name__)

METADATA_KEY = "autovibe.refused"

_Addon = TypeVar("_Addon")


def refuse(
    flow: http.HTTPFlow,
    status: int,
    body: Mapping[str, object],
    headers: Mapping[str, str] | None = None,
) -> None:
    """Answer `flow` with `status` and a JSON body; the upstream never sees the request."""
    flow.response = http.Response.make(
        status,
        json.dumps(body),
        {"Content-Type": "application/json", **(headers or {})},
    )
    flow.metadata[METADATA_KEY] = body.get("error", str(status))


def refused(flow: http.HTTPFlow) -> str | None:
    """The error code of a refusal made by one of our addons, or None."""
    reason = flow.metadata.get(METADATA_KEY)
    return reason if isinstance(reason, str) else None


def fail_closed(
    hook: Callable[[_Addon, http.HTTPFlow], None],
) -> Callable[[_Addon, http.HTTPFlow], None]:
    """Refuse the flow (500) when the hook fails, instead of letting it through unchecked.

    mitmproxy logs an addon's exception and carries on with the flow; for the hooks that
    decide whether a flow may pass, carrying on would forward what was never checked.
    """

    @functools.wraps(hook)
    def guarded(addon: _Addon, flow: http.HTTPFlow) -> None:
        try:
            hook(addon, flow)
        except Exception:
            _fault(hook.__qualname__, flow)

    return guarded


def fail_closed_async(
    hook: Callable[[_Addon, http.HTTPFlow], Awaitable[None]],
) -> Callable[[_Addon, http.HTTPFlow], Awaitable[None]]:
    """`fail_closed` for a hook that awaits (mitmproxy awaits what a hook returns)."""

    @functools.wraps(hook)
    async def guarded(addon: _Addon, flow: http.HTTPFlow) -> None:
        try:
            await hook(addon, flow)
        except Exception:
            _fault(hook.__qualname__, flow)

    return guarded


def _fault(hook: str, flow: http.HTTPFlow) -> None:
    log.exception("%s failed on %s; refusing the flow", hook, flow.id)
    refuse(
        flow,
        500,
        {
            "error": "proxy_fault",
            "detail": f"{hook} failed; the proxy refuses what it cannot check (see the proxy log)",
        },
    )
