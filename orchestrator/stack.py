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

from common.processes import group_members, runs
from contracts.config import load_models
from contracts.dataroot import DataRoot
from contracts.intake import load_intake
from contracts.settings import Settings
from proxy.launch import mitmdump_argv
from serving.launch import server_argv
from serving.probe import ProbeFailed, cpu_served_names, prove
from traffic.indexer import ready_pid


class StackError(Exception):
    """A service did not come up; the message names its log."""


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    ready: Callable[[], bool]
    prove: Callable[[], None] | None = None
    """Once ready, a real use of the service (the model server's one-token completions);
    raises ProbeFailed. A server that answers its health check may still crash on first use."""


LOG_TAIL_LINES = 20


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
    """The Ray Serve deployment of llama.cpp when `model_replicas` ≥ 1, else the server
    `model_server` names (bare llama.cpp by default)."""
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
    served = cpu_served_names(load_models(settings.configs))
    return [
        Service(
            "model",
            model_argv(settings),
            _http_ok(f"{settings.model_url}/models"),
            lambda: prove(settings.model_url, served),
        ),
        Service("indexer", [sys.executable, "-m", "traffic.indexer"], _indexer_ready(settings)),
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
        # The intake channels, when configured: after the API, which they submit to.
        *([_intake_service(settings)] if _runs_intake(settings) else []),
    ]


def _runs_intake(settings: Settings) -> bool:
    """Whether the intake file configures a channel of its own process (GitHub, Telegram)."""
    if settings.intake_config is None:
        return False
    config = load_intake(settings.intake_config)
    return config.github is not None or config.telegram is not None


def _intake_service(settings: Settings) -> Service:
    root = DataRoot.at(settings.data)
    argv = [sys.executable, "-m", "orchestrator.intake.service"]
    return Service("intake", argv, lambda: running_pid(root, "intake") is not None)


def _pidfile(root: DataRoot, name: str) -> Path:
    return root.run / f"{name}.pid"


def _recorded_pid(root: DataRoot, name: str) -> int | None:
    try:
        return int(_pidfile(root, name).read_text())
    except (FileNotFoundError, ValueError):
        return None


def recorded(root: DataRoot, name: str) -> bool:
    """Whether `up` started this service and `down` has not stopped it since."""
    return _pidfile(root, name).exists()


def running_pid(root: DataRoot, name: str) -> int | None:
    """The service's pid while it runs; its pid file stays until `down`, which also stops what
    is left of a dead service's process group."""
    pid = _recorded_pid(root, name)
    return pid if pid is not None and runs(pid) else None


def up(settings: Settings, names: list[str] | None = None, timeout_s: float = 180) -> None:
    """Start the services (all, or `names`) and prove each ready; on any failure stop what this
    call started and raise StackError naming the service, its log and the log's last lines."""
    root = DataRoot.at(settings.data)
    DataRoot.ensure(root.run)
    env = {**os.environ, **settings.as_env()}
    for env_name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(env_name, None)
    started: list[str] = []
    try:
        for svc in services(settings):
            if names and svc.name not in names:
                continue
            if running_pid(root, svc.name) is not None and svc.ready():
                continue
            down(settings, [svc.name])  # what is left of an earlier one that died or hung
            started.append(svc.name)
            _start(root, svc, env, timeout_s)
    except StackError:
        down(settings, started)
        raise


def _start(root: DataRoot, svc: Service, env: dict[str, str], timeout_s: float) -> None:
    log_path = root.run / f"{svc.name}.log"
    with log_path.open("ab") as log:
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
            how = (
                f"exit {proc.poll()}"
                if proc.poll() is not None
                else f"not ready in {timeout_s:g} s"
            )
            raise StackError(_failure(svc.name, f"did not start ({how})", log_path))
        time.sleep(0.2)
    if svc.prove is None:
        return
    try:
        svc.prove()
    except ProbeFailed as exc:
        time.sleep(0.5)  # a crash's last words reach the log
        died = f" and exited ({proc.poll()})" if proc.poll() is not None else ""
        raise StackError(
            _failure(svc.name, f"failed its first use{died}: {exc}", log_path)
        ) from exc


def _failure(name: str, what: str, log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        lines = []
    tail = "\n".join(f"  | {line}" for line in lines) or "  (the log is empty)"
    return f"{name} {what}; see {log_path}, last lines:\n{tail}"


def down(settings: Settings, names: list[str] | None = None) -> list[str]:
    """Stop the services (all, or `names`), in reverse start order; the names stopped."""
    root = DataRoot.at(settings.data)
    stopped = []
    for svc in reversed(services_names()):
        if names is not None and svc not in names:
            continue
        pid = _recorded_pid(root, svc)
        # The whole group, also when its leader is gone: a crashed server's children (Ray's
        # workers, a replica) would otherwise be left running.
        if pid is None or not (runs(pid) or group_members(pid)):
            _pidfile(root, svc).unlink(missing_ok=True)
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        # Members that run, not kill(pid, 0): a service this process started stays a zombie
        # until reaped, and was waited on for the whole 10 s (seen: 40 s to stop the stack).
        while time.monotonic() < deadline:
            if not group_members(pid):
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        _pidfile(root, svc).unlink(missing_ok=True)
        stopped.append(svc)
    return stopped


def services_names() -> list[str]:
    return ["model", "indexer", "proxy", "api", "intake"]


def status(settings: Settings) -> dict[str, int | None]:
    root = DataRoot.at(settings.data)
    return {name: running_pid(root, name) for name in services_names()}
