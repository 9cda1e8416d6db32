"""Revoked machine credentials, in the proxy's addon chain (proxy_harness.addon_chain):
refused with 407 once revoked, on a new request and inside a tunnel opened before. That a
real mitmdump asks the identity addon about each request it carries, tunnelled ones too, is
test_proxy_flows's part."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy import http
from proxy_harness import Chain, addon_chain

from contracts.credentials import is_revoked, revoke, revoked_path
from contracts.dataroot import DataRoot

LOCAL = "127.0.0.1:8500"


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Chain]:
    with addon_chain(tmp_path) as chain:
        yield chain


def prompt(text: str) -> dict[str, str]:
    return {"model": "tiny", "prompt": text}


def refused_as_revoked(flow: http.HTTPFlow, assignment: str) -> None:
    assert flow.response is not None and flow.response.status_code == 407
    assert flow.response.headers["Proxy-Authenticate"] == 'Basic realm="autovibe"'
    assert json.loads(flow.response.get_content() or b"") == {
        "error": "proxy_auth",
        "detail": f"machine credential for assignment {assignment!r} was revoked: "
        "the assignment has ended",
    }


def test_revoked_credential_is_refused_with_407(chain: Chain) -> None:
    identity = chain.identity("a-revoked")
    url = f"http://{LOCAL}/v1/completions"
    before = chain.send(chain.flow(identity, url, prompt("before-revocation")))
    assert before.response is None  # forwarded

    revoke(chain.root, "a-revoked")

    refused_as_revoked(chain.send(chain.flow(identity, url, prompt("after"))), "a-revoked")
    # Another assignment's credential is untouched.
    other = chain.send(chain.flow(chain.identity("a-still-running"), url, prompt("other")))
    assert other.response is None


def test_revocation_reaches_an_open_tunnel(chain: Chain) -> None:
    """A CONNECT proven before the revocation does not carry requests made after it."""
    tunnel = chain.connect(chain.identity("a-tunnel"), LOCAL)
    assert tunnel.response is None  # the tunnel is open
    before = chain.tunnelled(tunnel, "/v1/completions", prompt("tunnel-before"))
    assert before.response is None and "Proxy-Authorization" not in before.request.headers
    revoke(chain.root, "a-tunnel")
    after = chain.tunnelled(tunnel, "/v1/completions", prompt("tunnel-after"))
    refused_as_revoked(after, "a-tunnel")


def test_revoke_is_idempotent_and_append_only(tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    revoke(root, "a-twice")
    revoke(root, "a-twice")
    lines = revoked_path(root).read_text().splitlines()
    assert lines.count("a-twice") == 1
    assert is_revoked(root, "a-twice")
    assert not is_revoked(root, "a-never")
    assert revoked_path(root).stat().st_mode & 0o777 == 0o600


def test_concurrent_revocations_all_land(tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path)
    ids = [f"a-concurrent-{i}" for i in range(40)]
    threads = [threading.Thread(target=revoke, args=(root, i)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(is_revoked(root, i) for i in ids)
    lines = revoked_path(root).read_text().splitlines()
    assert set(ids) <= set(lines)
