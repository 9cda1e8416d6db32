"""The egress policy, through the real mitmdump with a machine credential (issue 18, findings
1 and 2): a worker reaches the model plane, the providers and the operator's allowlist, nothing
else; never the proxy host's own services; and no raw TCP inside an allowed tunnel unless
listed. Each refusal is a 403 naming the host and the rule, captured in the spool, and the
server behind it sees nothing.
"""

from __future__ import annotations

import base64
import json
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))
from proxy_harness import Proxy, Upstream, connect_tunnel, metering_proxy, serve

BANNER = b"SSH-2.0-OpenSSH_9.2 hostile-tunnel-test\r\n"
HELLO = b"\x00\x01\x02 not http, not tls\n"


class BannerServer:
    """A TCP service that is neither HTTP nor TLS: it greets with BANNER (as SSH does) and
    echoes what it receives; `received` holds every byte a client got through to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = b""
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(BANNER)
                while data := conn.recv(1024):
                    self.received += data
                    conn.sendall(data)
            except OSError:
                pass


def talk_through(sock: socket.socket, wait_s: float) -> bytes:
    """Send HELLO into an open tunnel; what comes back within `wait_s` or until it closes."""
    sock.settimeout(wait_s)
    received = b""
    try:
        sock.sendall(HELLO)
        while HELLO not in received and (chunk := sock.recv(1024)):
            received += chunk
    except OSError:
        pass
    sock.close()
    return received


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Upstream]]:
    made = [serve() for _ in range(4)]
    names = ["model", "website", "allowed", "api"]
    yield {name: next(gen) for name, gen in zip(names, made, strict=True)}
    for gen in made:
        next(gen, None)


@pytest.fixture(scope="module")
def banners() -> dict[str, BannerServer]:
    return {"closed": BannerServer(), "listed": BannerServer()}


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory,
    servers: dict[str, Upstream],
    banners: dict[str, BannerServer],
) -> Iterator[Proxy]:
    closed, listed = banners["closed"].port, banners["listed"].port
    yield from metering_proxy(
        tmp_path_factory,
        servers["model"].port,
        # The control API's port is allowlisted too: it must stay refused all the same.
        api_port=servers["api"].port,
        egress_allow=[
            f"127.0.0.1:{servers['allowed'].port}",
            f"127.0.0.1:{servers['api'].port}",
            f"127.0.0.1:{closed}",
            f"127.0.0.1:{listed}",
        ],
        egress_tcp_allow=[f"127.0.0.1:{listed}"],
    )


def basic(proxy: Proxy, assignment: str) -> str:
    token = proxy.token(Proxy.identity(assignment))
    return "Basic " + base64.b64encode(f"m1:{token}".encode()).decode()


def test_a_host_outside_the_policy_is_refused_and_captured(
    proxy: Proxy, servers: dict[str, Upstream]
) -> None:
    website = servers["website"]
    with proxy.client(Proxy.identity("a-website")) as client:
        response = client.get(f"{website.url}/exfiltrate?data=secret")
    assert response.status_code == 403
    body = response.json()
    assert body["error"] == "egress_refused" and body["host"] == "127.0.0.1"
    assert body["port"] == website.port and "default deny" in body["rule"]
    assert website.seen == []
    record = proxy.spooled_one(assignment="a-website")
    assert record.status == 403 and record.provider is None


def test_a_connect_outside_the_policy_is_refused_before_the_tunnel_opens(
    proxy: Proxy, servers: dict[str, Upstream]
) -> None:
    target = f"127.0.0.1:{servers['website'].port}"
    sock, reply = connect_tunnel(proxy, target, basic(proxy, "a-connect"))
    sock.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403"), reply
    assert json.loads(body)["error"] == "egress_refused"
    assert servers["website"].seen == []
    assert proxy.spooled_one(assignment="a-connect").status == 403


def test_the_allowlist_lets_through(proxy: Proxy, servers: dict[str, Upstream]) -> None:
    with proxy.client(Proxy.identity("a-allowed")) as client:
        response = client.get(f"{servers['allowed'].url}/simple/")
    assert response.status_code == 200, response.text
    assert len(servers["allowed"].seen) == 1


def test_the_proxy_hosts_own_services_are_refused_whatever_the_allowlist(
    proxy: Proxy, servers: dict[str, Upstream]
) -> None:
    api = servers["api"]
    for spelling in ("127.0.0.1", "localhost"):
        with proxy.client(Proxy.identity("a-own")) as client:
            response = client.get(f"http://{spelling}:{api.port}/v1/trials")
        assert response.status_code == 403, response.text
        assert "own services" in response.json()["rule"]
    assert api.seen == []


def test_raw_tcp_in_an_allowed_tunnel_is_cut(
    proxy: Proxy, banners: dict[str, BannerServer]
) -> None:
    """`socat - PROXY:…` to an SSH-like server: the CONNECT is allowed, the stream is not HTTP."""
    server = banners["closed"]
    sock, reply = connect_tunnel(proxy, f"127.0.0.1:{server.port}", basic(proxy, "a-tcp"))
    assert reply.startswith(b"HTTP/1.1 200"), reply
    received = talk_through(sock, wait_s=3)
    assert BANNER not in received and HELLO not in received, received
    assert server.received == b"", "the client's bytes reached the server"


def test_raw_tcp_listed_as_an_exception_passes(
    proxy: Proxy, banners: dict[str, BannerServer]
) -> None:
    server = banners["listed"]
    sock, reply = connect_tunnel(proxy, f"127.0.0.1:{server.port}", basic(proxy, "a-tcp-listed"))
    assert reply.startswith(b"HTTP/1.1 200"), reply
    received = talk_through(sock, wait_s=10)
    assert HELLO in received, received
    assert HELLO in server.received
