"""Where a worker may go: the egress policy, checked before anything is forwarded.

Allowed: the local model plane (by address, `proxy.addresses`), the providers' API hosts
(configs/providers.yaml: `api.openai.com:443`; `autovibe_provider_hosts`), and the worker's
allowlist (rules of `contracts.egress`). That list comes with the worker's machine credential,
signed by the orchestrator: its trial's `egress.allow`, within its project's
(configs/projects.yaml). A credential that carries none gets the proxy's `autovibe_egress_allow`
(`AUTOVIBE_EGRESS_ALLOW`).
Everything else is answered 403 with a JSON body naming the host and the rule, for a CONNECT as
for a plain request, and captured like any flow. The proxy host's own service ports
(`autovibe_own_ports`: the control API, the proxy's listeners, its metrics, the counter and
state stores) are refused whatever the allowlist says; the model plane is the one service of
this host a worker may reach. Deciding is a dict lookup for the credential's policy, then
pure matching: no I/O per request.

One service of this host is reached by name instead: the payment broker. A worker's
`POST http://broker.autovibe/v1/projects/<its project>/payments` (plain HTTP through the proxy,
`BROKER_HOST`), or `GET …/payments/<id>` to see whether a held one was approved, is sent to the
control API at `autovibe_broker` (`host:port`); any other method, path or project on that name
is refused, as is the name when no broker is configured. A worker in transparent mode, which
has no proxy to name things for it, uses the broker's address instead (through its gateway):
the same door, the same checks; nothing else of the control API is reachable. The
worker authenticates to the API with its own machine credential (`Authorization: Bearer`), which
the API verifies again: the proxy only opens the one door. Every flow meant for the broker, sent
or refused, is marked (`for_broker`): capture keeps no purchase details of it.

Inside an allowed tunnel only HTTP and TLS pass: a raw TCP stream (SSH, a database protocol,
DNS over TCP, anything mitmproxy cannot read as HTTP) is closed unrelayed, and captured as a
TCP flow with the refusal as its error, unless its `host:port` is one of the worker's raw-TCP
exceptions (`egress.tcp_allow`, else `autovibe_egress_tcp_allow`); an allowed one is relayed
and captured as a TCP flow with its bytes and timings. In transparent mode a worker's DNS gets
answers only for A and AAAA questions about names its policy allows, and only from the
proxy's DNS listener: a query that reaches the proxy any other way (TCP to some `IP:53`) is
answered REFUSED, never forwarded.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

from mitmproxy import ctx, dns, exceptions, flow, http, tcp
from mitmproxy.addonmanager import Loader
from mitmproxy.net.dns import response_codes, types
from mitmproxy.proxy import commands, events, layer, layers, mode_specs
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.tcp import TcpErrorHook, TcpStartHook
from mitmproxy.proxy.utils import expect

from contracts.credentials import MachineIdentity
from contracts.egress import BROKER_HOST, Rule, parse_rules
from proxy.addons import providers
from proxy.addons.identity import identity_of, identity_of_client
from proxy.addons.metering import parse_model_hosts
from proxy.addons.refusal import fail_closed, refuse
from proxy.addresses import THIS_HOST, ModelPlane, keys

log = logging.getLogger(__name__)

DNS_TYPES = frozenset({types.A, types.AAAA})
POLICIES_KEPT = 1024
"""Policies of credentials kept parsed (one per distinct allowlist); dropped when full."""
PROXY_LISTS = ("AUTOVIBE_EGRESS_ALLOW", "AUTOVIBE_EGRESS_TCP_ALLOW")
CREDENTIAL_LISTS = ("the trial's egress.allow", "the trial's egress.tcp_allow")
PAYMENT_ID = re.compile(r"pay_[0-9a-f]{1,32}")
BROKER_KEY = "autovibe.egress.broker"
"""Set on a flow meant for the payment broker (by name or at its address), sent or refused."""


def for_broker(flow: http.HTTPFlow) -> bool:
    """Whether `flow` was meant for the payment broker: its bodies are purchase details."""
    return flow.metadata.get(BROKER_KEY) is True


def parse_ports(value: str) -> frozenset[int]:
    ports = set()
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        if not entry.isdigit() or not 0 < int(entry) < 65536:
            raise ValueError(f"{entry!r} is not a port")
        ports.add(int(entry))
    return frozenset(ports)


def parse_broker(value: str) -> tuple[str, int] | None:
    """`host:port` of the control API, or None when empty."""
    if not value.strip():
        return None
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise exceptions.OptionsError(f"autovibe_broker: {value!r} is not host:port")
    return host.strip("[]"), int(port)


def _broker_route(method: str, path: str, payments: str) -> bool:
    """A purchase request (`POST payments`) or a look at one (`GET payments/<id>`)."""
    if method == "POST":
        return path == payments
    tail = path.removeprefix(payments + "/")
    return method == "GET" and tail != path and PAYMENT_ID.fullmatch(tail) is not None


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    rule: str
    """Why: the rule that allowed it, or the one that refused it."""


@dataclass(frozen=True)
class EgressPolicy:
    model_plane: ModelPlane
    providers: frozenset[tuple[str, int]]
    allow: tuple[Rule, ...] = ()
    tcp_allow: tuple[Rule, ...] = ()
    own_ports: frozenset[int] = frozenset()
    lists: tuple[str, str] = PROXY_LISTS
    """Where `allow` and `tcp_allow` come from, as a refusal names them."""

    def decide(self, host: str, port: int) -> Verdict:
        """Whether a worker may reach `host:port` over HTTP(S), and by which rule."""
        host = host.strip("[]").lower().rstrip(".")
        if self.model_plane.serves(host, port):
            return Verdict(True, "model plane")
        # Names are resolved only for the ports that matter here: no lookup for every host.
        if port in self.own_ports and THIS_HOST in keys(host):
            return Verdict(False, f"port {port} is one of the proxy host's own services")
        if (host, port) in self.providers:
            return Verdict(True, f"provider {host}:{port}")
        for rule in self.allow:
            if rule.matches(host, port):
                return Verdict(True, f"{self.lists[0]} {rule.text}")
        for rule in self.tcp_allow:  # a raw-TCP exception is reached through a CONNECT
            if rule.matches(host, port):
                return Verdict(True, f"{self.lists[1]} {rule.text}")
        return Verdict(
            False, f"not the model plane, a provider, or in {self.lists[0]} (default deny)"
        )

    def raw_tcp(self, host: str, port: int) -> bool:
        """Whether a non-HTTP stream to `host:port` may pass (never to this host's services)."""
        if port in self.own_ports and THIS_HOST in keys(host):
            return False
        return any(rule.matches(host, port) for rule in self.tcp_allow)

    def resolvable(self, name: str) -> bool:
        """Whether a worker may have `name` resolved: some rule could let it through."""
        name = name.lower().rstrip(".")
        return (
            any(host == name for host, _ in self.providers)
            or any(plane_host == name for plane_host, _ in self.model_plane.hosts)
            or any(rule.matches_host(name) for rule in (*self.allow, *self.tcp_allow))
        )


class RefusedStream(layers.TCPLayer):
    """A raw TCP stream outside the policy: a TCP flow that carries its refusal as the error
    and what had arrived before it was recognised, closed at once, relayed to neither side."""

    def __init__(self, context: Context, reason: str, client: bytes, server: bytes) -> None:
        super().__init__(context)
        self.reason = reason
        self.first = [tcp.TCPMessage(True, client)] if client else []
        self.first += [tcp.TCPMessage(False, server)] if server else []

    @expect(events.Start)
    def start(self, _: events.Event) -> layer.CommandGenerator[None]:
        assert self.flow is not None
        yield TcpStartHook(self.flow)
        self.flow.messages.extend(self.first)
        self.flow.error = flow.Error(self.reason)
        yield TcpErrorHook(self.flow)
        self.flow.live = False
        self._handle_event = self.done
        yield commands.CloseConnection(self.context.client)
        if self.context.server.connected:
            yield commands.CloseConnection(self.context.server)

    _handle_event = start


class Egress:
    def __init__(self) -> None:
        self.policy = EgressPolicy(ModelPlane(()), frozenset())
        """The proxy's own lists: for a credential that carries none."""
        self.granted: dict[tuple[tuple[str, ...] | None, tuple[str, ...] | None], EgressPolicy] = {}
        """Credentials' lists -> their policy, parsed once (the proxy's model plane, providers
        and own ports with the credential's allowlists)."""
        self.broker: tuple[str, int] | None = None
        """The control API's address, where `BROKER_HOST` leads."""

    def load(self, loader: Loader) -> None:
        loader.add_option(
            name="autovibe_egress_allow",
            typespec=str,
            default="",
            help="Comma-separated hosts a worker may reach besides the model plane and the "
            "providers, when its credential carries no list of its own: host, host:port, "
            "*.suffix[:port], address or CIDR[:port].",
        )
        loader.add_option(
            name="autovibe_egress_tcp_allow",
            typespec=str,
            default="",
            help="Comma-separated host:port a worker may reach with raw TCP (not HTTP/TLS), "
            "when its credential carries no list of its own.",
        )
        loader.add_option(
            name="autovibe_broker",
            typespec=str,
            default="",
            help=f"host:port of the control API that http://{BROKER_HOST}/ reaches (only a "
            "worker's POST /v1/projects/<its project>/payments); empty: none.",
        )
        loader.add_option(
            name="autovibe_own_ports",
            typespec=str,
            default="",
            help="Comma-separated ports of this host's own services, never reachable from a "
            "worker whatever the allowlist says.",
        )

    def configure(self, updated: set[str]) -> None:
        if "autovibe_broker" in updated:
            self.broker = parse_broker(ctx.options.autovibe_broker)
        names = {
            "autovibe_egress_allow",
            "autovibe_egress_tcp_allow",
            "autovibe_own_ports",
            "autovibe_model_hosts",
            *providers.OPTIONS,
        }
        if not names & updated:
            return
        opts = ctx.options
        try:
            plane = ModelPlane(parse_model_hosts(opts.autovibe_model_hosts))
            self.policy = EgressPolicy(
                model_plane=plane,
                providers=providers.from_options().hosts(),
                allow=parse_rules(opts.autovibe_egress_allow),
                tcp_allow=parse_rules(opts.autovibe_egress_tcp_allow),
                own_ports=parse_ports(opts.autovibe_own_ports) - plane.ports,
            )
        except ValueError as exc:
            raise exceptions.OptionsError(f"egress policy: {exc}") from exc
        self.granted.clear()

    def policy_of(self, identity: MachineIdentity | None) -> EgressPolicy:
        """The policy of a worker: its credential's lists, or the proxy's where it has none."""
        if identity is None:
            return self.policy
        key = (identity.egress_allow, identity.egress_tcp_allow)
        policy = self.granted.get(key)
        if policy is not None:
            return policy
        if key == (None, None):
            return self.policy
        allow, tcp_allow = self.policy.allow, self.policy.tcp_allow
        try:
            if identity.egress_allow is not None:
                allow = parse_rules(identity.egress_allow)
            if identity.egress_tcp_allow is not None:
                tcp_allow = parse_rules(identity.egress_tcp_allow)
        except ValueError as exc:
            # Signed by the orchestrator, which checked it: a bug there, not a guess here.
            log.error("credential of %s has an unreadable egress list (%s): nothing allowed",
                      identity.assignment, exc)  # fmt: skip
            allow, tcp_allow = (), ()
        if len(self.granted) >= POLICIES_KEPT:
            self.granted.clear()
        policy = self.granted[key] = replace(
            self.policy, allow=allow, tcp_allow=tcp_allow, lists=CREDENTIAL_LISTS
        )
        return policy

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            self._check(flow)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and not flow.is_replay:
            self._check(flow)

    def _check(self, flow: http.HTTPFlow) -> None:
        host, port = flow.request.host, flow.request.port
        identity = identity_of(flow)
        if host.lower().rstrip(".") == BROKER_HOST:
            flow.metadata[BROKER_KEY] = True
            self._to_broker(flow, identity)
            return
        if self._is_broker(host, port):
            # Refused below unless it is the one door, but what it carries is still meant for
            # the broker (a purchase sent to the wrong path, say).
            flow.metadata[BROKER_KEY] = True
            request = flow.request
            mine = f"/v1/projects/{identity.project}/payments" if identity else ""
            if (
                identity is not None
                and request.scheme == "http"
                and _broker_route(request.method, request.path.split("?")[0], mine)
            ):
                self._to_broker(flow, identity)
                return  # anything else of the API is one of this host's own services
        verdict = self.policy_of(identity).decide(host, port)
        if verdict.allowed:
            return
        log.info(
            "egress refused: %s:%s for %s (%s)",
            host,
            port,
            identity.assignment if identity else "unidentified",
            verdict.rule,
        )
        refuse(
            flow,
            403,
            {
                "error": "egress_refused",
                "host": host,
                "port": port,
                "rule": verdict.rule,
                "detail": f"{host}:{port} is not reachable from a worker: {verdict.rule}",
            },
        )

    def _is_broker(self, host: str, port: int) -> bool:
        """Whether `host:port` is the broker's own address, as a worker in transparent mode
        (no proxy variables, no name the proxy could answer) reaches it: by the gateway, which
        the identity addon turns into this host."""
        if self.broker is None or port != self.broker[1]:
            return False
        name = host.strip("[]").lower().rstrip(".")
        return name == self.broker[0] or (
            THIS_HOST in keys(name) and THIS_HOST in keys(self.broker[0])
        )

    def _to_broker(self, flow: http.HTTPFlow, identity: MachineIdentity | None) -> None:
        """Send a worker's purchase request to the control API, or refuse it (403)."""
        request = flow.request
        expected = f"/v1/projects/{identity.project}/payments" if identity else None
        why = None
        if self.broker is None:
            why = "no payment broker is configured on this proxy"
        elif identity is None:
            why = "only a worker with its machine credential may ask the broker"
        elif request.method == "CONNECT" or request.scheme != "http":
            why = f"use plain http://{BROKER_HOST}/ through the proxy"
        elif not _broker_route(request.method, request.path.split("?")[0], expected or ""):
            why = f"only POST {expected} and GET {expected}/<id> are served here"
        if why is not None or self.broker is None:
            refuse(
                flow,
                403,
                {"error": "broker_refused", "host": BROKER_HOST, "rule": why, "detail": why},
            )
            return
        request.host, request.port = self.broker
        request.headers["Host"] = f"{self.broker[0]}:{self.broker[1]}"

    def running(self) -> None:
        # mitmproxy relays what it cannot read as HTTP or TLS as raw TCP; off here, and every
        # such stream is decided in `next_layer`: relayed when listed, refused otherwise.
        ctx.options.update(rawtcp=False)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """A stream that is not TLS or HTTP (a server that speaks first, a client that speaks
        neither) is relayed as raw TCP when the worker's policy lists its `host:port`, and
        refused otherwise (runs before mitmproxy's own choice of layer, which would take
        DNS over TCP to port 53 to an upstream resolver)."""
        address = nextlayer.context.server.address
        if nextlayer.layer is not None or address is None:
            return
        client, server = nextlayer.data_client(), nextlayer.data_server()
        first_line = client.partition(b"\n")[0]
        looks_like_http = client[:3].isalpha() and b" " in first_line
        if not (server and not client) and (
            not client or client.startswith(b"\x16") or looks_like_http
        ):
            return  # TLS, HTTP, or nothing to tell by yet
        host, port = str(address[0]), int(address[1])
        identity = identity_of_client(nextlayer.context.client)
        policy = self.policy_of(identity)
        if policy.raw_tcp(host, port):
            nextlayer.layer = layers.TCPLayer(nextlayer.context)
            return
        reason = (
            f"egress_refused: raw TCP to {host}:{port} is not HTTP or TLS and not in "
            f"{policy.lists[1]}"
        )
        log.info("%s (%s)", reason, identity.assignment if identity else "unidentified")
        nextlayer.layer = RefusedStream(nextlayer.context, reason, client, server)

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        """A raw stream that got past `next_layer` (mitmproxy's own `tcp_hosts`, say) carries
        nothing unless listed: mitmproxy cannot kill a TCP flow, so its messages go empty."""
        address = flow.server_conn.address
        policy = self.policy_of(identity_of(flow))
        if address is not None and policy.raw_tcp(str(address[0]), int(address[1])):
            return
        if flow.messages:
            flow.messages[-1].content = b""
        log.warning("raw TCP to %s not relayed: not in %s", address, policy.lists[1])

    def dns_request(self, flow: dns.DNSFlow) -> None:
        # After identity; mitmproxy's resolver has answered already, and its answer is
        # replaced here. An unidentified source was answered REFUSED by identity.
        if not isinstance(flow.client_conn.proxy_mode, mode_specs.DnsMode):
            # DNS over a tunnel or a transparent connection to some `IP:53` would be sent to
            # that server: only the proxy's DNS listener answers a worker.
            log.info("DNS to %s refused: not the proxy's DNS listener", flow.server_conn.address)
            flow.response = flow.request.fail(response_codes.REFUSED)
            return
        identity = identity_of(flow)
        if identity is None:
            return
        policy = self.policy_of(identity)
        questions = flow.request.questions
        if all(q.type in DNS_TYPES and policy.resolvable(q.name) for q in questions):
            return
        log.info("DNS refused: %s", [(q.name, types.to_str(q.type)) for q in questions])
        flow.response = flow.request.fail(response_codes.REFUSED)
