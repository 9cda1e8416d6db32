"""The CPU profile as a Ray Serve deployment: N replicas, each the bare profile's model server.

Each replica runs `serving.app` (llama-cpp-python's app plus our routes) as its own ASGI app,
built from the bare server's config (`serving.llamacpp.server_config`, the host and port aside),
so every route, model name and answer is the bare server's; the models are loaded in the
replica's process and die with it. Responses name the replica in `x-autovibe-replica`. Ray
runs locally, its temp and log files under the data root, in Serve's high-throughput mode
(`serve_env`): HAProxy takes the HTTP port and spreads requests over the replicas, each of which
answers HTTP itself (direct ingress), so a streamed token crosses no Python proxy actor and no
Ray object. HAProxy, a plain child of an actor, is found by its config path and reaped after
`ray.shutdown()`.

    python -m serving.rayserve_cpu --replicas 2 --port 8500
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import hashlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.processes import cmdline, descendants, pids
from contracts.config import load_models
from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from serving.llamacpp import server_config
from serving.probe import cpu_served_names, prove

APP_NAME = "autovibe-cpu"
REPLICA_HEADER = "x-autovibe-replica"
MAX_ONGOING_REQUESTS = 32
"""Per replica: Serve hands requests over at once; the server queues generations behind its
model lock, as the bare server does."""
START_TIMEOUT_S = 180.0
SOCKET_PATH_MAX = 107
"""Linux limit on a Unix socket path; Ray puts its sockets under its temp dir."""
RAY_SOCKET_SUFFIX = len("/session_2025-01-01_00-00-00_000000_1234567/sockets/plasma_store")
HAPROXY_MAXCONN = 1024
"""HAProxy raises its fd limit to about 2.5 × maxconn; Serve's default (20 000) fails under the
usual 20 000-fd ulimit."""


def _die_with_parent(sig: int) -> Callable[[], None]:
    """A `preexec_fn`: the kernel sends `sig` to the child when the process that started it dies."""

    def preexec() -> None:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG

    return preexec


# -- the deployment -------------------------------------------------------------------------


class MarkReplica:
    """ASGI middleware: every response names the replica that answered, in `REPLICA_HEADER`."""

    def __init__(self, app: ASGIApp, replica_id: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, marked)


class LlamaCppReplica:
    """One replica: the bare profile's model server (`serving.app`, the models loaded in this
    process), as the replica's own ASGI app: every route, model name and answer is the bare
    server's, and no request crosses a second HTTP hop.

    A plain class, made a Serve deployment in `serving()`: importing this module needs no Ray.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        from ray import serve

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.config = config

    def __serve_build_asgi_app__(self) -> ASGIApp:
        """Serve calls this once the replica is constructed: the app loads the models."""
        from serving.app import build_app, parse_config  # llama_cpp: in the replica only

        server, models, reasoning = parse_config(self.config)
        return MarkReplica(build_app(server, models, reasoning), self.replica_id)


def replica_config(settings: Settings) -> dict[str, Any]:
    """The bare server's config (`serving.llamacpp.server_config`), weights assembled once here
    rather than by replicas racing each other."""
    return server_config(settings, load_models(settings.configs))


# -- running it -----------------------------------------------------------------------------


class Stopped(Exception):
    """SIGTERM or SIGINT arrived: leave the serving context, which shuts everything down."""


def ray_temp_dir(root: DataRoot) -> Path:
    """`<data>/ray`, or a short folder in /tmp linked from there when the data root's path is
    too long for Ray's Unix sockets."""
    wanted = root.root / "ray"
    if len(str(wanted)) + RAY_SOCKET_SUFFIX <= SOCKET_PATH_MAX:
        return wanted
    short = Path("/tmp") / ("avray-" + hashlib.sha256(str(root.root).encode()).hexdigest()[:10])
    short.mkdir(mode=0o700, exist_ok=True)
    if not wanted.is_symlink():
        DataRoot.ensure(root.root)
        wanted.symlink_to(short, target_is_directory=True)
    return short


def haproxy_dirs(root: DataRoot) -> tuple[Path, Path]:
    """(config folder under the data root, short socket folder in /tmp): HAProxy's command line
    names the config, so a leftover HAProxy can be found by the data root; its Unix sockets
    (under a 56-character node id) need a short path."""
    tag = hashlib.sha256(str(root.root).encode()).hexdigest()[:10]
    return root.run / "haproxy", Path("/tmp") / f"avhap-{tag}"


def quiet_port() -> int:
    """A port free on every interface, outside the kernel's ephemeral range (`free_port`): Serve
    binds these a few seconds after they are picked (HAProxy's two on all interfaces), and a port
    from the ephemeral range may be handed to another process in between (seen in the test
    suite: HAProxy then exits)."""
    return free_port("0.0.0.0")


REPLICA_SERVER_PREFIX = "SERVE_REPLICA_"
"""How Serve names a replica's server line in HAProxy's backend for an application."""


