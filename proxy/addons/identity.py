"""Who is calling: the machine credential a worker presents as proxy auth.

A worker's proxy URL is `http://<machine>:<token>@host:port`. Plain HTTP requests carry the
credential on every request; a CONNECT carries it once and the requests tunnelled through that
client connection inherit it. Anything without a valid credential is answered 407 here and
never reaches the upstream; so is a credential whose assignment has ended (revoked), even on
a tunnel that was opened before the revocation.

Transparent mode (`--mode transparent@PORT`, workers in a network namespace, `workers.netns`):
a worker sends no credential; a connection is identified by its source address, registered
with the machine credential in `vault-secrets/transparent-sources/<address>.json` for the
assignment's lifetime. An unregistered source is disconnected at once; the requests of a
registered one are treated like those of a CONNECT tunnel (revocation included). A connection
to the namespace's gateway address goes to this proxy's own host (the model server).

DNS (`--mode dns@PORT`, where the namespace's port 53 goes): a query from a registered source
carries its identity (capture records it); any other source, or a revoked one, is answered
REFUSED. The addresses answered to a worker for a name are remembered, per assignment: a
transparent request to one of them whose TLS SNI (or, over plain HTTP, Host) is that name is
sent to the name (`request.host`), so it is metered, keyed and captured as a call to
`api.openai.com`, not to an address. The name is believed only because this proxy gave out
that address for it; mitmproxy then connects to the name itself, with the name as SNI, so a
provider key goes only to a server that proves it is that name.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import weakref
from collections.abc import MutableMapping

from mitmproxy import connection, ctx, dns, exceptions, http, tcp
from mitmproxy.addonmanager import Loader
from mitmproxy.flow import Flow
from mitmproxy.net.dns import response_codes, types
from mitmproxy.net.http import url
from mitmproxy.proxy import mode_specs, server_hooks

from contracts.credentials import (
    CredentialError,
    MachineIdentity,
    VerifiedTokens,
    is_revoked,
    load_or_create_key,
    verify,
)
from contracts.dataroot import DataRoot
from proxy.addons import dataroot
from proxy.addons.refusal import fail_closed, refuse

log = logging.getLogger(__name__)

METADATA_KEY = "autovibe.identity"
REALM = 'Basic realm="autovibe"'
TRANSPARENT_SOURCES = "transparent-sources"
"""Under the secrets folder: `<address>.json` = {token, gateway}, written by workers.netns."""
NAMES_KEPT = 4096
"""Addresses remembered per worker (address, assignment) from DNS answers; the oldest go."""
WORKERS_KEPT = 1024
"""Workers whose DNS answers are remembered; those that asked first are forgotten first."""


def _this_host() -> str:
    """The address this proxy's host serves its own services on, as the proxy reaches them."""
    host: str = ctx.options.listen_host
    return "127.0.0.1" if host in ("", "0.0.0.0") else host


class ProxyAuthError(Exception):
    """The request carries no usable machine credential; the message says why."""


def identity_of(flow: Flow) -> MachineIdentity | None:
    """The verified caller of a flow, or None when it was refused or never identified."""
    identity = flow.metadata.get(METADATA_KEY)
    return identity if isinstance(identity, MachineIdentity) else None


_clients: MutableMapping[connection.Client, MachineIdentity] = weakref.WeakKeyDictionary()
"""Identities proven by a CONNECT or a transparent source's registration, per client
connection: for the requests tunnelled through it, and for the hooks that have no flow."""


def identity_of_client(client: connection.Client) -> MachineIdentity | None:
    """The verified caller of a client connection (a CONNECT tunnel, a transparent source), for
    a hook that has no flow yet (`next_layer`); None when it was not identified."""
    return _clients.get(client)


