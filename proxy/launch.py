"""How the proxy process is started: the mitmdump command line, and waiting for it to listen.

`python -m proxy.launch [--set option=value ...]` execs mitmdump as `mitmdump_argv` builds it
from the AUTOVIBE_* environment, without its in-process indexer (`python -m traffic.indexer` runs
beside it); each `--set` given replaces the option of the same name (the container images start
the proxy this way, naming hosts and URLs only a deployment knows).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from contracts.dataroot import DataRoot
from contracts.settings import Settings

ADDON_SCRIPT = Path(__file__).resolve().parent / "addon.py"


def mitmdump_path() -> Path:
    """mitmdump from the virtual environment running this interpreter."""
    # Not resolved: a venv's python is a symlink to the base interpreter, outside the venv.
    path = Path(sys.executable).parent / "mitmdump"
    if not path.exists():
        raise FileNotFoundError(
            f"no mitmdump next to {sys.executable}; install the project (uv sync) in that venv"
        )
    return path


def mitmdump_command() -> list[str]:
    """How the proxy runs mitmdump, before its options: under `python -O` (see `mitmdump_argv`)."""
    return [sys.executable, "-O", str(mitmdump_path())]


def mitmdump_argv(
    settings: Settings, *, transparent_port: int = 0, dns_port: int = 0, indexer: bool = True
) -> list[str]:
    """The command that runs the metering proxy on `settings.host:settings.proxy_port`.

    With `transparent_port`, the same process also listens there in transparent mode, for
    workers in network namespaces (`sandbox.network: transparent`, `workers.netns`); with
    `dns_port`, also as their DNS server (UDP and TCP; names resolved like the proxy's own
    host resolves them: its hosts file, then its name servers). With `indexer=False` the proxy
    only spools, for callers that run `python -m traffic.indexer` beside it (the stack does).

    mitmdump runs under `python -O`, the optimised mode mitmproxy provides for: it checks the
    field types of every request and response it builds only `if __debug__`, and each check
    of an optional field makes a TypeError that stays in a reference cycle with its frame (the
    garbage collector's work): about 0.2 ms of CPU per call on this machine, more under
    concurrency (`python -m bench.proxy`). The proxy's own `assert`s only narrow types.

    Settings holding credentials (the Redis and Elasticsearch URLs) are not in the argv: run
    it with `settings.as_env()` in its environment (as the stack does), where the addons read
    them.
    """
    root = DataRoot.at(settings.data)
    workers = ["--mode", f"transparent@{transparent_port}"] if transparent_port else []
    if dns_port:
        workers += ["--mode", f"dns@{dns_port}"]
    return [
        *mitmdump_command(),
        "--mode",
        f"regular@{settings.proxy_port}",
        *workers,
        "--listen-host",
        settings.host,
        "-s",
        str(ADDON_SCRIPT),
        "--set",
        f"confdir={root.proxy_confdir}",
        "--set",
        f"autovibe_data={root.root}",
        "--set",
        f"autovibe_configs={Path(settings.configs).resolve()}",
        "--set",
        f"autovibe_model_hosts={settings.host}:{settings.model_port}",
        *_budget_options(settings),
        *_egress_options(settings),
        *_routing_options(settings),
        *_metrics_options(settings),
        *_indexer_options(settings, indexer),
        "--set",
        "termlog_verbosity=warn",
        "--set",
        "flow_detail=0",
    ]


def wait_ready(
    host: str,
    port: int,
    timeout: float,
    process: subprocess.Popen[bytes] | subprocess.Popen[str] | None = None,
) -> None:
    """Return once `host:port` accepts connections; TimeoutError after `timeout` seconds.

    With `process`, fail at once (RuntimeError) if it exits before listening.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from exc
        time.sleep(0.05)


DEFAULT_PORTS = {"redis": 6379, "postgresql": 5432, "http": 80, "https": 443}


def own_ports(settings: Settings) -> list[int]:
    """This host's service ports a worker must never reach: the API, the proxy's listeners and
    metrics, and the stores the settings name (Redis, the state DB, Elasticsearch, Vault)."""
    ports = {
        settings.api_port,
        settings.proxy_port,
        settings.proxy_transparent_port,
        settings.proxy_dns_port,
        settings.proxy_metrics_port,
    }
    urls = [settings.budget_redis_url, settings.state_url, settings.elasticsearch_url]
    for url in [*urls, os.environ.get("VAULT_ADDR")]:
        if not url:
            continue
        parts = urlsplit(url)
        scheme = parts.scheme.split("+")[0]
        try:
            port = parts.port or DEFAULT_PORTS.get(scheme)
        except ValueError:
            port = None
        if port:
            ports.add(port)
    return sorted(p for p in ports if p)


def _egress_options(settings: Settings) -> list[str]:
    """The egress policy: the operator's allowlists, this host's own service ports, and the
    control API as the payment broker workers reach by name."""
    options = ["--set", f"autovibe_own_ports={','.join(map(str, own_ports(settings)))}"]
    options += ["--set", f"autovibe_broker={settings.host}:{settings.api_port}"]
    if settings.egress_allow:
        options += ["--set", f"autovibe_egress_allow={','.join(settings.egress_allow)}"]
    if settings.egress_tcp_allow:
        options += ["--set", f"autovibe_egress_tcp_allow={','.join(settings.egress_tcp_allow)}"]
    return options


def _routing_options(settings: Settings) -> list[str]:
    """When `auto` leaves the local plane: saturated (a call in flight longer than
    `local_queue_wait_s`) or seen down (trusted for `local_health_s`)."""
    options = []
    if settings.local_health_s is not None:
        options += ["--set", f"autovibe_local_health_s={settings.local_health_s:g}"]
    if settings.local_queue_wait_s is not None:
        options += ["--set", f"autovibe_local_queue_wait_s={settings.local_queue_wait_s:g}"]
    return options


def _budget_options(settings: Settings) -> list[str]:
    """The counter store, only when not the embedded default: a second `--set` of the same
    option (a caller adding its own) must not compete with ours. Its URL (a password in it)
    is never on the command line, which any local user reads in /proc: the addon takes it
    from AUTOVIBE_BUDGET_REDIS_URL in its environment (`proxy.addons.budget`)."""
    if settings.budget_store != "sqlite":
        return ["--set", f"autovibe_budget_store={settings.budget_store}"]
    return []


def _metrics_options(settings: Settings) -> list[str]:
    """The Prometheus endpoint, only when a port is set: the default serves none."""
    if not settings.proxy_metrics_port:
        return []
    return ["--set", f"autovibe_metrics_port={settings.proxy_metrics_port}"]


def _indexer_options(settings: Settings, indexer: bool) -> list[str]:
    """Off, or the store settings when not the embedded default (as for the budget store)."""
    if not indexer:
        return ["--set", "autovibe_indexer=false"]
    options = []
    if settings.traffic_store != "sqlite":
        options += ["--set", f"autovibe_traffic_store={settings.traffic_store}"]
    # The Elasticsearch URL (a password in it) comes from AUTOVIBE_ELASTICSEARCH_URL in the
    # proxy's environment, never from its command line (`proxy.addons.indexer`).
    if settings.index_body_max is not None:
        options += ["--set", f"autovibe_index_body_max={settings.index_body_max}"]
    return options


def with_options(argv: list[str], sets: list[str]) -> list[str]:
    """`argv` with each `option=value` of `sets` replacing that option's `--set`, or added.

    mitmproxy refuses an option set twice, so a deployment's value must replace ours.
    """
    for spec in sets:
        name, eq, _ = spec.partition("=")
        if not eq or not name:
            raise ValueError(f"--set takes option=value, got {spec!r}")
        for i in range(len(argv) - 1):
            if argv[i] == "--set" and argv[i + 1].partition("=")[0] == name:
                argv = [*argv[:i], *argv[i + 2 :]]
                break
        argv = [*argv, "--set", spec]
    return argv


def argv_for(settings: Settings, args: list[str]) -> list[str]:
    """The mitmdump command for `settings`, with `args` (`--set option=value` pairs) applied."""
    if len(args) % 2 or any(flag != "--set" for flag in args[::2]):
        raise ValueError(f"usage: python -m proxy.launch [--set option=value ...], got {args}")
    return with_options(
        mitmdump_argv(
            settings,
            transparent_port=settings.proxy_transparent_port,
            dns_port=settings.proxy_dns_port,
            indexer=False,
        ),
        list(args[1::2]),
    )


def main(args: list[str]) -> None:
    """Exec the proxy for this environment's settings, with `--set option=value` overrides."""
    try:
        argv = argv_for(Settings(), args)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