def replicas_up(stat_csv: str, app: str = APP_NAME) -> int:
    """How many of `app`'s replicas HAProxy sends requests to, from its `show stat` CSV: server
    lines of the app's backend whose status is plain UP (not "UP 1/2", still being checked)."""
    rows = csv.DictReader(io.StringIO(stat_csv.removeprefix("# ")))
    return sum(
        1
        for row in rows
        if row.get("pxname") == f"http-{app}"
        and (row.get("svname") or "").startswith(REPLICA_SERVER_PREFIX)
        and row.get("status") == "UP"
    )


def _haproxy_stat(socket_dir: Path) -> str:
    """`show stat` from the HAProxy admin socket Serve made under `socket_dir` (one folder per
    Ray node); empty until HAProxy listens."""
    for path in socket_dir.glob("*/admin.sock"):
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(b"show stat\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks).decode(errors="replace")
    return ""


def wait_all_up(
    socket_dir: Path, replicas: int, logs: Path, timeout_s: float = START_TIMEOUT_S
) -> None:
    """Block until HAProxy spreads requests over all `replicas`.

    `serve.run` returns once the replicas run, but HAProxy learns of each from Serve's controller
    a moment later and passes two health checks before sending it traffic: without this wait,
    the first requests after "serving" all went to one replica (seen in CI: 10 concurrent
    completions on one of two replicas). Nothing to wait for when the operator turned HAProxy off.
    """
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0") != "1":
        return
    deadline = time.monotonic() + timeout_s
    while (up := replicas_up(_haproxy_stat(socket_dir))) < replicas:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"HAProxy sends requests to {up} of {replicas} replicas after {timeout_s:.0f} s; "
                f"see HAProxy's and Serve's logs under {logs}"
            )
        time.sleep(0.1)


