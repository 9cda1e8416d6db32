"""Where a worker may go: the egress policy, checked before anything is forwarded.

Allowed: the local model plane (by address, `proxy.addresses`), the providers' API hosts over
TLS (`api.openai.com:443`, `autovibe_provider_hosts`), and what the operator lists in
`autovibe_egress_allow` (`AUTOVIBE_EGRESS_ALLOW`: `host`, `host:port`, `*.suffix[:port]`,
`address` or `CIDR[:port]`; no port means any port). Everything else is answered 403 with a
JSON body naming the host and the rule, for a CONNECT as for a plain request, and captured
like any flow. The proxy host's own service ports (`autovibe_own_ports`: the control API, the
proxy's listeners, its metrics, the counter and state stores) are refused whatever the
allowlist says; the model plane is the one service of this host a worker may reach.

Inside an allowed tunnel only HTTP and TLS pass: a raw TCP stream (SSH, a database protocol,
anything mitmproxy cannot read as HTTP) is cut unless its `host:port` is listed in
`autovibe_egress_tcp_allow`. In transparent mode a worker's DNS gets answers only for A and
AAAA questions about names the policy allows; other questions are refused.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from mitmproxy import ctx, dns, exceptions, http, tcp
from mitmproxy.addonmanager import Loader
from mitmproxy.net.dns import response_codes, types
from mitmproxy.proxy import layer, layers

from proxy.addons.identity import identity_of
from proxy.addons.metering import CLOUD_HOSTS, parse_model_hosts, parse_provider_hosts
from proxy.addons.refusal import fail_closed, refuse
from proxy.addresses import THIS_HOST, ModelPlane, keys

log = logging.getLogger(__name__)

TLS_PORT = 443
DNS_TYPES = frozenset({types.A, types.AAAA})


@dataclass(frozen=True)
class Rule:
    """One allowlist entry: a host name, `*.suffix`, or a network; a port or any port."""

    text: str
    name: str | None
    suffix: str | None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    port: int | None

    def matches_host(self, host: str) -> bool:
        host = host.strip("[]").lower().rstrip(".")
        if self.name is not None:
            return host == self.name
        if self.suffix is not None:
            return host.endswith(self.suffix)
        assert self.network is not None
        try:
            return ipaddress.ip_address(host) in self.network
        except ValueError:
            return False  # names are not resolved to match a network: no lookups to decide

    def matches(self, host: str, port: int) -> bool:
        return (self.port is None or self.port == port) and self.matches_host(host)


def parse_rules(value: str) -> tuple[Rule, ...]:
    """`a.example:443,*.pypi.org,10.0.0.0/8:5432,[::1]:80` → rules; ValueError names the bad one."""
    rules = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        host, port = entry, None
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port_text = rest.removeprefix(":") if rest.startswith(":") else None
            if rest and port_text is None:
                raise ValueError(f"{entry!r} is not [address]:port")
        elif entry.count(":") == 1:
            host, port_text = entry.split(":")
        else:
            port_text = None
        if port_text is not None:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f"{entry!r}: the port must be 1-65535")
            port = int(port_text)
        host = host.lower().rstrip(".")
        network = None
        try:
            network = ipaddress.ip_network(host, strict=False)
        except ValueError:
            if not host or (any(c in host for c in "/ *") and not host.startswith("*.")):
                raise ValueError(f"{entry!r} is not a host, *.suffix, address or CIDR") from None
        if network is not None:
            rules.append(Rule(entry, None, None, network, port))
        elif host.startswith("*."):
            rules.append(Rule(entry, None, host[1:], None, port))
        else:
            rules.append(Rule(entry, host, None, None, port))
    return tuple(rules)


def parse_ports(value: str) -> frozenset[int]:
    ports = set()
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        if not entry.isdigit() or not 0 < int(entry) < 65536:
            raise ValueError(f"{entry!r} is not a port")
        ports.add(int(entry))
    return frozenset(ports)


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
                return Verdict(True, f"AUTOVIBE_EGRESS_ALLOW {rule.text}")
        return Verdict(
            False, "not the model plane, a provider, or in AUTOVIBE_EGRESS_ALLOW (default deny)"
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


class Egress:
    def __init__(self) -> None:
        self.policy = EgressPolicy(ModelPlane(()), frozenset())

    def load(self, loader: Loader) -> None:
        loader.add_option(
            name="autovibe_egress_allow",
            typespec=str,
            default="",
            help="Comma-separated hosts a worker may reach besides the model plane and the "
            "providers: host, host:port, *.suffix[:port], address or CIDR[:port].",
        )
        loader.add_option(
            name="autovibe_egress_tcp_allow",
            typespec=str,
            default="",
            help="Comma-separated host:port a worker may reach with raw TCP (not HTTP/TLS).",
        )
        loader.add_option(
            name="autovibe_own_ports",
            typespec=str,
            default="",
            help="Comma-separated ports of this host's own services, never reachable from a "
            "worker whatever the allowlist says.",
        )

    def configure(self, updated: set[str]) -> None:
        names = {
            "autovibe_egress_allow",
            "autovibe_egress_tcp_allow",
            "autovibe_own_ports",
            "autovibe_model_hosts",
            "autovibe_provider_hosts",
        }
        if not names & updated:
            return
        opts = ctx.options
        try:
            plane = ModelPlane(parse_model_hosts(opts.autovibe_model_hosts))
            extra = parse_provider_hosts(getattr(opts, "autovibe_provider_hosts", ""))
            self.policy = EgressPolicy(
                model_plane=plane,
                providers=frozenset({(h, TLS_PORT) for h in CLOUD_HOSTS} | set(extra)),
                allow=parse_rules(opts.autovibe_egress_allow),
                tcp_allow=parse_rules(opts.autovibe_egress_tcp_allow),
                own_ports=parse_ports(opts.autovibe_own_ports) - plane.ports,
            )
        except ValueError as exc:
            raise exceptions.OptionsError(f"egress policy: {exc}") from exc

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
        verdict = self.policy.decide(host, port)
        if verdict.allowed:
            return
        identity = identity_of(flow)
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

    def running(self) -> None:
        # mitmproxy relays what it cannot read as HTTP or TLS as raw TCP; off here, so such a
        # stream meets the HTTP layer and is closed as malformed. Listed exceptions are put
        # back one connection at a time (`next_layer`).
        ctx.options.update(rawtcp=False)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Put raw TCP back for a listed `host:port`: a server that speaks first, or a client
        that speaks neither TLS nor HTTP (runs before mitmproxy's own choice of layer)."""
        address = nextlayer.context.server.address
        if nextlayer.layer is not None or address is None:
            return
        if not self.policy.raw_tcp(str(address[0]), int(address[1])):
            return
        client = nextlayer.data_client()
        first_line = client.partition(b"\n")[0]
        looks_like_http = client[:3].isalpha() and b" " in first_line
        if (nextlayer.data_server() and not client) or (
            client and not client.startswith(b"\x16") and not looks_like_http
        ):
            nextlayer.layer = layers.TCPLayer(nextlayer.context)

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        """A raw stream that got past `next_layer` (mitmproxy's own `tcp_hosts`, say) carries
        nothing unless listed: mitmproxy cannot kill a TCP flow, so its messages go empty."""
        address = flow.server_conn.address
        if address is not None and self.policy.raw_tcp(str(address[0]), int(address[1])):
            return
        if flow.messages:
            flow.messages[-1].content = b""
        log.warning("raw TCP to %s not relayed: not in AUTOVIBE_EGRESS_TCP_ALLOW", address)

    def dns_request(self, flow: dns.DNSFlow) -> None:
        # After identity; mitmproxy's resolver has answered already, and its answer is
        # replaced here. An unidentified source was answered REFUSED by identity.
        if identity_of(flow) is None:
            return
        questions = flow.request.questions
        if all(q.type in DNS_TYPES and self.policy.resolvable(q.name) for q in questions):
            return
        log.info("DNS refused: %s", [(q.name, types.to_str(q.type)) for q in questions])
        flow.response = flow.request.fail(response_codes.REFUSED)
