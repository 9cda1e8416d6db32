"""The local worker's sandbox: the agent runs under bubblewrap and reaches only the proxy.

Inside: the host filesystem read-only, the data root hidden (secrets, other assignments),
the assignment's artifacts folder (workspace included) writable, a private /tmp and /run;
own PID, IPC, UTS, cgroup and network namespaces; no capabilities; killed with its runner.

Network: `--unshare-net` leaves only a private loopback, so nothing outside can be reached
directly, the model server included. The proxy is bridged in through a Unix socket: on the
host, `ProxyBridge` runs `socat UNIX-LISTEN:<sock>,fork TCP:<proxy>`; the socket is mounted
at /run/autovibe/proxy.sock, and `workers.sandbox_init` starts
`socat TCP-LISTEN:<proxy_port>,bind=127.0.0.1,fork UNIX-CONNECT:/run/autovibe/proxy.sock`
before it execs the agent, so `HTTP_PROXY=http://m1:<token>@127.0.0.1:<proxy_port>` works
unchanged inside.

With `network: transparent` there is no bridge: the sandbox runs inside the assignment's own
network namespace (`workers.netns`: `ip netns exec <ns> bwrap …` and bubblewrap keeps that
network), whose every TCP connection the host redirects to the proxy's transparent listener.
The worker gets no proxy variables; the proxy identifies it by its source address. When the
proxy has a DNS listener, the namespace's resolv.conf (nameserver: the gateway) is bound at
/etc/resolv.conf, so names resolve through the proxy.

Limits, what is really enforced: rlimits, set by `workers.sandbox_init` inside the sandbox
(without capabilities nothing in there can raise them again). RLIMIT_AS caps each process's
address space at `memory_mb` (virtual memory, per process, not the sum of all processes;
runtimes that reserve large virtual areas, such as V8 or the JVM, need more than they use).
RLIMIT_CPU caps each process's CPU time at `cpus x timeout_s` seconds; it bounds the work a
process can do, not its rate. cgroups are not used: on the development machines cgroup v2
has no memory or cpu controller to delegate; `memory.max` and `cpu.max` are the next step.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from contracts.dataroot import DataRoot
from contracts.settings import Settings
from workers import netns
from workers.spec import AssignmentSpec, SandboxSpec

SOCKET_INSIDE = Path("/run/autovibe/proxy.sock")
"""Where the proxy bridge's Unix socket appears inside the sandbox."""
TOOLS = {"bwrap": "bubblewrap", "socat": "socat"}
"""Programs the sandbox needs -> the Debian package that has each."""
BRIDGE_READY_S = 5.0
STOP_GRACE_S = 5.0


class SandboxUnavailable(RuntimeError):
    """A program the sandbox needs is not installed."""


def require_tools() -> None:
    """Raise `SandboxUnavailable` naming the Debian packages to install when any is missing."""
    missing = {tool: pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None}
    if missing:
        raise SandboxUnavailable(
            f"the agent sandbox needs {', '.join(missing)} on PATH: "
            f"apt-get install {' '.join(missing.values())} (Debian packages), "
            "or set `sandbox.kind: none` in the trial"
        )


def cpu_seconds(sandbox: SandboxSpec, timeout_s: int) -> int:
    """RLIMIT_CPU for each process: the CPU share over the whole allowed wall time."""
    return max(1, math.ceil(sandbox.cpus * timeout_s))


