"""What the worker tests share: handles on the real model server and the real metering proxy."""

from __future__ import annotations

import ipaddress
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy.certs import CertStore

from budget import open_ample, open_counters, project_scope
from common import processes
from contracts.credentials import MachineIdentity, load_or_create_key, mint, proxy_url
from contracts.dataroot import DataRoot
from contracts.records import FlowRecord
from contracts.settings import PROJECT_ROOT, Settings, free_port
from proxy.launch import mitmdump_argv, wait_ready
from secretstore import get_store
from workers.agents.base import AgentOutcome, AgentRun, ExitCause

EXAMPLES = PROJECT_ROOT / "examples"
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def direct_env(**extra: str) -> dict[str, str]:
    """This process's environment without proxy settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    return {**env, **extra}


def stop(process: subprocess.Popen[bytes]) -> None:
    processes.stop(process)


@dataclass(frozen=True)
class ModelServer:
    settings: Settings

    @property
    def url(self) -> str:
        """OpenAI-compatible base URL, …/v1."""
        return self.settings.model_url


@dataclass(frozen=True)
class MeteringProxy:
    settings: Settings
    root: DataRoot
    key: bytes

    def url_for(self, assignment: str) -> str:
        """HTTP_PROXY value carrying a fresh machine credential for `assignment`."""
        identity = MachineIdentity(
            project="p1",
            trial="t1",
            assignment=assignment,
            machine="m1",
            expires=time.time() + 3600,
        )
        return proxy_url(
            self.settings.host, self.settings.proxy_port, "m1", mint(self.key, identity)
        )

    def spooled(self, assignment: str | None) -> list[FlowRecord]:
        """Spooled records of `assignment` (None: the unattributed ones)."""
        records = []
        for path in sorted(self.root.traffic_logs.glob("*/*/flows.jsonl")):
            for line in path.read_bytes().splitlines():
                record = FlowRecord.model_validate_json(line)
                if record.assignment == assignment:
                    records.append(record)
        return records


def metering_proxy_to(tmp_path_factory: Any, model_server: ModelServer) -> Iterator[MeteringProxy]:
    """mitmdump with the platform's addons and configs/, in front of `model_server` as the local
    model plane, project p1 with an ample budget for m1, until the generator is closed."""
    settings = Settings(
        data=tmp_path_factory.mktemp("proxy-data"),
        configs=PROJECT_ROOT / "configs",
        proxy_port=free_port(),
        model_port=model_server.settings.model_port,
    )
    root = DataRoot.at(settings.data)
    key = load_or_create_key(root)
    # The proxy refuses calls no budget covers: give the tests' project an ample one.
    open_ample(root.budget_counters, "p1", ["m1"])
    with (root.root / "mitmdump.log").open("wb") as log:
        process = subprocess.Popen(
            mitmdump_argv(settings), stdout=log, stderr=subprocess.STDOUT, env=direct_env()
        )
    try:
        wait_ready(settings.host, settings.proxy_port, timeout=60, process=process)
        yield MeteringProxy(settings, root, key)
    finally:
        stop(process)


class ScriptAgent:
    """Runs its prompt as a Python program in the workspace: a scripted, model-free agent
    (register it in `workers.agents.AGENTS` as `worker_harness:ScriptAgent`)."""

    name = "script"

    def __init__(self, root: Path | None = None) -> None:
        """As every agent is built (`get_agent`): with the data root, which it does not use."""

    def version(self) -> str:
        return "script"

    def command(self, run: AgentRun) -> list[str]:
        return [sys.executable, "-c", run.prompt]

    def collect(self, run: AgentRun, exit_code: int | None, timed_out: bool) -> AgentOutcome:
        cause: ExitCause = "timeout" if timed_out else "finished" if exit_code == 0 else "crashed"
        return AgentOutcome(cause, exit_code, run.artifacts / "agent.log")


class StandInCloud:
    """A stand-in for a cloud LLM API (one cannot be reached from here) on a host address a
    network namespace can route to: answers OpenAI chat completions (and, at /v1/messages,
    Anthropic Messages) with usage, anything else with a page; over TLS when given a
    certificate; on `port` (0: any free one). Remembers what it saw."""

    def __init__(self, host: str, cert: Path | None = None, port: int = 0) -> None:
        self.seen: list[dict[str, str]] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._answer(b"", "text/plain", b"stand-in cloud page\n")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v1/messages":
                    message = {
                        "id": "msg_standin",
                        "type": "message",
                        "role": "assistant",
                        "model": json.loads(body).get("model"),
                        "content": [{"type": "text", "text": "hi"}],
                        "stop_reason": "end_turn",
                        "usage": {"input_tokens": 13, "output_tokens": 5},
                    }
                    self._answer(body, "application/json", json.dumps(message).encode())
                    return
                answer = {
                    "id": "chatcmpl-standin",
                    "model": json.loads(body).get("model"),
                    "choices": [{"message": {"role": "assistant", "content": "hi"}}],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
                }
                self._answer(body, "application/json", json.dumps(answer).encode())

            def _answer(self, body: bytes, content_type: str, data: bytes) -> None:
                seen.append(
                    {
                        "path": self.path,
                        "authorization": self.headers.get("Authorization", ""),
                        "x-api-key": self.headers.get("x-api-key", ""),
                        "host": self.headers.get("Host", ""),
                        "body": body.decode(errors="replace"),
                    }
                )
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if cert is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"{self.scheme}://{host}:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def throwaway_certificate(
    folder: Path, address: str, names: Sequence[str] = ()
) -> tuple[Path, Path]:
    """(CA certificate, server cert+key PEM for `address` and DNS `names`) from a CA made for
    one test run."""
    store = CertStore.from_store(folder, "throwaway", 2048)
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(address))]
    sans += [x509.DNSName(name) for name in names]
    entry = store.get_cert(None, sans)
    server = folder / "server.pem"
    key = entry.privatekey.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    server.write_bytes(entry.cert.to_pem() + key)
    return folder / "throwaway-ca-cert.pem", server


def private_hosts_file(hosts: Path) -> list[str]:
    """argv prefix that runs a command in a mount namespace of its own with `hosts` as its
    /etc/hosts: names for stand-ins, without touching the machine's file (needs root)."""
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(hosts)]


