"""Transparent interception: a network namespace per assignment whose TCP all goes to the proxy.

`sandbox.network: transparent` runs the bubblewrap sandbox inside a namespace of its own
(`ip netns exec <ns> bwrap …`, bubblewrap then keeps that network) instead of the proxy bridge:

- a veth pair: the host side gets 10.213.<x>.<y+1>/30 (the *gateway*), the worker side .+2,
  the worker's default route goes through the gateway; no IPv6 on either end;
- host iptables rules, each tagged `autovibe-netns:<ns>:<assignment>` (so a crash's leftovers
  can be swept): nat PREROUTING DNATs every TCP connection arriving on the host side to the
  proxy's transparent listener (mitmdump `--mode transparent@PORT`, which reads the original
  destination with SO_ORIGINAL_DST); filter INPUT accepts only that and REJECTs everything
  else from the veth (UDP, ICMP, …); filter FORWARD drops everything from it. A proxy on
  loopback is reached through `route_localnet` on the host side of the veth only;
- the worker's identity is its source address: `register` writes the assignment's machine
  credential to `vault-secrets/transparent-sources/<worker address>.json` (0600), where the
  proxy's identity addon looks it up; it is refused when the credential is revoked, like a
  proxy-auth credential, and the file goes with the namespace.

Inside, the worker needs no proxy variables: a direct connection to any address and port is
intercepted (HTTPS decrypted with the data root's CA, which the worker trusts through
SSL_CERT_FILE / REQUESTS_CA_BUNDLE / NODE_EXTRA_CA_CERTS as in proxy mode), forwarded to
its original destination, identified, metered and captured. The gateway address stands for
the host itself: the proxy sends a connection to `<gateway>:<port>` to its own host at that
port (the model server), so `worker_env` rewrites loopback URLs to the gateway.

Names: with the proxy's DNS listener (`dns_port`, mitmdump `--mode dns@PORT`), the worker's
port-53 traffic, UDP and TCP, whatever server it is addressed to, is DNATed to that listener,
and the namespace's resolv.conf names the gateway (`/etc/netns/<ns>/resolv.conf`, which `ip
netns exec` mounts over /etc/resolv.conf; the sandbox binds it there too). The proxy resolves
as its own host does and refuses unregistered sources; it answers only A and AAAA questions
about names its egress policy allows (`proxy.addons.egress`; anything else is REFUSED), and a
name it cannot resolve is answered NXDOMAIN at once. It also remembers which addresses it gave
a worker for which name, so that an HTTPS connection to such an address is metered and keyed
under that name (`proxy.addons.identity`). Without a DNS listener, or for anything else that is
not TCP, the namespace refuses at once (the sender gets EPERM), so a lookup fails rather than
times out and upstreams are reached by address (the model server through the gateway); TCP to
some address's port 53 then reaches the transparent listener, where the proxy refuses DNS over
TCP (it answers no DNS but its own listener's). TCP that is neither HTTP nor TLS is not relayed
by the proxy unless its address is one of the worker's raw-TCP exceptions (its credential's
`egress.tcp_allow`), as through a CONNECT tunnel in proxy mode; either way it is captured.
Needs root, `ip` (iproute2) and `iptables`.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from common.locks import exclusive
from contracts.dataroot import DataRoot, write_secret_file

TOOLS = {"ip": "iproute2", "iptables": "iptables"}
"""Programs transparent mode needs -> the Debian package that has each."""
TAG = "autovibe-netns"
"""Prefix of every iptables comment, namespace and registry entry this module creates."""
SUBNET = ipaddress.ip_network("10.213.0.0/16")
"""Where the /30 of each namespace is taken from."""
SOURCES_DIR = "transparent-sources"
"""Under the data root's secrets: worker address -> machine credential (the proxy reads it)."""
LOCK = Path("/run/autovibe-netns.lock")
NETNS_ETC = Path("/etc/netns")
"""iproute2's per-namespace /etc: `ip netns exec <ns>` bind-mounts `<ns>/*` over /etc/*."""
DNS_PORT = 53
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class NetnsUnavailable(RuntimeError):
    """Transparent mode cannot run here: not root, or `ip` / `iptables` missing."""


