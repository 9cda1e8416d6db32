"""The egress policy, through the real mitmdump with a machine credential (issue 18, findings
1 and 2): a worker reaches the model plane, the providers and the operator's allowlist, nothing
else; never the proxy host's own services; and no raw TCP inside an allowed tunnel unless
listed, DNS over TCP to some server's port 53 included. Each refusal is a 403 naming the host
and the rule (a closed stream for raw TCP), captured in the spool, and the server behind it
sees nothing; a listed raw TCP stream is captured with its bytes and timings.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))
from proxy_harness import (
    BANNER,
    HELLO,
    BannerServer,
    Proxy,
    Upstream,
    connect_tunnel,
    metering_proxy,
    serve,
    talk_through,
)


def dns_address(banners: dict[str, BannerServer]) -> str:
    return str(banners["dns"].sock.getsockname()[0])


def dns_query(name: str, qtype: int) -> bytes:
    """A DNS question as sent over TCP: two bytes of length, then the message (RFC 1035 4.2.2)."""
    qname = b"".join(bytes([len(part)]) + part.encode() for part in name.split(".")) + b"\0"
    message = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + qname
    message += struct.pack(">HH", qtype, 1)
    return struct.pack(">H", len(message)) + message


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Upstream]]:
    made = [serve() for _ in range(4)]
    names = ["model", "website", "allowed", "api"]
    yield {name: next(gen) for name, gen in zip(names, made, strict=True)}
    for gen in made:
        next(gen, None)


@pytest.fixture(scope="module")
def banners() -> dict[str, BannerServer]:
    # A resolver stand-in on port 53 of another loopback address: it would echo a query back.
    # The address is drawn, so that concurrent runs do not compete for one port 53.
    for _ in range(100):
        host = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(2, 254)}"
        with contextlib.suppress(OSError):
            dns = BannerServer(host, 53, banner=b"")
            break
    else:
        raise RuntimeError("no loopback address with a free port 53")
    return {"closed": BannerServer(), "listed": BannerServer(), "dns": dns}


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
            f"{dns_address(banners)}:53",
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
    # The attempt is a TCP record: where it went, who tried, why it was refused, and what had
    # arrived from either side when the stream was recognised (the banner, or HELLO).
    record = proxy.spooled_one(assignment="a-tcp")
    assert (record.method, record.url) == ("TCP", f"tcp://127.0.0.1:{server.port}")
    assert record.error is not None and record.error.startswith("egress_refused: raw TCP")
    assert "AUTOVIBE_EGRESS_TCP_ALLOW" in record.error
    first = [b for b in (record.request_body, record.response_body) if b is not None]
    assert first and all(b.text in (BANNER.decode(), HELLO.decode()) for b in first), record


def test_raw_tcp_listed_as_an_exception_passes(
    proxy: Proxy, banners: dict[str, BannerServer]
) -> None:
    server = banners["listed"]
    sock, reply = connect_tunnel(proxy, f"127.0.0.1:{server.port}", basic(proxy, "a-tcp-listed"))
    assert reply.startswith(b"HTTP/1.1 200"), reply
    received = talk_through(sock, wait_s=10)
    assert HELLO in received, received
    assert HELLO in server.received
    # Captured as a TCP flow once both sides have closed: bytes each way, first bytes, timings.
    record = proxy.spooled_one(assignment="a-tcp-listed")
    assert (record.method, record.url, record.host) == (
        "TCP",
        f"tcp://127.0.0.1:{server.port}",
        "127.0.0.1",
    )
    assert (record.project, record.trial, record.machine) == ("p1", "t1", "m1")
    assert record.error is None and record.status is None
    assert (record.request_bytes, record.response_bytes) == (len(HELLO), len(BANNER + HELLO))
    assert record.request_body is not None and record.request_body.text == HELLO.decode()
    assert record.response_body is not None
    assert record.response_body.text == (BANNER + HELLO).decode()
    assert record.ttfb_ms is not None and 0 <= record.ttfb_ms <= record.duration_ms
    assert record.ts_start <= record.ts_end


def test_dns_over_tcp_to_some_port_53_is_not_let_through(
    proxy: Proxy, banners: dict[str, BannerServer]
) -> None:
    """A tunnel to an allowed `address:53`: mitmproxy would forward DNS over TCP to that
    server, here an A question for a name the policy allows; it is refused unrelayed, and
    recorded. Only the proxy's own DNS listener answers a worker."""
    server = banners["dns"]
    address = dns_address(banners)
    sock, reply = connect_tunnel(proxy, f"{address}:53", basic(proxy, "a-dns-tcp"))
    assert reply.startswith(b"HTTP/1.1 200"), reply
    query = dns_query("api.openai.com", 1)
    sock.settimeout(5)
    sock.sendall(query)
    try:
        answer = sock.recv(1024)
    except OSError as exc:  # reset rather than closed
        answer = repr(exc).encode()
    sock.close()
    assert b"\x12\x34" not in answer, answer  # no DNS answer to our query id
    assert server.received == b""
    record = proxy.spooled_one(assignment="a-dns-tcp")
    assert (record.method, record.url) == ("TCP", f"tcp://{address}:53")
    assert record.error is not None and record.error.startswith("egress_refused")
    assert record.request_bytes == len(query) and record.response_bytes == 0