@contextmanager
def proxy_to_providers(
    data: Path,
    address: str,
    names: Sequence[str],
    ca: Path,
    keys: dict[str, str],
    **overrides: Any,
) -> Iterator[MeteringProxy]:
    """The platform's mitmdump on a fresh data root at `data` (project p1 and machine m1 with
    ample budgets, `keys` stored as `providers/<name>`), in a mount namespace whose /etc/hosts
    sends `names` (the providers' real host names) to a stand-in at `address`, trusting `ca`
    upstream; ready. `overrides` are Settings fields instead of the real configs, free ports."""
    defaults = dict(
        configs=PROJECT_ROOT / "configs", proxy_port=free_port(), model_port=free_port()
    )
    settings = Settings(**{**defaults, **overrides, "data": data})
    root = DataRoot.at(settings.data)
    key = load_or_create_key(root)
    open_ample(root.budget_counters, "p1", ["m1"])
    for provider, secret in keys.items():
        get_store("file", root).put(f"providers/{provider}", secret)
    hosts = root.root / "hosts"
    hosts.write_text(f"{Path('/etc/hosts').read_text()}\n{address} {' '.join(names)}\n")
    argv = [
        *private_hosts_file(hosts),
        *mitmdump_argv(settings),
        "--set",
        f"ssl_verify_upstream_trusted_ca={ca}",
    ]
    with (root.root / "mitmdump.log").open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=direct_env())
    try:
        wait_ready(settings.host, settings.proxy_port, timeout=60, process=process)
        yield MeteringProxy(settings, root, key)
    finally:
        stop(process)


def settled_counters(root: DataRoot, project: str = "p1") -> tuple[Decimal, Decimal]:
    """The project's (spent, reserved) once no reservation is open, or after 5 s: for calls
    made one at a time, each settled just after its answer went out."""
    deadline = time.monotonic() + 5
    while True:
        store = open_counters("sqlite", path=root.budget_counters)
        try:
            state = store.describe(project_scope(project), time.time())
        finally:
            store.close()
        assert state is not None
        if state.reserved == 0 or time.monotonic() > deadline:
            return state.spent, state.reserved
        time.sleep(0.02)
