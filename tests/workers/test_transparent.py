"""Transparent interception, for real: a network namespace, iptables, mitmdump in transparent mode.

A process in the worker namespace has no proxy variables and connects straight to upstream
addresses (stand-ins for cloud APIs on an extra host address, one over TLS with a certificate
from a throwaway CA); the answers must come through mitmdump, identified by the worker's
source address, metered when they are priced LLM calls, and everything else must be blocked.
Names resolve through mitmdump's DNS listener: mitmdump runs in a mount namespace of its own
whose /etc/hosts maps api.openai.com and api.anthropic.com to the stand-ins (the machine's
hosts file, shared with others, is never touched); a stand-in on port 443 of that address
holds a certificate for those names from the throwaway CA.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from worker_harness import (
    PROXY_VARS,
    MeteringProxy,
    StandInCloud,
    direct_env,
    private_hosts_file,
    stop,
    throwaway_certificate,
)

from budget import open_ample
from contracts.config import load_prices
from contracts.credentials import MachineIdentity, load_or_create_key, mint, revoke
from contracts.dataroot import DataRoot
from contracts.settings import PROJECT_ROOT, Settings, free_port
from proxy.launch import mitmdump_argv, wait_ready
from secretstore import get_store
from workers import netns, sandbox
from workers.spec import AssignmentSpec, SandboxSpec

SECRET = "sk-transparent-provider-key-0123456789"
ANTHROPIC_SECRET = "sk-ant-transparent-provider-key-9876543210"
CLOUD_NAMES = ("api.openai.com", "api.anthropic.com")


def _unavailable() -> str | None:
    try:
        netns.require()
    except netns.NetnsUnavailable as exc:
        return str(exc)
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"network namespaces unavailable: {probe.stderr.strip()}"
    return None


pytestmark = pytest.mark.skipif(
    _unavailable() is not None, reason=f"transparent mode cannot run here: {_unavailable()}"
)


@dataclass(frozen=True)
class Cloud:
    address: str
    http: StandInCloud
    https: StandInCloud
    named: StandInCloud
    """On port 443, with a certificate for CLOUD_NAMES: what those names resolve to here."""


@dataclass(frozen=True)
class TransparentProxy:
    proxy: MeteringProxy
    port: int
    dns_port: int

    def identity(self, assignment: str) -> str:
        return mint(
            self.proxy.key,
            MachineIdentity(
                project="p1",
                trial="t1",
                assignment=assignment,
                machine="m1",
                expires=time.time() + 3600,
            ),
        )


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """Stand-in cloud APIs on an extra host address (on lo: no dummy interfaces here), outside
    any namespace: from a worker it is a remote address like any other."""
    address = f"10.214.{os.getpid() % 250}.1"
    subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True)
    try:
        folder = tmp_path_factory.mktemp("throwaway-ca")
        ca, server_pem = throwaway_certificate(folder, address, CLOUD_NAMES)
        http, https = StandInCloud(address), StandInCloud(address, cert=server_pem)
        named = StandInCloud(address, cert=server_pem, port=443)
        (folder / "upstream-ca.pem").write_bytes(ca.read_bytes())
        try:
            yield Cloud(address, http, https, named)
        finally:
            http.stop()
            https.stop()
            named.stop()
    finally:
        subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", "lo"], check=False)


@pytest.fixture(scope="module")
def model_plane() -> Iterator[StandInCloud]:
    """The local model plane's stand-in, on the proxy's host (OpenAI chat with usage)."""
    server = StandInCloud("127.0.0.1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def transparent_proxy(
    tmp_path_factory: pytest.TempPathFactory, cloud: Cloud, model_plane: StandInCloud
) -> Iterator[TransparentProxy]:
    """mitmdump with the platform's addons, a regular, a transparent and a DNS listener, in a
    mount namespace whose /etc/hosts names the stand-ins."""
    settings = Settings(
        data=tmp_path_factory.mktemp("transparent-data"),
        configs=PROJECT_ROOT / "configs",
        proxy_port=free_port(),
        model_port=model_plane.address[1],
        # The stand-ins (this host's, and the "remote" cloud address) are allowlisted, as an
        # operator lists a package registry: the egress policy is tested in tests/security.
        egress_allow=["127.0.0.1", cloud.address],
    )
    root = DataRoot.at(settings.data)
    key = load_or_create_key(root)
    open_ample(root.budget_counters, "p1", ["m1"])
    get_store("file", root).put("providers/openai", SECRET)
    get_store("file", root).put("providers/anthropic", ANTHROPIC_SECRET)
    port, dns_port = free_port(), free_port()
    upstream_ca = next(tmp_path_factory.getbasetemp().glob("throwaway-ca*/upstream-ca.pem"))
    hosts = root.root / "hosts"
    hosts.write_text(f"{Path('/etc/hosts').read_text()}\n{cloud.address} {' '.join(CLOUD_NAMES)}\n")
    argv = [
        *private_hosts_file(hosts),
        *mitmdump_argv(settings, transparent_port=port, dns_port=dns_port),
        "--set",
        f"autovibe_provider_hosts={cloud.address}:{cloud.http.address[1]}=openai",
        "--set",
        f"ssl_verify_upstream_trusted_ca={upstream_ca}",
    ]
    with (root.root / "mitmdump.log").open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=direct_env())
    try:
        wait_ready(settings.host, settings.proxy_port, timeout=60, process=process)
        wait_ready(settings.host, port, timeout=30, process=process)
        wait_ready(settings.host, dns_port, timeout=30, process=process)
        yield TransparentProxy(MeteringProxy(settings, root, key), port, dns_port)
    finally:
        stop(process)


@pytest.fixture
def lease(transparent_proxy: TransparentProxy) -> Iterator[tuple[netns.Lease, str]]:
    """A registered worker namespace for a fresh assignment: (lease, assignment)."""
    assignment = f"a-transparent-{uuid.uuid4().hex[:8]}"
    proxy = transparent_proxy.proxy
    with netns.transparent(
        proxy.root,
        assignment,
        transparent_proxy.identity(assignment),
        proxy.settings.host,
        transparent_proxy.port,
    ) as lease:
        yield lease, assignment
    _assert_gone(lease)


def run_inside(lease: netns.Lease, code: str, env: dict[str, str]) -> dict[str, Any]:
    """Run a Python snippet in the namespace with exactly `env`; its last JSON line, parsed."""
    done = subprocess.run(
        [*lease.exec_prefix(), sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def bare_env(**extra: str) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "HOME": "/tmp", **extra}
    assert not any(k.lower() in PROXY_VARS for k in env)
    return env


def test_direct_connections_are_intercepted_identified_and_metered(
    transparent_proxy: TransparentProxy, cloud: Cloud, lease: tuple[netns.Lease, str]
) -> None:
    the_lease, assignment = lease
    proxy = transparent_proxy.proxy
    ca = str(proxy.root.ca_cert)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    seen = run_inside(
        the_lease,
        f"""
        import json, httpx
        seen = {{}}
        with httpx.Client(trust_env=False, timeout=20, verify="{ca}") as client:
            page = client.get("{cloud.http.url}/page")
            seen["http"] = [page.status_code, page.text]
            tls = client.get("{cloud.https.url}/secure")
            seen["https"] = [tls.status_code, tls.text]
            llm = client.post("{cloud.http.url}/v1/chat/completions", json={body!r},
                              headers={{"Authorization": "Bearer placeholder"}})
            seen["llm"] = [llm.status_code, llm.json()["usage"]["total_tokens"]]
        print(json.dumps(seen))
        """,
        bare_env(),
    )

    # A page of the provider's host is no metered endpoint: intercepted and refused, no key.
    assert seen["http"][0] == 403 and "endpoint_not_metered" in seen["http"][1]
    # Verified against the data root's CA only: mitmproxy decrypted and re-encrypted.
    assert seen["https"] == [200, "stand-in cloud page\n"]
    assert seen["llm"] == [200, 18]
    assert cloud.http.seen[-1]["authorization"] == f"Bearer {SECRET}"  # injected on the way
    records = _spooled(proxy, assignment, count=3)
    by_path = {r.path: r for r in records}
    assert set(by_path) == {"/page", "/secure", "/v1/chat/completions"}
    for record in records:
        assert (record.project, record.trial, record.machine) == ("p1", "t1", "m1")
        assert record.host == cloud.address
    assert by_path["/secure"].url.startswith("https://")
    llm = by_path["/v1/chat/completions"]
    assert (llm.provider, llm.model) == ("openai", "gpt-4o-mini")
    assert llm.usage is not None and llm.usage.total_tokens == 18
    assert llm.cost_usd > 0


def test_the_gateway_leads_to_the_hosts_own_services(
    transparent_proxy: TransparentProxy, lease: tuple[netns.Lease, str]
) -> None:
    the_lease, assignment = lease
    local = StandInCloud(transparent_proxy.proxy.settings.host)  # a loopback-only service
    try:
        env = netns.worker_env(
            {"PATH": os.environ["PATH"], "HTTP_PROXY": "http://m1:x@127.0.0.1:1",
             "SERVICE": f"{local.url}/v1"},
            the_lease,
            transparent_proxy.proxy.settings.host,
        )  # fmt: skip
        assert env == {
            "PATH": os.environ["PATH"],
            "SERVICE": f"http://{the_lease.gateway}:{local.address[1]}/v1",
        }
        seen = run_inside(
            the_lease,
            """
            import json, os, httpx
            reply = httpx.get(os.environ["SERVICE"] + "/models", trust_env=False, timeout=20)
            print(json.dumps({"status": reply.status_code, "text": reply.text}))
            """,
            env,
        )
    finally:
        local.stop()
    assert seen == {"status": 200, "text": "stand-in cloud page\n"}
    assert [r.path for r in _spooled(transparent_proxy.proxy, assignment, count=1)] == [
        "/v1/models"
    ]


def test_the_model_plane_through_the_gateway_is_metered(
    transparent_proxy: TransparentProxy, model_plane: StandInCloud, lease: tuple[netns.Lease, str]
) -> None:
    """A worker reaches the model plane as `<gateway>:<model port>`: it is metered and priced
    as the local pair (before, the gateway's address was no provider and passed unmetered)."""
    the_lease, assignment = lease
    url = f"http://{the_lease.gateway}:{model_plane.address[1]}/v1/chat/completions"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    seen = run_inside(
        the_lease,
        f"""
        import json, httpx
        reply = httpx.post("{url}", json={body!r}, trust_env=False, timeout=20)
        print(json.dumps({{"status": reply.status_code}}))
        """,
        bare_env(),
    )
    assert seen == {"status": 200}
    (record,) = _calls(_spooled_until(transparent_proxy.proxy, assignment, _calls))
    assert (record.provider, record.model, record.status) == ("local", "tiny", 200)
    assert record.cost_usd > 0 and record.budget is not None


def test_udp_dns_and_unregistered_or_revoked_workers_are_blocked(
    transparent_proxy: TransparentProxy, cloud: Cloud, lease: tuple[netns.Lease, str]
) -> None:
    the_lease, assignment = lease
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind((cloud.address, 0))
    listener.settimeout(0.5)
    udp_port = listener.getsockname()[1]
    try:
        seen = run_inside(
            the_lease,
            f"""
            import json, socket, time
            seen = {{}}
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.sendto(b"escape", ("{cloud.address}", {udp_port}))
                seen["udp"] = "sent"
            except OSError as exc:
                seen["udp"] = type(exc).__name__
            started = time.monotonic()
            try:
                socket.getaddrinfo("api.openai.com", 443)
                seen["dns"] = "resolved"
            except OSError as exc:
                seen["dns"] = type(exc).__name__
            seen["dns_s"] = time.monotonic() - started
            print(json.dumps(seen))
            """,
            bare_env(),
        )
        with pytest.raises(TimeoutError):
            listener.recvfrom(100)
    finally:
        listener.close()
    assert seen["udp"] == "PermissionError"  # refused in the namespace; the host drops it too
    assert seen["dns"] == "gaierror"
    assert seen["dns_s"] < 5  # rejected, not left to time out

    probe = f"""
        import json, httpx
        try:
            reply = httpx.get("{cloud.http.url}/after", trust_env=False, timeout=10)
            print(json.dumps({{"status": reply.status_code}}))
        except httpx.TransportError as exc:
            print(json.dumps({{"status": type(exc).__name__}}))
        """
    # A new connection from a revoked or an unregistered worker is cut before any upstream.
    cut = {"ReadError", "RemoteProtocolError"}
    revoke(transparent_proxy.proxy.root, assignment)
    assert run_inside(the_lease, probe, bare_env())["status"] in cut
    netns.unregister(transparent_proxy.proxy.root, the_lease)
    assert run_inside(the_lease, probe, bare_env())["status"] in cut
    assert not any(s["path"] == "/after" for s in cloud.http.seen)


def test_a_crashed_runners_namespace_is_swept(transparent_proxy: TransparentProxy) -> None:
    assignment = f"a-crashed-{uuid.uuid4().hex[:8]}"
    proxy = transparent_proxy.proxy
    kept = netns.create(f"{assignment}-alive", proxy.settings.host, transparent_proxy.port)
    crashed = netns.create(assignment, proxy.settings.host, transparent_proxy.port)
    try:
        assert crashed.namespace in _netns_list()
        assert crashed.comment in _rules()
        removed = netns.sweep(keep=[f"{assignment}-alive"])
        assert crashed.namespace in removed and kept.namespace not in removed
        _assert_gone(crashed)
        assert kept.namespace in _netns_list() and kept.comment in _rules()
        netns.teardown(assignment)  # twice is fine
    finally:
        netns.teardown(f"{assignment}-alive")
        netns.teardown(assignment)
    _assert_gone(kept)


def test_a_sandboxed_agent_in_transparent_mode(
    transparent_proxy: TransparentProxy, cloud: Cloud, tmp_path: Path
) -> None:
    """The runner's shape: confine() → bubblewrap inside the namespace, no proxy variables."""
    sandbox.require_tools()
    proxy = transparent_proxy.proxy
    assignment = f"a-sandboxed-{uuid.uuid4().hex[:8]}"
    artifacts = tmp_path / "artifacts"
    (artifacts / "workspace").mkdir(parents=True)
    proxy_url = proxy.url_for(assignment)  # what the scheduler puts in the env today
    ca = str(proxy.root.ca_cert)
    spec = AssignmentSpec(
        assignment=assignment,
        project="p1",
        trial="t1",
        machine="m1",
        task_id="probe",
        repo=tmp_path,
        prompt="",
        test_command="true",
        fail_to_pass=["x"],
        pass_to_pass=[],
        timeout_s=60,
        agent="probe",
        model="tiny",
        endpoint="http://127.0.0.1:1/v1",
        env={"HTTP_PROXY": proxy_url, "http_proxy": proxy_url, "SSL_CERT_FILE": ca},
        artifacts=artifacts,
        data_root=proxy.root.root,
        sandbox=SandboxSpec(
            proxy_host=proxy.settings.host,
            proxy_port=proxy.settings.proxy_port,
            memory_mb=1024,
            cpus=1.0,
            hidden=[proxy.root.root],
            read_only=[proxy.root.ca_cert],
            network="transparent",
            transparent_port=transparent_proxy.port,
        ),
    )
    code = f"""
        import json, os, httpx
        reply = httpx.get("{cloud.https.url}/from-the-sandbox", timeout=20)
        assert httpx.get("{cloud.https.url}/tls-from-the-sandbox", timeout=20).is_success
        proxies = sorted(k for k in os.environ if k.lower().endswith("_proxy"))
        print(json.dumps({{"status": reply.status_code, "proxy_vars": proxies,
                          "hostname": os.uname().nodename}}))
        """
    env = {k: v for k, v in direct_env().items() if k.lower() not in PROXY_VARS}
    for folder in (spec.workspace, spec.output):  # as the runner makes them
        folder.mkdir(parents=True, exist_ok=True)
    with sandbox.confine(spec, [sys.executable, "-c", textwrap.dedent(code)], {
        **env, **spec.env
    }) as confined:  # fmt: skip
        argv = confined.argv
        # After the process-limit prefix (the pids cgroup), in the assignment's namespace.
        at = argv.index("ip")
        assert argv[at : at + 3] == ["ip", "netns", "exec"] and "--unshare-net" not in argv
        done = subprocess.run(
            argv,
            env=confined.env,
            pass_fds=confined.pass_fds,
            cwd=spec.workspace,
            capture_output=True,
            text=True,
            timeout=60,
        )
        lease_ns = argv[at + 3]
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"status": 200, "proxy_vars": [], "hostname": "autovibe-sandbox"}
    records = _spooled(proxy, assignment, count=2)
    assert {(r.path, r.machine) for r in records} == {
        ("/from-the-sandbox", "m1"),
        ("/tls-from-the-sandbox", "m1"),
    }
    assert lease_ns not in _netns_list()
    assert list((proxy.root.secrets / netns.SOURCES_DIR).iterdir()) == []


