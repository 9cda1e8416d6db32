"""Which destinations are the local model plane: matched by address, never by spelling.

The model plane listens on `host:port` sockets (`autovibe_model_hosts`). A worker can reach the
same socket as `localhost:8500`, `0.0.0.0:8500`, `127.0.0.2:8500` (a server on all addresses)
or `[::ffff:127.0.0.1]:8500`: every one of those is the model plane and is metered and
budgeted as such. Destinations are compared by what they resolve to: any loopback or
unspecified address, or an address of this host, is "this host"; other addresses stand for
themselves. Names are resolved only when the port is a model-plane port, and remembered.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable

THIS_HOST = "this-host"
"""The key every address of the proxy's own machine maps to."""
NAMES_KEPT = 256


@functools.cache
def own_addresses() -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """This machine's addresses, as its own name resolves (interfaces named in /etc/hosts)."""
    found = set()
    for name in {socket.gethostname(), socket.getfqdn()}:
        try:
            infos = socket.getaddrinfo(name, None)
        except OSError:
            continue
        found |= {_ip(str(info[4][0])) for info in infos}
    return frozenset(a for a in found if a is not None)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _resolved(name: str) -> frozenset[str]:
    """The addresses `name` resolves to (none when it does not); `keys` remembers them."""
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return frozenset()
    return frozenset(str(info[4][0]) for info in infos)


_keys: dict[str, frozenset[str]] = {}


def keys(host: str) -> frozenset[str]:
    """What `host` stands for: its spelling (a name), and THIS_HOST for any address of this
    machine or else the addresses it is or resolves to.

    Asked several times for every proxied call (metering, egress), with the same few hosts:
    an answer is remembered (up to NAMES_KEPT spellings) unless it is a name that did not
    resolve, which is asked again next time (the name may come up, as a container's does)."""
    known = _keys.get(host)
    if known is not None:
        return known
    name = host.strip("[]").lower().rstrip(".")
    address = _ip(name)
    out = set() if address is not None else {f"name:{name}"}
    for text in [name] if address is not None else sorted(_resolved(name)):
        ip = _ip(text)
        if ip is None:
            continue
        local = ip.is_loopback or ip.is_unspecified or ip in own_addresses()
        out.add(THIS_HOST if local else str(ip))
    found = frozenset(out)
    if address is not None or len(found) > 1:
        if len(_keys) >= NAMES_KEPT:
            del _keys[next(iter(_keys))]
        _keys[host] = found
    return found


class ModelPlane:
    """The model plane's sockets; `serves(host, port)` whatever the destination's spelling."""

    def __init__(self, hosts: Iterable[tuple[str, int]]) -> None:
        self.hosts = frozenset(hosts)
        self.ports = frozenset(port for _, port in self.hosts)

    def serves(self, host: str, port: int) -> bool:
        if port not in self.ports:
            return False
        wanted = keys(host)
        return any(
            plane_port == port and not wanted.isdisjoint(keys(plane_host))
            for plane_host, plane_port in self.hosts
        )
