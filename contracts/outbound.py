"""Which addresses the orchestrator may call on a trial's behalf (budget webhooks, the git
URLs of task repositories).

A trial names the URL, so the URL is hostile: left alone it reaches the proxy host's own
services, the cloud metadata endpoint or the private network, and its failures tell a viewer
which ports are open. A host is called only when every address it resolves to is public and
not this machine's own, unless the server allows it by name or network
(`AUTOVIBE_WEBHOOK_ALLOW`, `AUTOVIBE_REPO_ALLOW`). A webhook's caller then connects to an
address checked here, not to the name again, so a second DNS answer cannot swap in a private
address (DNS rebinding); git resolves a repository's name again itself.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOW_SETTING = "AUTOVIBE_WEBHOOK_ALLOW"
REPO_ALLOW_SETTING = "AUTOVIBE_REPO_ALLOW"
SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:")


class AddressRefused(ValueError):
    """The host is, or resolves to, an address a trial may not reach."""


@dataclass(frozen=True)
class Allowlist:
    """Host names and networks the server lets webhooks reach whatever their addresses."""

    hosts: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, entries: Iterable[str], setting: str = ALLOW_SETTING) -> Allowlist:
        """`example.internal`, `10.1.0.0/16`, `127.0.0.1`; ValueError naming a bad entry."""
        hosts: set[str] = set()
        networks = []
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if "/" in entry or not entry.replace("-", "").replace(".", "").isalnum():
                    raise ValueError(
                        f"{setting}: {entry!r} is neither a host name nor a CIDR"
                    ) from None
                hosts.add(entry.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows(self, host: str, address: IPAddress | None = None) -> bool:
        if host.lower().rstrip(".") in self.hosts:
            return True
        return address is not None and any(address in n for n in self.networks)


def refusal(address: IPAddress) -> str | None:
    """Why a trial may not reach `address` (loopback, private, ...), or None when it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for what, hit in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("non-public", not address.is_global),
    ):
        if hit:
            return what
    if is_own_address(address):
        return "this host's own"
    return None


def is_own_address(address: IPAddress) -> bool:
    """Whether `address` is assigned to this machine: only then can a socket bind to it."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((str(address), 0))
        except OSError:
            return False
    return True


def checked_addresses(url: str, allow: Allowlist, setting: str = ALLOW_SETTING) -> list[IPAddress]:
    """The addresses the URL's host resolves to, every one of them checked; AddressRefused
    when any is not allowed (one bad answer among good ones is enough), OSError when the
    name does not resolve. `setting`: where the server lists exceptions, for the message."""
    if SCP_LIKE.match(url):  # git's `user@host:path` is ssh://user@host/path
        url = "ssh://" + url.replace(":", "/", 1)
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise AddressRefused("the URL names no host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    for address in addresses:
        why = refusal(address)
        if why is not None and not allow.allows(host, address):
            raise AddressRefused(
                f"host {host!r} is or resolves to a {why} address; only public addresses are "
                f"called unless the server lists the host or its network in {setting}"
            )
    return addresses


def check_url(url: str, allow: Allowlist, setting: str = ALLOW_SETTING) -> None:
    """At submission: AddressRefused for a host that is, or now resolves to, a forbidden
    address. A name that does not resolve yet passes; each call checks again."""
    try:
        checked_addresses(url, allow, setting)
    except (OSError, UnicodeError):  # not resolvable now; AddressRefused is not an OSError
        return