@pytest.fixture
def named_lease(transparent_proxy: TransparentProxy) -> Iterator[tuple[netns.Lease, str]]:
    """Like `lease`, with the proxy's DNS listener: names resolve inside."""
    assignment = f"a-named-{uuid.uuid4().hex[:8]}"
    proxy = transparent_proxy.proxy
    with netns.transparent(
        proxy.root,
        assignment,
        transparent_proxy.identity(assignment),
        proxy.settings.host,
        transparent_proxy.port,
        dns_port=transparent_proxy.dns_port,
    ) as lease:
        yield lease, assignment
    _assert_gone(lease)
    assert not (netns.NETNS_ETC / lease.namespace).exists()


BY_NAME = """
    import json, socket, ssl, time, httpx
    ca = {ca!r}
    seen = {{}}
    seen["resolv.conf"] = open("/etc/resolv.conf").read()
    seen["resolved"] = sorted({{a[4][0] for a in socket.getaddrinfo("api.openai.com", 443)}})
    started = time.monotonic()
    try:
        socket.getaddrinfo("nowhere.autovibe.invalid", 443)
        seen["unknown"] = "resolved"
    except socket.gaierror as exc:
        seen["unknown"] = exc.errno
    seen["unknown_s"] = time.monotonic() - started
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("{cloud}", 5353))
        seen["udp"] = "sent"
    except OSError as exc:
        seen["udp"] = type(exc).__name__
    tls = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("api.openai.com", 443), timeout=20) as raw:
        with tls.wrap_socket(raw, server_hostname="api.openai.com") as wrapped:
            cert = wrapped.getpeercert()
    seen["cert_names"] = sorted(v for k, v in cert["subjectAltName"] if k == "DNS")
    seen["issuer"] = dict(x[0] for x in cert["issuer"]).get("organizationName")
    with httpx.Client(trust_env=False, timeout=20, verify=ca) as client:
        chat = client.post(
            "https://api.openai.com/v1/chat/completions",
            json={{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "hi"}}]}},
            headers={{"Authorization": "Bearer placeholder"}},
        )
        seen["openai"] = [chat.status_code, chat.json()["usage"]["total_tokens"]]
        if {anthropic!r}:
            message = client.post(
                "https://api.anthropic.com/v1/messages",
                json={{"model": "claude-haiku-4-5", "max_tokens": 16,
                      "messages": [{{"role": "user", "content": "hi"}}]}},
                headers={{"x-api-key": "placeholder", "anthropic-version": "2023-06-01"}},
            )
            seen["anthropic"] = [message.status_code, message.json()["usage"]["output_tokens"]]
    print(json.dumps(seen))
    """


