"""The egress policy's pure parts, in-process: which rule covers which (a trial may only
narrow its project's list), the policy of a credential (its lists, parsed once, or the
proxy's), and DNS that did not come through the proxy's DNS listener (refused, never sent on).
"""

from __future__ import annotations

import time

import pytest
from mitmproxy import exceptions, http
from mitmproxy.net.dns import response_codes
from mitmproxy.proxy import mode_specs
from mitmproxy.test import taddons, tflow

from contracts.credentials import MachineIdentity
from contracts.egress import BROKER_HOST, parse_rules, uncovered
from proxy.addons.capture import record_of
from proxy.addons.egress import Egress, for_broker
from proxy.addons.identity import METADATA_KEY


@pytest.mark.parametrize(
    ("narrow", "wide", "outside"),
    [
        (["pypi.org"], ["pypi.org"], []),
        (["pypi.org:443"], ["pypi.org"], []),
        (["pypi.org"], ["pypi.org:443"], ["pypi.org"]),  # any port is more than 443
        (["files.pythonhosted.org", "*.a.pythonhosted.org"], ["*.pythonhosted.org"], []),
        (["pythonhosted.org"], ["*.pythonhosted.org"], ["pythonhosted.org"]),
        (["*.org"], ["*.pythonhosted.org"], ["*.org"]),
        (["10.1.2.0/24:5432", "10.1.2.3"], ["10.0.0.0/8"], []),
        (["10.0.0.0/7"], ["10.0.0.0/8"], ["10.0.0.0/7"]),
        (["[::1]:80"], ["::/0"], []),
        (["10.0.0.1"], ["::/0"], ["10.0.0.1"]),
        (["example.com"], ["10.0.0.0/8"], ["example.com"]),  # names are never resolved
        (["a.example", "b.example"], [], ["a.example", "b.example"]),
    ],
)
def test_a_rule_covers_only_what_it_allows(
    narrow: list[str], wide: list[str], outside: list[str]
) -> None:
    assert uncovered(narrow, wide) == outside


@pytest.mark.parametrize("entry", ["a b", "host:0", "host:99999", "*", "[::1]x", "a/b"])
def test_a_malformed_rule_is_named(entry: str) -> None:
    with pytest.raises(ValueError, match="'"):
        parse_rules([entry])


def identity(allow: tuple[str, ...] | None, tcp: tuple[str, ...] | None = None) -> MachineIdentity:
    return MachineIdentity(
        "p1", "t1", "a1", "m1", time.time() + 60, egress_allow=allow, egress_tcp_allow=tcp
    )


def configured(ctx: taddons.context, egress: Egress, **options: str) -> None:
    """Configure `egress` as mitmdump would; metering declares the model plane's option."""
    ctx.options.add_option("autovibe_model_hosts", str, "", "the model plane (metering's)")
    ctx.configure(egress, autovibe_model_hosts="127.0.0.1:8500", **options)


def test_a_credentials_lists_replace_the_proxys_and_are_parsed_once() -> None:
    egress = Egress()
    with taddons.context(egress) as ctx:
        configured(ctx, egress, autovibe_egress_allow="pypi.org")
        assert egress.policy_of(None) is egress.policy
        assert egress.policy_of(identity(None)) is egress.policy
        narrowed = egress.policy_of(identity(("mirror.example",)))
        assert egress.policy_of(identity(("mirror.example",))) is narrowed
        assert not narrowed.decide("pypi.org", 443).allowed
        assert narrowed.decide("mirror.example", 443).rule == (
            "the trial's egress.allow mirror.example"
        )
        # An empty list is no list: nothing but the model plane and the providers.
        assert not egress.policy_of(identity(())).decide("mirror.example", 443).allowed
        # One list of its own, the proxy's for the other.
        git = egress.policy_of(identity(None, ("git.example:22",)))
        assert git.raw_tcp("git.example", 22) and git.decide("pypi.org", 443).allowed
        # Not readable (the orchestrator checks every list it signs): nothing is allowed.
        broken = egress.policy_of(identity(("a b",), ("c d",)))
        assert broken.allow == () and broken.tcp_allow == ()


@pytest.mark.parametrize("mode", ["transparent", "regular"])
def test_dns_that_is_not_for_the_proxys_listener_is_refused(mode: str) -> None:
    """A transparent connection to some `IP:53`, or a tunnel to it, would have mitmproxy send
    the query to that server: the proxy answers REFUSED instead."""
    egress = Egress()
    with taddons.context(egress) as ctx:
        configured(ctx, egress)
        flow = tflow.tdnsflow()
        flow.client_conn.proxy_mode = mode_specs.ProxyMode.parse(mode)
        flow.metadata[METADATA_KEY] = identity(None)
        flow.response = None
        egress.dns_request(flow)
        assert flow.response is not None
        assert flow.response.response_code == response_codes.REFUSED