def serve_env(settings: Settings) -> dict[str, str]:
    """Serve's high-throughput mode, sized for one small machine; set before `ray.init` (Ray's
    processes inherit it). An operator's own RAY_SERVE_* values win.

    Measured on 2 cores (`bench.serving`, CPU per streamed token beside llama.cpp's ~37 ms):
    Serve's Python proxy actor and the replica's cross-thread hops cost 6–8 ms, all of it taken
    from the llama.cpp server that needs both cores; HAProxy (C) in front of replicas that
    serve HTTP themselves, 2–3 ms, about half of it Ray's idle background.
    """
    root = DataRoot.at(settings.data)
    config_dir, socket_dir = haproxy_dirs(root)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        # user code and router on the replica's own event loop; request logs buffered
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_HAPROXY_NBTHREAD": "1",
        "RAY_SERVE_HAPROXY_MAXCONN": str(HAPROXY_MAXCONN),
        # no Prometheus listener on all interfaces, no per-request metrics line to parse
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
        # HAProxy's template binds these two on all interfaces whatever the host: the stats page
        # and the Prometheus exporter (read-only; workers' sandboxes cannot reach them).
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(quiet_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(quiet_port()),
        # Serve's Python proxy stays as HAProxy's backup server, by default on 8500 and 9500:
        # our own model port, or another stack's.
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(quiet_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(quiet_port()),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(config_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(socket_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(socket_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(socket_dir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(socket_dir / "metrics.sock"),
        # one machine: no external load balancer to deregister a stopping replica from
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        # Idle Ray took ~11 % of a core, mostly the controller's 0.1 s loop; these two
        # bring it to ~7 %. A fixed set of replicas needs no faster reconciliation.
        "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1",
        "RAY_enable_metrics_collection": "0",
        # Ray starts its workers at nice 15, and a replica's llama.cpp server inherits that,
        # while Ray's own daemons run at 0: the model server, which the bare profile runs at 0,
        # would be the one kept waiting. Workers at 0; the background ones niced once serving
        # (`renice_background`).
        "RAY_worker_niceness": "0",
        # Workers run this interpreter. Under `uv run` (make test, make demo) Ray would start
        # each one with `uv run` in a copy of the working directory: a venv of its own, synced
        # online, and a stale uv cache entry then recompiles llama-cpp-python (minutes) before
        # any replica starts.
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    }


BACKGROUND = (
    "gcs_server",
    "log_monitor.py",
    "dashboard/dashboard.py",
    "autoscaler/_private/monitor.py",
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
    "ray::ServeController",
    "ray::ProxyActor",
)
"""Ray's processes off the request path (the GCS, log and autoscaler monitors, dashboard and
its agents, Serve's controller, and Serve's Python proxy, which HAProxy keeps as a backup),
by what their command lines contain. Not niced: the raylet and Serve's HAProxy manager, which
start request-path processes (replicas, HAProxy) that would inherit their niceness."""
BACKGROUND_NICE = 15
"""Ray's own default for its workers."""


def renice_background(driver: int) -> list[int]:
    """Raise the niceness of the driver's and `BACKGROUND` descendants' threads to
    `BACKGROUND_NICE` (never lower it); the pids niced.

    Measured on 2 cores, 16-token completions at one stream, 48 per condition, alternating
    with the bare server (an ad-hoc script; `bench.serving` has the result as shipped): time
    to first token over bare was +4.7 and +0.5 ms with every Ray process at 0, +4.1 and +2.5 ms
    as Ray starts them (workers at 15), +2.4 and +2.9 ms with this — the run-to-run spread is
    as large as the differences. What it fixes for certain is the order: the model server is
    never behind Ray's daemons for the CPU.
    """
    niced = []
    for pid in [driver, *descendants(driver)]:
        if pid != driver and not any(mark in cmdline(pid) for mark in BACKGROUND):
            continue
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                tid = int(task)
                if os.getpriority(os.PRIO_PROCESS, tid) < BACKGROUND_NICE:
                    os.setpriority(os.PRIO_PROCESS, tid, BACKGROUND_NICE)
            niced.append(pid)
    return niced


def _kill_naming(text: str) -> list[int]:
    """SIGKILL every process whose command line contains `text`; the pids killed."""
    killed = []
    for pid in pids():
        if pid != os.getpid() and text in cmdline(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


@contextlib.contextmanager
def serving(settings: Settings, replicas: int) -> Iterator[str]:
    """Ray (local) + Serve on `settings.host:model_port` with `replicas` replicas, until exit;
    yields the base URL (`…/v1`). On exit Serve, Ray and HAProxy are stopped."""
    if replicas < 1:
        raise ValueError(f"replicas: {replicas}; at least 1")
    root = DataRoot.at(settings.data)
    # Before Ray is imported: it reads some of them (RAY_ENABLE_UV_RUN_RUNTIME_ENV) on import.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home
    for key, value in serve_env(settings).items():
        os.environ.setdefault(key, value)
    import ray  # heavy (seconds): imported only by the process that runs Ray
    from ray import serve

    config_dir, socket_dir = haproxy_dirs(root)
    DataRoot.ensure(config_dir)
    socket_dir.mkdir(mode=0o700, exist_ok=True)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ray.init(
        address="local",
        num_cpus=max(replicas, os.cpu_count() or 1),
        include_dashboard=False,
        _temp_dir=str(ray_temp_dir(root)),
        log_to_driver=False,
        configure_logging=False,
        namespace=APP_NAME,
    )
    for sig, handler in handlers.items():  # ray.init installs its own; the caller's win
        signal.signal(sig, handler)
    try:
        serve.start(
            http_options={"host": settings.host, "port": settings.model_port},
            proxy_location="HeadOnly",
        )
        deployment = serve.deployment(
            name="llamacpp",
            num_replicas=replicas,
            ray_actor_options={"num_cpus": 1},
            max_ongoing_requests=MAX_ONGOING_REQUESTS,
            graceful_shutdown_wait_loop_s=0.5,
            graceful_shutdown_timeout_s=10,
            health_check_period_s=5,
        )(serve.ingress()(LlamaCppReplica))
        serve.run(deployment.bind(replica_config(settings)), name=APP_NAME, route_prefix="/")
        wait_all_up(socket_dir, replicas, ray_temp_dir(root) / "session_latest" / "logs")
        url = f"http://{settings.host}:{settings.model_port}/v1"
        # Serving only once every model has completed a token (a replica can crash on it).
        prove(url, cpu_served_names(load_models(settings.configs)))
        renice_background(os.getpid())
        yield url
    finally:
        try:
            with contextlib.suppress(Exception):  # Serve may be half started; Ray stops anyway
                serve.shutdown()
        finally:
            ray.shutdown()
            # HAProxy is a plain child of an actor: nothing kills it if the actor is killed.
            _kill_naming(str(config_dir))
            shutil.rmtree(socket_dir, ignore_errors=True)


def _raise_stopped(*_: object) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):  # once: a second signal must not cut shutdown
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped


def drive(settings: Settings, replicas: int) -> None:
    """Serve until SIGTERM/SIGINT (also while starting), then shut down in order."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_stopped)
    try:
        with serving(settings, replicas) as url:
            print(f"serving {url} with {replicas} replica(s)", flush=True)
            while True:
                time.sleep(3600)
    except Stopped:
        print("stopped", flush=True)


def supervise(argv: list[str]) -> int:
    """Run the driver in its own session and pass SIGTERM/SIGINT on; its exit status.

    Ray's processes share the driver's process group and die at once on a group SIGTERM (what
    `autovibe down` sends), before Serve could stop its replicas. The driver therefore runs one
    session down, told to stop by this process, and sent SIGTERM by the kernel should this
    process die first.
    """
    child = subprocess.Popen(
        [sys.executable, "-m", "serving.rayserve_cpu", "--driver", *argv],
        start_new_session=True,
        preexec_fn=_die_with_parent(signal.SIGTERM),
    )

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return child.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=None, help="default: model_replicas or 1")
    parser.add_argument("--port", type=int, default=None, help="default: AUTOVIBE_MODEL_PORT")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.driver:
        sys.exit(supervise(sys.argv[1:] if argv is None else argv))
    settings = Settings()
    if args.port is not None:
        settings = settings.model_copy(update={"model_port": args.port})
    replicas = args.replicas if args.replicas is not None else max(1, settings.model_replicas)
    drive(settings, replicas)


if __name__ == "__main__":
    main()