def test_cloud_apis_by_name_through_the_proxys_dns(
    transparent_proxy: TransparentProxy, cloud: Cloud, named_lease: tuple[netns.Lease, str]
) -> None:
    """No proxy variables: api.openai.com resolves through mitmdump's DNS listener, TLS is
    intercepted with the data-root CA, and the call is metered and keyed under its name."""
    the_lease, assignment = named_lease
    proxy = transparent_proxy.proxy
    before = len(cloud.named.seen)
    code = BY_NAME.format(ca=str(proxy.root.ca_cert), cloud=cloud.address, anthropic=True)
    seen = run_inside(the_lease, code, bare_env())

    assert seen["resolv.conf"].splitlines()[-1] == f"nameserver {the_lease.gateway}"
    assert seen["resolved"] == [cloud.address]
    # No rule of the egress policy names it: REFUSED by the proxy's DNS, answered at once.
    assert seen["unknown"] == socket.EAI_AGAIN
    assert seen["unknown_s"] < 5
    assert seen["udp"] == "PermissionError"  # only port 53 is let out, to the proxy
    # Verified against the data root's CA only, for the name: mitmproxy's certificate.
    assert "api.openai.com" in seen["cert_names"] and seen["issuer"] == "mitmproxy"
    assert seen["openai"] == [200, 18]
    assert seen["anthropic"] == [200, 5]
    upstream = {s["path"]: s for s in cloud.named.seen[before:] if s["path"].startswith("/v1")}
    assert upstream["/v1/chat/completions"]["authorization"] == f"Bearer {SECRET}"
    assert upstream["/v1/chat/completions"]["host"] == "api.openai.com"
    assert upstream["/v1/messages"]["x-api-key"] == ANTHROPIC_SECRET

    records = _spooled_until(proxy, assignment, lambda rs: len(_calls(rs)) == 2)
    calls = {r.host: r for r in _calls(records)}
    prices = load_prices(PROJECT_ROOT / "configs")
    openai, anthropic = calls["api.openai.com"], calls["api.anthropic.com"]
    assert openai.url == "https://api.openai.com/v1/chat/completions"
    assert (openai.provider, openai.model) == ("openai", "gpt-4o-mini")
    assert openai.cost_usd == prices.cost_usd("openai", "gpt-4o-mini", 11, 7) != 0
    assert (anthropic.provider, anthropic.model) == ("anthropic", "claude-haiku-4-5")
    assert anthropic.cost_usd == prices.cost_usd("anthropic", "claude-haiku-4-5", 13, 5) != 0
    for record in records:
        assert (record.project, record.trial, record.machine) == ("p1", "t1", "m1")
        assert SECRET not in record.model_dump_json()

    # The lookups are records too, attributed to the worker that asked.
    lookups = {(r.host, r.url): r for r in records if r.method == "DNS"}
    found = lookups[("api.openai.com", "dns:api.openai.com?type=A")]
    assert found.status == 200 and found.error is None
    assert found.response_body is not None
    answers = json.loads(found.response_body.text)
    assert answers["response_code"] == "NOERROR"
    assert [a["data"] for a in answers["answers"]] == [cloud.address]
    # A name no rule of the egress policy allows is not even looked up for a worker.
    missing = lookups[("nowhere.autovibe.invalid", "dns:nowhere.autovibe.invalid?type=A")]
    assert missing.error == "dns: REFUSED"