class Identity:
    def __init__(self) -> None:
        self.key: bytes | None = None
        self.tokens: VerifiedTokens | None = None
        """Credentials already verified with `key`: each is checked once, until it expires."""
        self.root: DataRoot | None = None
        # Identities proven by a CONNECT, for the requests tunnelled through that connection.
        self.tunnels = _clients
        # Transparent clients -> their namespace's gateway address (the host, as they see it).
        self.gateways: MutableMapping[connection.Client, str] = weakref.WeakKeyDictionary()
        # (worker address, assignment) -> {address our DNS answered: the names it answered for}.
        self.named: dict[tuple[str, str], dict[str, set[str]]] = {}

    def load(self, loader: Loader) -> None:
        dataroot.add_option(loader)

    def configure(self, updated: set[str]) -> None:
        if dataroot.OPTION in updated:
            root = dataroot.current()
            try:
                self.key = load_or_create_key(root)
                self.tokens = VerifiedTokens(self.key)
                self.root = root
            except (OSError, ValueError) as exc:
                raise exceptions.OptionsError(
                    f"cannot read the machine-credential key under {root.secrets}: {exc}"
                ) from exc

    def client_connected(self, client: connection.Client) -> None:
        if not isinstance(client.proxy_mode, (mode_specs.TransparentMode, mode_specs.DnsMode)):
            return
        address = client.peername[0].removeprefix("::ffff:")
        try:
            identity, gateway = self._registered(address)
        except ProxyAuthError as exc:
            log.info("transparent connection from %s refused: %s", address, exc)
            if isinstance(client.proxy_mode, mode_specs.TransparentMode):
                client.error = f"transparent connection refused: {exc}"
            return  # a DNS query is answered REFUSED (dns_request): it fails at once
        self.tunnels[client] = identity
        if isinstance(client.proxy_mode, mode_specs.TransparentMode):
            self.gateways[client] = gateway

    def dns_request(self, flow: dns.DNSFlow) -> None:
        identity = self.tunnels.get(flow.client_conn)
        if identity is not None:
            try:
                self._check_not_revoked(identity)
            except ProxyAuthError:
                identity = None
        if identity is None:
            # mitmproxy's resolver ran first (a default addon); its answer is not sent.
            flow.response = flow.request.fail(response_codes.REFUSED)
            return
        flow.metadata[METADATA_KEY] = identity

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        # A raw stream through a tunnel or from a transparent source: its caller, for capture.
        identity = self.tunnels.get(flow.client_conn)
        if identity is not None:
            flow.metadata[METADATA_KEY] = identity

    def dns_response(self, flow: dns.DNSFlow) -> None:
        identity = identity_of(flow)
        if identity is None or flow.response is None:
            return
        address = flow.client_conn.peername[0].removeprefix("::ffff:")
        named = self.named.setdefault((address, identity.assignment), {})
        while len(self.named) > WORKERS_KEPT:  # ended assignments leave their entries behind
            del self.named[next(iter(self.named))]
        for record in flow.response.answers:
            if record.type in (types.A, types.AAAA):
                answered = str(ipaddress.ip_address(record.data))
                named.setdefault(answered, set()).add(record.name.lower().rstrip("."))
        while len(named) > NAMES_KEPT:
            del named[next(iter(named))]

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        client = flow.client_conn
        identity = self.tunnels.get(client)
        if identity is None or client not in self.gateways:
            return  # only transparent requests are addressed by IP
        if flow.request.host == self.gateways[client]:
            # The namespace's gateway is this host: say so, so that the egress policy and
            # metering see the model plane (or a refused service of this host), not an address
            # of the worker's own network.
            flow.request.host = _this_host()
            return
        address = client.peername[0].removeprefix("::ffff:")
        names = self.named.get((address, identity.assignment), {}).get(flow.request.host)
        if not names:
            return
        # The name the client says it wants: TLS SNI, or the Host header over plain HTTP.
        claimed = client.sni or url.parse_authority(flow.request.host_header or "", False)[0]
        name = claimed.lower().rstrip(".")
        if name in names:
            flow.request.host = name  # mitmproxy connects to the name, with it as SNI

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        gateway = self.gateways.get(data.client)
        address = data.server.address
        if gateway is not None and address is not None and address[0] == gateway:
            data.server.address = (_this_host(), address[1])

    def _registered(self, address: str) -> tuple[MachineIdentity, str]:
        if self.key is None or self.root is None:
            raise ProxyAuthError("the proxy has no machine-credential key yet")
        path = self.root.secrets / TRANSPARENT_SOURCES / f"{address}.json"
        try:
            entry = json.loads(path.read_text())
            token, gateway = entry["token"], entry["gateway"]
        except FileNotFoundError as exc:
            raise ProxyAuthError(f"no worker namespace is registered for {address}") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ProxyAuthError(f"unreadable registration {path.name}: {exc}") from exc
        try:
            identity = verify(self.key, token)
        except CredentialError as exc:
            raise ProxyAuthError(str(exc)) from exc
        self._check_not_revoked(identity)
        return identity, str(gateway)

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if self._authenticate(flow):
            identity = identity_of(flow)
            assert identity is not None
            self.tunnels[flow.client_conn] = identity

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.is_replay:
            return
        tunnelled = self.tunnels.get(flow.client_conn)
        if tunnelled is not None:
            flow.request.headers.pop("Proxy-Authorization", None)
            try:
                self._check_not_revoked(tunnelled)
            except ProxyAuthError as exc:
                self._refuse(flow, exc)
                return
            flow.metadata[METADATA_KEY] = tunnelled
            return
        self._authenticate(flow)

    def _authenticate(self, flow: http.HTTPFlow) -> bool:
        header = flow.request.headers.get("Proxy-Authorization")
        flow.request.headers.pop("Proxy-Authorization", None)
        try:
            identity = self._verify(header)
        except ProxyAuthError as exc:
            self._refuse(flow, exc)
            return False
        flow.metadata[METADATA_KEY] = identity
        return True

    def _refuse(self, flow: http.HTTPFlow, exc: ProxyAuthError) -> None:
        log.info("proxy auth refused for %s: %s", flow.client_conn.peername, exc)
        refuse(
            flow,
            407,
            {"error": "proxy_auth", "detail": str(exc)},
            {"Proxy-Authenticate": REALM},
        )

    def _check_not_revoked(self, identity: MachineIdentity) -> None:
        if self.root is not None and is_revoked(self.root, identity.assignment):
            raise ProxyAuthError(
                f"machine credential for assignment {identity.assignment!r} was revoked: "
                "the assignment has ended"
            )

    def _verify(self, header: str | None) -> MachineIdentity:
        if self.tokens is None:
            raise ProxyAuthError("the proxy has no machine-credential key yet")
        if not header:
            raise ProxyAuthError(
                "proxy authentication required: use http://<machine>:<token>@host:port"
            )
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            raise ProxyAuthError(f"unsupported proxy auth scheme {scheme!r}; use Basic")
        try:
            user, sep, token = (
                base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ProxyAuthError("Proxy-Authorization is not valid base64 user:password") from exc
        if not sep:
            raise ProxyAuthError("Proxy-Authorization has no password (the machine token)")
        try:
            identity = self.tokens.verify(token)
        except CredentialError as exc:
            raise ProxyAuthError(str(exc)) from exc
        if user != identity.machine:
            raise ProxyAuthError(
                f"proxy user {user!r} does not match the credential's machine {identity.machine!r}"
            )
        self._check_not_revoked(identity)
        return identity
