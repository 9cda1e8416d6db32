"""Revoked machine credentials through the real mitmdump: refused with 407 once revoked."""

from __future__ import annotations

import base64
import json
import socket
import threading

import httpx
from proxy_harness import Proxy, Upstream, connect_tunnel, read_response

from contracts.credentials import is_revoked, revoke, revoked_path


def call(client: httpx.Client, upstream: Upstream, prompt: str) -> httpx.Response:
    return client.post(f"{upstream.url}/v1/completions", json={"model": "tiny", "prompt": prompt})


def test_revoked_credential_is_refused_with_407(proxy: Proxy, upstream: Upstream) -> None:
    identity = proxy.identity("a-revoked")
    token = proxy.token(identity)
    with proxy.client(identity, token) as client:
        assert call(client, upstream, "before-revocation").status_code == 200

    revoke(proxy.root, "a-revoked")

    with proxy.client(identity, token) as client:
        response = call(client, upstream, "after-revocation")
    assert response.status_code == 407, response.text
    assert response.headers["Proxy-Authenticate"] == 'Basic realm="autovibe"'
    assert response.json() == {
        "error": "proxy_auth",
        "detail": "machine credential for assignment 'a-revoked' was revoked: "
        "the assignment has ended",
    }
    assert not upstream.saw("after-revocation")

    # Another assignment's credential is untouched.
    with proxy.client(proxy.identity("a-still-running")) as client:
        assert call(client, upstream, "other-assignment").status_code == 200


def _post_in_tunnel(sock: socket.socket, target: str, prompt: str) -> bytes:
    body = json.dumps({"model": "tiny", "prompt": prompt}).encode()
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: {target}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return read_response(sock)


def test_revocation_reaches_an_open_tunnel(proxy: Proxy, upstream: Upstream) -> None:
    """A CONNECT proven before the revocation does not carry requests made after it."""
    me = proxy.identity("a-tunnel")
    credential = base64.b64encode(f"{me.machine}:{proxy.token(me)}".encode()).decode()
    target = f"127.0.0.1:{upstream.port}"
    sock, reply = connect_tunnel(proxy, target, f"Basic {credential}")
    with sock:
        assert reply.startswith(b"HTTP/1.1 200"), reply
        assert _post_in_tunnel(sock, target, "tunnel-before").startswith(b"HTTP/1.1 200")
        revoke(proxy.root, "a-tunnel")
        reply = _post_in_tunnel(sock, target, "tunnel-after")
    assert reply.startswith(b"HTTP/1.1 407"), reply
    assert b"was revoked" in reply
    assert not upstream.saw("tunnel-after")


def test_revoke_is_idempotent_and_append_only(proxy: Proxy) -> None:
    revoke(proxy.root, "a-twice")
    revoke(proxy.root, "a-twice")
    lines = revoked_path(proxy.root).read_text().splitlines()
    assert lines.count("a-twice") == 1
    assert is_revoked(proxy.root, "a-twice")
    assert not is_revoked(proxy.root, "a-never")
    assert revoked_path(proxy.root).stat().st_mode & 0o777 == 0o600


def test_concurrent_revocations_all_land(proxy: Proxy) -> None:
    ids = [f"a-concurrent-{i}" for i in range(40)]
    threads = [threading.Thread(target=revoke, args=(proxy.root, i)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(is_revoked(proxy.root, i) for i in ids)
    lines = revoked_path(proxy.root).read_text().splitlines()
    assert set(ids) <= set(lines)