def test_a_sandbox_resolves_names_and_strangers_are_refused(
    transparent_proxy: TransparentProxy,
    cloud: Cloud,
    named_lease: tuple[netns.Lease, str],
    tmp_path: Path,
) -> None:
    """bubblewrap in the namespace binds its resolv.conf; once unregistered, lookups are
    REFUSED at once (and recorded unattributed)."""
    sandbox.require_tools()
    the_lease, assignment = named_lease
    proxy = transparent_proxy.proxy
    box = SandboxSpec(
        proxy_host=proxy.settings.host,
        proxy_port=proxy.settings.proxy_port,
        memory_mb=1024,
        cpus=1.0,
        hidden=[proxy.root.root],
        read_only=[proxy.root.ca_cert],
        network="transparent",
        transparent_port=transparent_proxy.port,
    )
    (tmp_path / "workspace").mkdir()
    code = BY_NAME.format(ca=str(proxy.root.ca_cert), cloud=cloud.address, anthropic=False)
    argv = sandbox.bwrap_argv(
        box,
        [sys.executable, "-c", textwrap.dedent(code)],
        writable=[tmp_path / "workspace"],
        workspace=tmp_path / "workspace",
        socket=None,
        timeout_s=60,
        lease=the_lease,
    )
    bwrap = argv[argv.index("bwrap") :]
    assert bwrap[bwrap.index(str(the_lease.resolv_conf)) + 1] == "/etc/resolv.conf"
    done = subprocess.run(argv, env=bare_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["resolved"] == [cloud.address] and seen["openai"] == [200, 18]
    records = _spooled_until(proxy, assignment, lambda rs: len(_calls(rs)) == 1)
    assert _calls(records)[0].host == "api.openai.com"

    netns.unregister(proxy.root, the_lease)
    refused = run_inside(
        the_lease,
        """
        import json, socket, time
        started = time.monotonic()
        try:
            socket.getaddrinfo("api.anthropic.com", 443)
            print(json.dumps({"dns": "resolved"}))
        except socket.gaierror as exc:
            print(json.dumps({"dns": exc.errno, "s": time.monotonic() - started}))
        """,
        bare_env(),
    )
    assert refused["dns"] != "resolved" and refused["s"] < 5
    strangers = _spooled_until(
        proxy, None, lambda rs: any(r.host == "api.anthropic.com" for r in rs)
    )
    assert {r.error for r in strangers if r.host == "api.anthropic.com"} == {"dns: REFUSED"}


class StandInResolver:
    """Something listening on port 53 (TCP and UDP) of the "remote" address: a resolver a
    worker might pick instead of the proxy's. It records what reaches it and answers nothing."""

    def __init__(self, address: str) -> None:
        self.tcp = socket.create_server((address, 53))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((address, 53))
        self.received: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._datagrams, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.tcp.accept()
                with conn:
                    conn.settimeout(2)
                    with contextlib.suppress(OSError):
                        while data := conn.recv(1024):
                            self.received.append(data)

    def _datagrams(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.received.append(self.udp.recv(1024))

    def close(self) -> None:
        for sock in (self.tcp, self.udp):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked on it
            sock.close()


@pytest.fixture(scope="module")
def resolver(cloud: Cloud) -> Iterator[StandInResolver]:
    server = StandInResolver(cloud.address)
    yield server
    server.close()


ASK_A_RESOLVER = """
    import json, socket, struct
    def query(name, qtype):
        qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0"
        return struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + qname + struct.pack(
            ">HH", qtype, 1)
    def answer(reply):
        if len(reply) < 12 or reply[:2] != b"\\x12\\x34":
            return "no answer"
        code, count = reply[3] & 0xF, struct.unpack(">H", reply[6:8])[0]
        return [code, socket.inet_ntoa(reply[-4:]) if count and code == 0 else None]
    seen = {{}}
    for name, qtype in (("api.openai.com", 1), ("api.openai.com", 16)):
        message = query(name, qtype)
        try:
            with socket.create_connection(({server!r}, 53), timeout=5) as s:
                s.sendall(struct.pack(">H", len(message)) + message)
                reply = b""
                while len(reply) < 2 or len(reply) < 2 + struct.unpack(">H", reply[:2])[0]:
                    chunk = s.recv(2048)
                    if not chunk:
                        break
                    reply += chunk
            seen[f"tcp/{{qtype}}"] = answer(reply[2:])
        except OSError as exc:
            seen[f"tcp/{{qtype}}"] = type(exc).__name__
        try:
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.settimeout(5)
            u.sendto(message, ({server!r}, 53))
            seen[f"udp/{{qtype}}"] = answer(u.recv(2048))
        except OSError as exc:
            seen[f"udp/{{qtype}}"] = type(exc).__name__
    print(json.dumps(seen))
    """


def test_dns_to_any_resolver_without_the_dns_listener_is_cut(
    transparent_proxy: TransparentProxy,
    cloud: Cloud,
    lease: tuple[netns.Lease, str],
    resolver: StandInResolver,
) -> None:
    """No DNS listener: TCP to `<any address>:53` reaches the transparent listener, where
    mitmproxy would relay DNS over TCP to that address; it is refused unrelayed and recorded.
    UDP never leaves the namespace."""
    the_lease, assignment = lease
    before = len(resolver.received)
    seen = run_inside(the_lease, ASK_A_RESOLVER.format(server=cloud.address), bare_env())
    assert seen["tcp/1"] == seen["tcp/16"] == "no answer"
    assert seen["udp/1"] == seen["udp/16"] == "PermissionError"
    assert len(resolver.received) == before
    records = _spooled(transparent_proxy.proxy, assignment, count=2)
    for record in records:
        assert (record.method, record.url) == ("TCP", f"tcp://{cloud.address}:53")
        assert record.error is not None and record.error.startswith("egress_refused: raw TCP")
        assert record.request_bytes > 12 and record.response_bytes == 0


def test_dns_to_any_resolver_is_answered_by_the_proxy_only(
    transparent_proxy: TransparentProxy,
    cloud: Cloud,
    named_lease: tuple[netns.Lease, str],
    resolver: StandInResolver,
) -> None:
    """With the DNS listener, a query to `<any address>:53`, TCP or UDP, is the proxy's to
    answer: A for a name the policy allows, REFUSED for the rest (a TXT question here); the
    resolver the worker named hears nothing."""
    the_lease, assignment = named_lease
    before = len(resolver.received)
    seen = run_inside(the_lease, ASK_A_RESOLVER.format(server=cloud.address), bare_env())
    assert seen["tcp/1"] == seen["udp/1"] == [0, cloud.address]  # the proxy's hosts file
    assert seen["tcp/16"] == seen["udp/16"] == [5, None]  # REFUSED
    assert len(resolver.received) == before
    records = _spooled(transparent_proxy.proxy, assignment, count=4)
    assert sorted((r.url, r.error) for r in records) == [
        ("dns:api.openai.com?type=A", None),
        ("dns:api.openai.com?type=A", None),
        ("dns:api.openai.com?type=TXT", "dns: REFUSED"),
        ("dns:api.openai.com?type=TXT", "dns: REFUSED"),
    ]


# -- helpers ---------------------------------------------------------------------------------


def _calls(records: list[Any]) -> list[Any]:
    return [r for r in records if r.method != "DNS"]


def _spooled_until(
    proxy: MeteringProxy, assignment: str | None, done: Callable[[list[Any]], bool]
) -> list[Any]:
    deadline = time.monotonic() + 10
    while True:
        records = proxy.spooled(assignment)
        if done(records) or time.monotonic() > deadline:
            assert done(records), records
            return records
        time.sleep(0.05)


def _spooled(proxy: MeteringProxy, assignment: str, count: int) -> list[Any]:
    deadline = time.monotonic() + 10
    while True:
        records = proxy.spooled(assignment)
        if len(records) >= count or time.monotonic() > deadline:
            assert len(records) == count, records
            return records
        time.sleep(0.05)


def _netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _rules() -> str:
    return "".join(
        subprocess.run(["iptables", "-w", "-t", table, "-S"], capture_output=True, text=True).stdout
        for table in ("nat", "filter")
    )


def _assert_gone(lease: netns.Lease) -> None:
    assert lease.namespace not in _netns_list()
    assert lease.namespace not in _rules()
    assert not Path(f"/sys/class/net/{lease.host_if}").exists()
    assert shutil.which("ip") is not None
