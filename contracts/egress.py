"""Egress rules: the allowlist syntax of `AUTOVIBE_EGRESS_ALLOW`, configs/projects.yaml and a
trial's `egress` section, read the same way by the orchestrator (a trial may only narrow its
project's list) and by the proxy (which applies the list its worker's credential carries).

An entry is `host`, `host:port`, `*.suffix[:port]`, `address` or `CIDR[:port]` (an IPv6 one in
brackets when it has a port); no port means any port. Names are never resolved to match a
network: deciding needs no lookup.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

BROKER_HOST = "broker.autovibe"
"""The name a worker sends purchase requests to; the proxy alone knows where it leads (the
control API) and lets only a worker's `POST /v1/projects/<its project>/payments` through."""


def payments_url(project: str, address: str | None = None) -> str:
    """Where a worker of `project` asks to buy, through its proxy: by name, or at the broker's
    `host:port` for a worker in transparent mode (its gateway stands for that host)."""
    return f"http://{address or BROKER_HOST}/v1/projects/{project}/payments"


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

    def covers(self, other: Rule) -> bool:
        """Whether every host and port `other` allows is allowed by this rule too."""
        if self.port is not None and self.port != other.port:
            return False
        if other.name is not None:
            return self.matches_host(other.name)
        if other.suffix is not None:
            return self.suffix is not None and other.suffix.endswith(self.suffix)
        assert other.network is not None
        return (
            self.network is not None
            and self.network.version == other.network.version
            and other.network.subnet_of(self.network)  # type: ignore[arg-type]
        )


def parse_rules(value: str | Iterable[str]) -> tuple[Rule, ...]:
    """`a.example:443,*.pypi.org,10.0.0.0/8:5432,[::1]:80` (or those as a list) → rules;
    ValueError names the bad entry."""
    entries = value.split(",") if isinstance(value, str) else value
    return tuple(_parse(entry) for entry in (e.strip() for e in entries) if entry)


def _parse(entry: str) -> Rule:
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
    try:
        return Rule(entry, None, None, ipaddress.ip_network(host, strict=False), port)
    except ValueError:
        pass
    if not host or (any(c in host for c in "/ *,") and not host.startswith("*.")):
        raise ValueError(f"{entry!r} is not a host, *.suffix, address or CIDR")
    if host.startswith("*."):
        return Rule(entry, None, host[1:], None, port)
    return Rule(entry, host, None, None, port)


def uncovered(narrow: Iterable[str], wide: Iterable[str]) -> list[str]:
    """The entries of `narrow` that allow something no entry of `wide` allows."""
    rules = parse_rules(wide)
    return [rule.text for rule in parse_rules(narrow) if not any(w.covers(rule) for w in rules)]