def test_dns_for_the_proxys_listener_follows_the_callers_policy() -> None:
    egress = Egress()
    with taddons.context(egress) as ctx:
        configured(ctx, egress)
        for allow, refused in ((("dns.google",), False), (("other.example",), True)):
            flow = tflow.tdnsflow()  # an A question for dns.google, to the DNS listener
            flow.metadata[METADATA_KEY] = identity(allow)
            flow.response = None
            egress.dns_request(flow)
            assert (flow.response is not None) == refused


def broker_flow(method: str, path: str, *, who: MachineIdentity | None) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method = method
    flow.request.host, flow.request.port, flow.request.path = BROKER_HOST, 80, path
    if who is not None:
        flow.metadata[METADATA_KEY] = who
    return flow


def test_the_broker_door_opens_for_a_workers_own_purchases_only() -> None:
    egress = Egress()
    mine = "/v1/projects/p1/payments"
    with taddons.context(egress) as ctx:
        configured(ctx, egress, autovibe_own_ports="8400")
        closed = broker_flow("POST", mine, who=identity(None))
        egress.request(closed)  # no broker configured
        assert closed.response is not None and closed.response.status_code == 403
        ctx.configure(egress, autovibe_broker="127.0.0.1:8400")
        for method, path in [("POST", mine), ("GET", mine + "/pay_0123456789ab")]:
            sent = broker_flow(method, path, who=identity(None))
            egress.request(sent)
            assert sent.response is None  # forwarded, to the API's address (an own port else)
            assert (sent.request.host, sent.request.port) == ("127.0.0.1", 8400)
        for method, path, who in [
            ("GET", mine, identity(None)),
            ("GET", mine + "/../../trials", identity(None)),
            ("POST", mine + "/pay_0123456789ab", identity(None)),
            ("POST", "/v1/projects/p2/payments", identity(None)),
            ("POST", "/v1/trials", identity(None)),
            ("POST", mine, None),
        ]:
            refused = broker_flow(method, path, who=who)
            egress.request(refused)
            assert refused.response is not None, (method, path, who)
            assert refused.response.status_code == 403
            assert refused.response.json()["error"] == "broker_refused"
        # By address, as a transparent worker asks: the same door; the rest is an own service.
        at = broker_flow("POST", mine, who=identity(None))
        at.request.host, at.request.port = "127.0.0.1", 8400
        egress.request(at)
        assert at.response is None
        trials = broker_flow("GET", "/v1/trials", who=identity(None))
        trials.request.host, trials.request.port = "localhost", 8400
        egress.request(trials)
        assert trials.response is not None and trials.response.status_code == 403
        assert "own services" in trials.response.json()["rule"]
        # Every one of them, sent or refused, is marked as the broker's: capture keeps no
        # purchase details of it (a plain flow is not).
        assert all(for_broker(f) for f in (closed, sent, refused, at, trials))
        plain = tflow.tflow()
        egress.request(plain)
        assert not for_broker(plain)
        with pytest.raises(exceptions.OptionsError, match="not host:port"):
            ctx.configure(egress, autovibe_broker="nowhere")


def test_a_broker_flow_is_spooled_without_its_bodies() -> None:
    """Sizes only: `pay_to` and receipts are encrypted in the broker's attempt log."""
    egress = Egress()
    with taddons.context(egress) as ctx:
        configured(ctx, egress, autovibe_own_ports="8400", autovibe_broker="127.0.0.1:8400")
        flow = broker_flow("POST", "/v1/projects/p1/payments?to=0xabc", who=identity(None))
        flow.request.content = b'{"item": "x", "pay_to": "https://shop.example/checkout/42"}'
        egress.request(flow)
        flow.response = http.Response.make(201, b'{"receipt": "order-42"}')
    record = record_of(flow)
    assert "?" not in record.url and record.path == "/v1/projects/p1/payments"
    for body, size in ((record.request_body, 59), (record.response_body, 23)):
        assert body is not None
        assert (body.text, body.sha256, body.size, body.truncated) == ("", "", size, True)
    plain = record_of(tflow.tflow(resp=True))
    assert plain.request_body is not None and plain.request_body.text