class NetnsError(RuntimeError):
    """An `ip` or `iptables` command failed; the message has the command and its stderr."""


@dataclass(frozen=True)
class Lease:
    """One assignment's namespace, as created."""

    assignment: str
    namespace: str
    host_if: str
    worker_if: str
    gateway: str
    """Host side of the veth; the worker's default route, and the host as the worker sees it."""
    address: str
    """Worker side of the veth: the source address the proxy identifies the worker by."""
    resolv_conf: Path | None = None
    """The namespace's resolv.conf (nameserver: the gateway), when the proxy resolves names."""

    @property
    def comment(self) -> str:
        return _comment(self.namespace, self.assignment)

    def exec_prefix(self) -> list[str]:
        """argv prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.namespace]


def require() -> None:
    """Raise `NetnsUnavailable` saying what is missing (root, or the Debian packages)."""
    missing = {tool: pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None}
    if missing:
        raise NetnsUnavailable(
            f"`sandbox.network: transparent` needs {', '.join(missing)} on PATH: "
            f"apt-get install {' '.join(missing.values())} (Debian packages), "
            "or use `sandbox.network: proxy`"
        )
    if os.geteuid() != 0:
        raise NetnsUnavailable(
            "`sandbox.network: transparent` needs root (network namespaces and iptables); "
            "run the worker as root or use `sandbox.network: proxy`"
        )


def names(assignment: str) -> tuple[str, str, str]:
    """(namespace, host interface, worker interface) of an assignment; interface names <= 15."""
    digest = hashlib.sha256(assignment.encode()).hexdigest()[:10]
    return f"{TAG}-{digest}", f"avh{digest}", f"avw{digest}"


def create(assignment: str, proxy_host: str, proxy_port: int, dns_port: int = 0) -> Lease:
    """The assignment's namespace, veth and rules, leftovers of an earlier attempt removed.

    With `dns_port` (the proxy's DNS listener) the worker's port-53 traffic goes there and its
    resolv.conf names the gateway; without, name lookups are refused like all non-TCP traffic.
    """
    require()
    teardown(assignment)
    namespace, host_if, worker_if = names(assignment)
    target = _dnat_target(proxy_host)
    try:
        with exclusive(LOCK):  # two runners must not pick the same /30
            gateway, address = _free_pair(assignment)
            _run("ip", "netns", "add", namespace)
            _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", worker_if)
            _run("ip", "addr", "add", f"{gateway}/30", "dev", host_if)
        resolv_conf = _write_resolv_conf(namespace, gateway) if dns_port else None
        lease = Lease(assignment, namespace, host_if, worker_if, gateway, address, resolv_conf)
        _sysctl(f"net/ipv6/conf/{host_if}/disable_ipv6", "1")
        if target is None or ipaddress.ip_address(target).is_loopback:
            _sysctl(f"net/ipv4/conf/{host_if}/route_localnet", "1")
        _run("ip", "link", "set", worker_if, "netns", namespace)
        _run("ip", "link", "set", host_if, "up")
        inside = lease.exec_prefix()
        with contextlib.suppress(NetnsError):  # a kernel without IPv6
            _run(*inside, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        _run("ip", "-n", namespace, "addr", "add", f"{address}/30", "dev", worker_if)
        _run("ip", "-n", namespace, "link", "set", "lo", "up")
        _run("ip", "-n", namespace, "link", "set", worker_if, "up")
        _run("ip", "-n", namespace, "route", "add", "default", "via", gateway)
        _rules(lease, target or "127.0.0.1", proxy_port, dns_port)
        # Inside too: what is not TCP is refused at once (a DNS lookup fails rather than waits
        # for packets that a host without forwarding drops silently). Gone with the namespace.
        _run(*inside, "iptables", "-w", "-A", "OUTPUT", "-o", "lo", "-j", "ACCEPT")
        if dns_port:
            _run(*inside, "iptables", "-w", "-A", "OUTPUT", "-p", "udp",
                 "--dport", str(DNS_PORT), "-j", "ACCEPT")  # fmt: skip
        _run(*inside, "iptables", "-w", "-A", "OUTPUT", "!", "-p", "tcp", "-j", "REJECT")
    except BaseException:
        teardown(assignment)
        raise
    return lease


def teardown(assignment: str) -> None:
    """Remove the assignment's rules, veth and namespace; nothing there is fine."""
    namespace, host_if, _ = names(assignment)
    _remove(namespace, host_if)


def sweep(keep: Iterable[str] = ()) -> list[str]:
    """Remove every namespace, veth and rule of ours but those of the `keep` assignments.

    Returns the namespaces removed (those left by crashed runners).
    """
    require()
    kept = {names(a)[0] for a in keep}
    found = set(_namespaces())
    if NETNS_ETC.is_dir():
        found.update(p.name for p in NETNS_ETC.iterdir() if p.name.startswith(f"{TAG}-"))
    for table in ("nat", "filter"):
        for line in _tagged_rules(table):
            found.add(_namespace_of(line))
    removed = []
    for namespace in sorted(found - kept):
        digest = namespace.removeprefix(f"{TAG}-")
        _remove(namespace, f"avh{digest}")
        removed.append(namespace)
    return removed


@contextlib.contextmanager
def transparent(
    root: DataRoot,
    assignment: str,
    token: str,
    proxy_host: str,
    proxy_port: int,
    dns_port: int = 0,
) -> Iterator[Lease]:
    """The assignment's namespace with its credential registered, for the time of the block."""
    lease = create(assignment, proxy_host, proxy_port, dns_port)
    try:
        register(root, lease, token)
        yield lease
    finally:
        unregister(root, lease)
        teardown(assignment)


def source_path(root: DataRoot, address: str) -> Path:
    """Registry entry of a worker address (read by proxy.addons.identity)."""
    return root.secrets / SOURCES_DIR / f"{ipaddress.ip_address(address)}.json"


def register(root: DataRoot, lease: Lease, token: str) -> None:
    """Let the proxy identify connections from the lease's worker address as `token`'s."""
    DataRoot.ensure(root.secrets / SOURCES_DIR, mode=0o700)
    entry = {"token": token, "gateway": lease.gateway, "assignment": lease.assignment}
    write_secret_file(source_path(root, lease.address), json.dumps(entry))


def unregister(root: DataRoot, lease: Lease) -> None:
    source_path(root, lease.address).unlink(missing_ok=True)


def worker_env(env: dict[str, str], lease: Lease, host: str) -> dict[str, str]:
    """`env` for a worker in the namespace: no proxy variables, the host's URLs via the gateway."""
    loopback = {"127.0.0.1", "localhost", host}
    out = {}
    for name, value in env.items():
        if name.lower() in PROXY_VARS:
            continue
        if "://" in value:
            with contextlib.suppress(ValueError):
                parts = urlsplit(value)
                if parts.hostname in loopback and parts.port is not None:
                    value = parts._replace(netloc=f"{lease.gateway}:{parts.port}").geturl()
        out[name] = value
    return out


def credential_of(env: dict[str, str]) -> str | None:
    """The machine token carried in a worker environment's proxy URL (its password)."""
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        if env.get(name):
            password = urlsplit(env[name]).password
            if password:
                return password
    return None


# -- plumbing --------------------------------------------------------------------------------


def _comment(namespace: str, assignment: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", assignment)[:180]
    return f"{namespace}:{safe}"


def _namespace_of(rule: str) -> str:
    match = re.search(rf"({TAG}-[0-9a-f]+):", rule)
    assert match is not None
    return match.group(1)


def _dnat_target(proxy_host: str) -> str | None:
    """Where the rules send TCP: the proxy's address, or None for a wildcard listener
    (then 127.0.0.1, which a wildcard listener also answers on)."""
    address = ipaddress.ip_address(proxy_host)  # the proxy host is an address, not a name
    if address.version != 4:
        raise NetnsUnavailable(f"transparent mode needs an IPv4 proxy host, not {proxy_host}")
    return None if address.is_unspecified else proxy_host


def _rules(lease: Lease, target: str, port: int, dns_port: int) -> None:
    tag = ["-m", "comment", "--comment", lease.comment]
    ipt = ["iptables", "-w"]
    _run(*ipt, "-t", "filter", "-I", "FORWARD", "1", "-i", lease.host_if, "-j", "DROP", *tag)
    _run(*ipt, "-t", "filter", "-I", "INPUT", "1", "-i", lease.host_if, "-j", "REJECT", *tag)
    _run(
        *ipt, "-t", "filter", "-I", "INPUT", "1", "-i", lease.host_if, "-p", "tcp",
        "-d", target, "--dport", str(port), "-j", "ACCEPT", *tag,
    )  # fmt: skip
    _run(
        *ipt, "-t", "nat", "-I", "PREROUTING", "1", "-i", lease.host_if, "-p", "tcp",
        "-j", "DNAT", "--to-destination", f"{target}:{port}", *tag,
    )  # fmt: skip
    if not dns_port:
        return
    # Inserted at the top after the rules above: port 53 goes to the DNS listener, not to the
    # transparent one, whatever resolver the worker asks.
    for protocol in ("udp", "tcp"):
        _run(
            *ipt, "-t", "filter", "-I", "INPUT", "1", "-i", lease.host_if, "-p", protocol,
            "-d", target, "--dport", str(dns_port), "-j", "ACCEPT", *tag,
        )  # fmt: skip
        _run(
            *ipt, "-t", "nat", "-I", "PREROUTING", "1", "-i", lease.host_if, "-p", protocol,
            "--dport", str(DNS_PORT), "-j", "DNAT", "--to-destination", f"{target}:{dns_port}",
            *tag,
        )  # fmt: skip


def _write_resolv_conf(namespace: str, gateway: str) -> Path:
    """`/etc/netns/<ns>/resolv.conf` naming the gateway, where the rules catch port 53."""
    folder = NETNS_ETC / namespace
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "resolv.conf"
    path.write_text(f"# {TAG}: the metering proxy's DNS listener\nnameserver {gateway}\n")
    path.chmod(0o644)
    return path


def _tagged_rules(table: str, namespace: str | None = None) -> list[str]:
    out = subprocess.run(
        ["iptables", "-w", "-t", table, "-S"], capture_output=True, text=True, check=True
    ).stdout
    marker = f"{namespace}:" if namespace else f"{TAG}-"
    return [line for line in out.splitlines() if line.startswith("-A ") and marker in line]


def _remove(namespace: str, host_if: str) -> None:
    if shutil.which("iptables") is not None:
        for table in ("nat", "filter"):
            for line in _tagged_rules(table, namespace):
                args = shlex.split(line)
                args[0] = "-D"
                subprocess.run(["iptables", "-w", "-t", table, *args], check=False)
    if Path(f"/sys/class/net/{host_if}").exists():
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
    if namespace in _namespaces():
        _run("ip", "netns", "del", namespace)
    shutil.rmtree(NETNS_ETC / namespace, ignore_errors=True)


def _namespaces() -> list[str]:
    folder = Path("/run/netns")
    if not folder.is_dir():
        return []
    return [p.name for p in folder.iterdir() if p.name.startswith(f"{TAG}-")]


def _free_pair(assignment: str) -> tuple[str, str]:
    """(gateway, worker) of the first /30 not in use, starting from the assignment's hash."""
    used = set(re.findall(r"inet (\d+\.\d+\.\d+\.\d+)", _run("ip", "-4", "-o", "addr", "show")))
    slots = SUBNET.num_addresses // 4
    start = int(hashlib.sha256(assignment.encode()).hexdigest(), 16) % slots
    for i in range(slots):
        base = SUBNET.network_address + 4 * ((start + i) % slots)
        gateway, worker = str(base + 1), str(base + 2)
        if gateway not in used:
            return gateway, worker
    raise NetnsUnavailable(f"no free /30 left in {SUBNET} for another worker namespace")


def _sysctl(key: str, value: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # IPv6 compiled out
        Path("/proc/sys", key).write_text(value)


def _run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetnsError(
            f"`{shlex.join(argv)}` failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result.stdout