class ProxyBridge:
    """Host side of the bridge: a Unix socket that forwards to the metering proxy's TCP port.

    The socket lives in a fresh folder under the host's /tmp (short path: sun_path holds 108
    bytes), which the sandbox cannot see except at `SOCKET_INSIDE`.
    """

    def __init__(self, sandbox: SandboxSpec):
        self.sandbox = sandbox
        self.folder = Path(tempfile.mkdtemp(prefix="autovibe-bridge-"))
        self.socket = self.folder / "proxy.sock"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ProxyBridge:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        require_tools()
        target = f"TCP:{self.sandbox.proxy_host}:{self.sandbox.proxy_port}"
        # Own session, so that stop() also ends the children socat forks per connection.
        self._process = subprocess.Popen(
            ["socat", f"UNIX-LISTEN:{self.socket},fork,mode=600", target],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + BRIDGE_READY_S
        while not self.socket.exists():
            if self._process.poll() is not None:
                raise RuntimeError(f"proxy bridge socat exited with {self._process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"proxy bridge socket {self.socket} did not appear")
            time.sleep(0.01)

    def stop(self) -> None:
        """End socat and its children, and remove the socket folder; safe to call twice."""
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            with contextlib.suppress(ProcessLookupError):  # children left by a SIGKILLed parent
                os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(self.folder, ignore_errors=True)


PRIVATE_DIRS = (Path("/tmp"), Path("/run"))
"""Replaced by empty tmpfs inside the sandbox."""


def _masked_platform_paths() -> list[Path]:
    """Our code and interpreter when they live under a private dir (a checkout in /tmp, say).

    The sandbox must still run `python -m workers.sandbox_init` and the agent from them.
    """
    candidates = {
        Path(__file__).resolve().parent.parent,
        Path(sys.prefix).resolve(),
        Path(sys.base_prefix).resolve(),
        Path(sys.executable).resolve().parent.parent,
    }
    return sorted(
        p for p in candidates if p.exists() and any(p.is_relative_to(d) for d in PRIVATE_DIRS)
    )


def bwrap_argv(
    sandbox: SandboxSpec,
    command: list[str],
    *,
    artifacts: Path,
    workspace: Path,
    socket: Path | None,
    timeout_s: int,
    lease: netns.Lease | None = None,
) -> list[str]:
    """argv that runs `command` in `workspace` inside the sandbox: the proxy bridged in over
    `socket`, or, with a transparent `lease`, in that network namespace (no bridge)."""
    argv = [
        *(lease.exec_prefix() if lease else []),
        "bwrap",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--ro-bind", "/proc/sys", "/proc/sys",  # root without capabilities may still write it
        "--tmpfs", "/tmp",
        "--tmpfs", "/run",
    ]  # fmt: skip
    for path in _masked_platform_paths():
        argv += ["--ro-bind", str(path), str(path)]
    for path in sandbox.hidden:
        argv += ["--tmpfs", str(path)]
    for path in sandbox.read_only:
        argv += ["--ro-bind", str(path), str(path)]
    argv += ["--bind", str(artifacts), str(artifacts)]
    bridge = []
    if lease is not None and lease.resolv_conf is not None:
        argv += ["--ro-bind", str(lease.resolv_conf), "/etc/resolv.conf"]
    if lease is None:
        assert socket is not None, "the proxy bridge needs its socket"
        argv += ["--bind", str(socket), str(SOCKET_INSIDE), "--unshare-net"]
        bridge = ["--proxy-port", str(sandbox.proxy_port), "--socket", str(SOCKET_INSIDE)]
    argv += [
        "--chdir", str(workspace),
        "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname", "autovibe-sandbox",
        "--cap-drop", "ALL",
        "--die-with-parent",
        "--",
        sys.executable, "-m", "workers.sandbox_init",
        *bridge,
        "--memory-mb", str(sandbox.memory_mb),
        "--cpu-seconds", str(cpu_seconds(sandbox, timeout_s)),
        "--",
        *command,
    ]  # fmt: skip
    return argv


@contextlib.contextmanager
def confine(
    spec: AssignmentSpec, command: list[str], env: dict[str, str]
) -> Iterator[tuple[list[str], dict[str, str]]]:
    """(argv, env) that run `command` in the spec's sandbox; its network lives for the block.

    `proxy`: the bridge, env unchanged. `transparent`: the assignment's network namespace with
    its credential (the password of the env's proxy URL) registered for the proxy; the env
    loses its proxy variables and reaches the host's services through the gateway.
    """
    box = spec.sandbox
    assert box is not None, "confine() is for sandboxed assignments"
    if box.network == "proxy":
        with ProxyBridge(box) as bridge:
            yield (
                bwrap_argv(
                    box,
                    command,
                    artifacts=spec.artifacts,
                    workspace=spec.workspace,
                    socket=bridge.socket,
                    timeout_s=spec.timeout_s,
                ),
                env,
            )
        return
    require_tools()
    token = netns.credential_of(spec.env)
    if box.transparent_port is None or token is None:
        raise SandboxUnavailable(
            "`sandbox.network: transparent` needs the proxy's transparent port "
            "(sandbox.transparent_port) and a machine credential in the worker's HTTP_PROXY"
        )
    root = DataRoot.at(spec.data_root or Settings().data)
    # SandboxSpec.dns_port: the proxy's DNS listener (None: names are not resolved).
    dns_port = box.dns_port or 0
    with netns.transparent(
        root, spec.assignment, token, box.proxy_host, box.transparent_port, dns_port
    ) as lease:
        argv = bwrap_argv(
            box,
            command,
            artifacts=spec.artifacts,
            workspace=spec.workspace,
            socket=None,
            timeout_s=spec.timeout_s,
            lease=lease,
        )
        yield argv, netns.worker_env(env, lease, box.proxy_host)
