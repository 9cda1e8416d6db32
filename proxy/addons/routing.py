"""Local-first routing: a request for the model `auto` goes to the assignment's local pair.

An agent may name `auto` (or `auto:thinking`) instead of a model. This addon, right after
identity and before metering, rewrites such a request to the normal (or thinking) model of
the assignment's model pair on the local model plane: the `model` in the body and the
destination (the first of `autovibe_model_hosts`). Metering then prices and records the real
model; `routed(flow)` keeps what was asked for (`requested_model: auto` in the record).

The local pair cannot serve every request: the model plane speaks the OpenAI completions and
chat APIs and Anthropic's Messages (the CPU server translates it itself, the GPU plane through
`serving.messages_front`), not OpenAI's Responses, and a prompt larger than the local model's
context does not fit.
Such a request goes to the trial's `routing.cloud_model` when `routing.allow_cloud` is true,
and is refused (403 `cloud_not_allowed`) otherwise. Requests that name a model are left alone.
Budget refusals are the budget addon's: `auto` is never moved to the cloud for lack of money.

Saturation: with `autovibe_local_queue_wait_s` set, a request the local pair could serve goes to
the cloud model (when the trial allows one) while the local plane is saturated: while a call to
it has been in flight (sent, not yet answered to its end) for longer than that many seconds. The
proxy measures this itself, over every call it sends to the local plane: on a one-slot server
(llama.cpp) that is how long the next call would wait at least. Without a cloud model the
request stays local. The decision and its reason are in each flow's record (`route_reason`).

Down: a request the local pair could serve goes to the cloud model (when the trial allows one)
while the local plane is down, as the proxy last saw it (`LocalHealth`): its last call there
could not connect or was answered 502/503/504, or a probe (`GET /v1/models`, answered below 500
within a second) failed. What was seen is trusted for `autovibe_local_health_s` seconds, then a
request with a cloud model to fall back on probes again; so a plane that is back is used again
at the next probe, and the first call after a plane dies within that time gets the local error.
Without a cloud model nothing is probed and the request goes local, as it always did.

The policy of an assignment is the file `routing.json` in its artifacts folder
(`worker-artifacts/<project>/<trial>/<assignment>/`, hidden from the sandboxed agent), written
by the orchestrator with `write_policy` when it starts the assignment. Without that file the
default policy applies (local only) to the pair named by `autovibe_auto_pair`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from pydantic import ValidationError

from contracts.credentials import MachineIdentity
from contracts.routing import AssignmentPolicy, policy_path
from proxy.addons import dataroot, providers
from proxy.addons.identity import identity_of
from proxy.addons.metering import BYTES_PER_TOKEN, llm_api, parse_model_hosts
from proxy.addons.providers import Providers
from proxy.addons.refusal import fail_closed_async, refuse, refused
from proxy.output_cap import output_cap
from proxy.usage import Api

log = logging.getLogger(__name__)

METADATA_KEY = "autovibe.routing"
AUTO_MODELS = {"auto": "normal", "auto:thinking": "thinking"}
"""What an agent may name instead of a model, and the role of the pair it stands for."""
LOCAL_APIS: frozenset[Api] = frozenset({"openai_chat", "openai_completions", "anthropic_messages"})
"""The APIs the local model plane serves: OpenAI's (llama.cpp, vLLM) and Anthropic's Messages
(translated by the CPU server, and by `serving.messages_front` before Ray's OpenAI app)."""
CLOUD_APIS: dict[str, frozenset[Api]] = {
    "openai": frozenset({"openai_chat", "openai_completions", "openai_responses"}),
    "anthropic": frozenset({"anthropic_messages"}),
}
"""The APIs a cloud provider serves, for checking a cloud fallback can take the request."""
HEALTH_S = 2.0
"""Default of `autovibe_local_health_s`: how long what the proxy saw of the local plane holds."""
PROBE_PATH = "/v1/models"
PROBE_TIMEOUT_S = 1.0
DOWN_STATUSES = frozenset({502, 503, 504})
"""Answers from the local plane that say it cannot serve (no replica, gateway down, loading)."""


@dataclass(frozen=True)
class Route:
    """Where an `auto` request goes: `local` or `cloud`, the model, the provider."""

    requested: str
    target: str
    provider: str
    model: str
    reason: str


class LocalLoad:
    """The local model plane's calls in flight, as the proxy sent them: when each was sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent: dict[str, float] = {}

    def sent(self, flow_id: str) -> None:
        with self._lock:
            self._sent[flow_id] = time.monotonic()

    def done(self, flow_id: str) -> None:
        with self._lock:
            self._sent.pop(flow_id, None)

    def wait_s(self) -> float:
        """How long the oldest call in flight has waited so far (0: none in flight)."""
        with self._lock:
            oldest = min(self._sent.values(), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest


class LocalHealth:
    """Whether the local model plane is down, as the proxy last saw it: the outcome of a call
    it sent there, or of a probe; trusted for `trust_s` seconds, then probed again."""

    def __init__(self, trust_s: float = HEALTH_S) -> None:
        self.trust_s = trust_s
        self._seen: tuple[float, str | None] | None = None
        """(when, why it is down; None: it answered)."""
        self._probing = asyncio.Lock()

    def saw(self, down: str | None) -> None:
        self._seen = (time.monotonic(), down)

    def seen(self) -> tuple[bool, str | None]:
        """(whether what was seen still holds, why the plane is down or None)."""
        if self._seen is None:
            return False, None
        at, down = self._seen
        return time.monotonic() - at <= self.trust_s, down

    async def down(self, host: str, port: int) -> str | None:
        """Why the plane at host:port is down (None: it answers), probing it if what was seen
        no longer holds; one probe at a time, the others take its answer."""
        fresh, down = self.seen()
        if fresh:
            return down
        async with self._probing:
            fresh, down = self.seen()
            if not fresh:
                down = await probe(host, port)
                self.saw(down)
            return down


async def probe(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the model plane answers `GET /v1/models` below 500 within `timeout_s`; else
    what went wrong."""
    asked = f"GET http://{host}:{port}{PROBE_PATH}"
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(
                    f"GET {PROBE_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                await writer.drain()
                status_line = await reader.readline()
            finally:
                writer.close()
    except TimeoutError:
        return f"{asked} had no answer within {timeout_s:g} s"
    except OSError as exc:
        return f"{asked}: {os.strerror(exc.errno) if exc.errno else exc}"
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return f"{asked} had no HTTP answer"
    status = int(parts[1])
    return None if status < 500 else f"{asked} answered {status}"


class RoutingRefused(Exception):
    """The policy lets no model serve the request; the message says why."""


def routed(flow: http.HTTPFlow) -> Route | None:
    """The routing decision of a flow that asked for `auto`; None for any other flow."""
    route = flow.metadata.get(METADATA_KEY)
    return route if isinstance(route, Route) else None


def decide(
    requested: str,
    api: Api,
    request_bytes: int,
    max_tokens: int | None,
    policy: AssignmentPolicy,
    wait_s: float = 0.0,
    max_wait_s: float | None = None,
    down: str | None = None,
) -> Route:
    """Local pair first; the cloud model only when local cannot serve, or is down (`down` says
    why) or saturated (the oldest local call in flight has waited `wait_s` > `max_wait_s`), and
    the policy allows.

    Raises RoutingRefused naming the reason and the policy field that would allow it.
    """
    role = AUTO_MODELS[requested]
    local_model = policy.pair if role == "normal" else f"{policy.pair}:thinking"
    why_not_local = None
    if api not in LOCAL_APIS:
        why_not_local = f"the local model plane does not serve the {api} API"
    elif policy.context is not None:
        needed = math.ceil(request_bytes / BYTES_PER_TOKEN) + (max_tokens or 0)
        if needed > policy.context:
            why_not_local = (
                f"about {needed} tokens (prompt + max_tokens) exceed the {policy.context}-token "
                f"context of {local_model}"
            )
    if why_not_local is None:
        if down is not None:
            busy = f"the local model plane is down: {down}"
        elif max_wait_s is not None and wait_s > max_wait_s:
            busy = (
                f"the local model plane is saturated: a call has been in flight {wait_s:.1f} s "
                f"(autovibe_local_queue_wait_s {max_wait_s:g} s)"
            )
        else:
            return Route(requested, "local", "local", local_model, "local pair first")
        cloud = _cloud(api, policy)
        if cloud is None:
            reason = f"local pair: {busy}, and the trial allows no cloud model for {api}"
            return Route(requested, "local", "local", local_model, reason)
        return Route(requested, "cloud", *cloud, busy)
    routing = policy.routing
    if not routing.allow_cloud or routing.cloud_model is None:
        raise RoutingRefused(
            f"{why_not_local}, and this trial does not allow cloud models "
            "(routing.allow_cloud is false)"
            if not routing.allow_cloud
            else f"{why_not_local}, and routing.cloud_model names no cloud model"
        )
    provider, _, model = routing.cloud_model.partition("/")
    if api not in CLOUD_APIS.get(provider, frozenset()):
        raise RoutingRefused(
            f"{why_not_local}, and the cloud model {routing.cloud_model} does not serve the "
            f"{api} API"
        )
    return Route(requested, "cloud", provider, model, why_not_local)


def _cloud(api: Api, policy: AssignmentPolicy) -> tuple[str, str] | None:
    """(provider, model) of the trial's cloud fallback when it is allowed and serves `api`."""
    routing = policy.routing
    if not routing.allow_cloud or routing.cloud_model is None:
        return None
    provider, _, model = routing.cloud_model.partition("/")
    return (provider, model) if api in CLOUD_APIS.get(provider, frozenset()) else None


class _PolicyCache:
    """Policy files as last read, read again only when their stat changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[Path, tuple[tuple[int, int], AssignmentPolicy]] = {}

    def get(self, path: Path) -> AssignmentPolicy | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        stamp = (st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._seen.get(path)
            if hit is not None and hit[0] == stamp:
                return hit[1]
        policy = AssignmentPolicy.model_validate_json(path.read_bytes())
        with self._lock:
            self._seen[path] = (stamp, policy)
        return policy


class AutoRouting:
    """The addon: applies each assignment's `Routing` policy to requests for `auto`."""

    def __init__(self) -> None:
        self.local: tuple[str, int] | None = None
        self.default_pair = "tiny"
        self.providers = Providers()
        self.policies = _PolicyCache()
        self.local_calls = LocalLoad()
        self.max_wait_s: float | None = None
        self.health = LocalHealth()

    def load(self, loader: Loader) -> None:
        dataroot.add_option(loader)
        loader.add_option(
            name="autovibe_auto_pair",
            typespec=str,
            default="tiny",
            help="Model pair a request for `auto` goes to when its assignment has no "
            "routing.json (the embedded stack's CPU pair).",
        )
        loader.add_option(
            name="autovibe_local_queue_wait_s",
            typespec=str,
            default="",
            help="Seconds a call to the local model plane may be in flight before the plane "
            "counts as saturated and `auto` goes to the trial's cloud model (when it allows "
            "one); empty: never.",
        )
        loader.add_option(
            name="autovibe_local_health_s",
            typespec=str,
            default=f"{HEALTH_S:g}",
            help="Seconds what the proxy saw of the local model plane (a call's outcome, a "
            "probe) holds before a request for `auto` with a cloud model to fall back on "
            "probes it again (GET /v1/models); 0: probe for each such request.",
        )

    def configure(self, updated: set[str]) -> None:
        if "autovibe_auto_pair" in updated:
            pair = ctx.options.autovibe_auto_pair.strip()
            if not pair or ":" in pair:
                raise exceptions.OptionsError(
                    f"autovibe_auto_pair must name a model pair (`tiny`), got {pair!r}"
                )
            self.default_pair = pair
        if "autovibe_model_hosts" in updated:
            # Declared by the metering addon: the first host is where local requests go.
            value = ctx.options.autovibe_model_hosts
            try:
                parse_model_hosts(value)
            except ValueError as exc:
                raise exceptions.OptionsError(f"autovibe_model_hosts: {exc}") from exc
            first = next((e.strip() for e in value.split(",") if e.strip()), "")
            host, _, port = first.rpartition(":")
            self.local = (host.strip("[]").lower(), int(port)) if first else None
        if providers.OPTIONS & updated:
            self.providers = providers.from_options()
        if "autovibe_local_queue_wait_s" in updated:
            value = ctx.options.autovibe_local_queue_wait_s.strip()
            try:
                self.max_wait_s = float(value) if value else None
            except ValueError:
                self.max_wait_s = -1.0
            if self.max_wait_s is not None and not self.max_wait_s >= 0:
                raise exceptions.OptionsError(
                    f"autovibe_local_queue_wait_s must be seconds (>= 0) or empty, got {value!r}"
                )
        if "autovibe_local_health_s" in updated:
            value = ctx.options.autovibe_local_health_s.strip()
            try:
                trust_s = float(value)
            except ValueError:
                trust_s = -1.0
            if not trust_s >= 0:
                raise exceptions.OptionsError(
                    f"autovibe_local_health_s must be seconds (>= 0), got {value!r}"
                )
            self.health.trust_s = trust_s

    @fail_closed_async
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        await self._route(flow)
        if flow.response is None and self._is_local(flow):
            self.local_calls.sent(flow.id)

    def response(self, flow: http.HTTPFlow) -> None:
        self.local_calls.done(flow.id)
        response = flow.response
        if response is not None and self._is_local(flow) and refused(flow) is None:
            status = response.status_code  # an answer of the plane's, not one of our refusals
            self.health.saw(f"it answered {status}" if status in DOWN_STATUSES else None)

    def error(self, flow: http.HTTPFlow) -> None:
        self.local_calls.done(flow.id)
        if (
            flow.response is None
            and flow.error is not None
            and flow.server_conn.timestamp_tcp_setup is None
            and self._is_local(flow)
        ):
            # Never connected (refused, unreachable, timed out): the plane, not the client.
            self.health.saw(f"a call could not connect ({flow.error.msg})")

    def _is_local(self, flow: http.HTTPFlow) -> bool:
        return (flow.request.host.lower(), flow.request.port) == self.local

    async def _route(self, flow: http.HTTPFlow) -> None:
        api = llm_api(flow)
        if api is None:
            return
        body = flow.request.get_content(strict=False) or b""
        if b"auto" not in body and b"\\u" not in body:
            return  # cannot name `auto` (unless spelt with \u escapes): no need to parse it
        doc = _json_object(body)
        requested = doc.get("model") if doc is not None else None
        if not isinstance(requested, str) or requested not in AUTO_MODELS or doc is None:
            return
        policy = self._policy(identity_of(flow))
        asked = output_cap(api, doc).asked
        wait_s = self.local_calls.wait_s()
        try:
            route = decide(requested, api, len(body), asked, policy, wait_s, self.max_wait_s)
            if route.target == "local":
                down = await self._down(api, policy)
                if down is not None:
                    route = decide(requested, api, len(body), asked, policy, down=down)
        except RoutingRefused as exc:
            refuse(
                flow,
                403,
                {
                    "error": "cloud_not_allowed",
                    "requested_model": requested,
                    "pair": policy.pair,
                    "detail": f"cannot route {requested!r}: {exc}",
                },
            )
            return
        self._send(flow, route)
        doc["model"] = route.model
        flow.request.set_content(json.dumps(doc).encode())
        flow.metadata[METADATA_KEY] = route

    async def _down(self, api: Api, policy: AssignmentPolicy) -> str | None:
        """Why the local plane is down, or None: probed only when a cloud model could take the
        call; otherwise what was last seen, for the record."""
        if self.local is None:
            return None
        if _cloud(api, policy) is None:
            fresh, down = self.health.seen()
            return down if fresh else None
        return await self.health.down(*self.local)

    def _policy(self, identity: MachineIdentity | None) -> AssignmentPolicy:
        if identity is not None:
            path = policy_path(
                dataroot.current(), identity.project, identity.trial, identity.assignment
            )
            try:
                found = self.policies.get(path)
            except (OSError, ValidationError) as exc:
                # Unreadable: refuse (fail_closed) rather than guess another trial's policy.
                raise RuntimeError(f"routing policy {path} is unreadable: {exc}") from exc
            if found is not None:
                return found
        return AssignmentPolicy(pair=self.default_pair)

    def _send(self, flow: http.HTTPFlow, route: Route) -> None:
        """Point the request at the route's provider; a request already there stays."""
        request = flow.request
        if route.target == "local":
            if self.local is None:
                raise RuntimeError("autovibe_model_hosts names no local model plane")
            if (request.host.lower(), request.port) != self.local:
                request.scheme, request.host, request.port = "http", *self.local
            return
        if self.providers.at(request.host, request.port) == route.provider:
            return
        where = self.providers.where(route.provider)
        if where is None:
            raise RuntimeError(f"no host known for cloud provider {route.provider!r}")
        request.scheme, request.host, request.port = where


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None
