"""`autovibe up` / `down`: the embedded stack as background processes with pid files and logs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from contracts.config import load_models
from contracts.dataroot import DataRoot
from contracts.processes import runs
from contracts.settings import Settings
from proxy.indexer import ready_pid
from proxy.launch import mitmdump_argv
from serving.llamacpp import server_argv


class StackError(Exception):
    """A service did not come up; the message names its log."""


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    ready: Callable[[], bool]


def _http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=2, trust_env=False).status_code < 500
        except httpx.HTTPError:
            return False

    return check


def _port_open(host: str, port: int) -> Callable[[], bool]:
    def check() -> bool:
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex((host, port)) == 0

    return check


def model_argv(settings: Settings) -> list[str]:
    """The bare llama.cpp server, or its Ray Serve deployment when `model_replicas` ≥ 1."""
    if settings.model_replicas >= 1:
        return [
            sys.executable,
            "-m",
            "serving.rayserve_cpu",
            "--replicas",
            str(settings.model_replicas),
            "--port",
            str(settings.model_port),
        ]
    return server_argv(settings, load_models(settings.configs))


def _indexer_ready(settings: Settings) -> Callable[[], bool]:
    """The indexer has no port: ready once the process in its pid file has its store open."""
    root = DataRoot.at(settings.data)

    def check() -> bool:
        pid = running_pid(root, "indexer")
        return pid is not None and ready_pid(root) == pid

    return check


def services(settings: Settings) -> list[Service]:
    """In start order; `down` stops them in reverse, so the indexer's last catch-up comes after
    the proxy's last spooled flow."""
    api = [
        sys.executable,
        "-m",
        "uvicorn",
        "orchestrator.app:app",
        "--host",
        settings.host,
        "--port",
        str(settings.api_port),
        "--log-level",
        "warning",
    ]
    return [
        Service("model", model_argv(settings), _http_ok(f"{settings.model_url}/models")),
        Service("indexer", [sys.executable, "-m", "proxy.indexer"], _indexer_ready(settings)),
        Service(
            "proxy",
            mitmdump_argv(
                settings,
                transparent_port=settings.proxy_transparent_port,
                dns_port=settings.proxy_dns_port,
                indexer=False,
            ),
            _port_open(settings.host, settings.proxy_port),
        ),
        Service("api", api, _http_ok(f"{settings.api_url}/healthz")),
    ]


def _pidfile(root: DataRoot, name: str) -> Path:
    return root.run / f"{name}.pid"


def running_pid(root: DataRoot, name: str) -> int | None:
    path = _pidfile(root, name)
    if not path.exists():
        return None
    try:
        pid: int | None = int(path.read_text())
    except ValueError:
        pid = None
    if pid is None or not runs(pid):
        path.unlink(missing_ok=True)
        return None
    return pid


def up(settings: Settings, names: list[str] | None = None, timeout_s: float = 180) -> None:
    root = DataRoot.at(settings.data)
    DataRoot.ensure(root.run)
    env = {**os.environ, **settings.as_env()}
    for env_name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(env_name, None)
    for svc in services(settings):
        if names and svc.name not in names:
            continue
        if running_pid(root, svc.name) is not None and svc.ready():
            continue
        log = (root.run / f"{svc.name}.log").open("ab")
        proc = subprocess.Popen(
            svc.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        _pidfile(root, svc.name).write_text(str(proc.pid))
        deadline = time.monotonic() + timeout_s
        while not svc.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StackError(
                    f"{svc.name} did not start (exit {proc.poll()}); see {root.run / svc.name}.log"
                )
            time.sleep(0.2)


def down(settings: Settings) -> list[str]:
    root = DataRoot.at(settings.data)
    stopped = []
    for svc in reversed(services_names()):
        pid = running_pid(root, svc)
        if pid is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        # `runs`, not kill(pid, 0): a service this process started stays a zombie until reaped,
        # and was waited on for the whole 10 s (seen: 40 s to stop the stack in the e2e tests).
        while time.monotonic() < deadline:
            if not runs(pid):
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        _pidfile(root, svc).unlink(missing_ok=True)
        stopped.append(svc)
    return stopped


def services_names() -> list[str]:
    return ["model", "indexer", "proxy", "api"]


def status(settings: Settings) -> dict[str, int | None]:
    root = DataRoot.at(settings.data)
    return {name: running_pid(root, name) for name in services_names()}
