"""The local worker's sandbox: the agent runs under bubblewrap and reaches only the proxy.

Inside: the host filesystem read-only, the data root hidden (secrets, other assignments),
the assignment's artifacts folder (workspace included) writable, a private /tmp and /run;
own PID, IPC, UTS, cgroup and network namespaces; no capabilities; killed with its runner.

Network: `--unshare-net` leaves only a private loopback, so nothing outside can be reached
directly, the model server included. The proxy is bridged in through a Unix socket: on the
host, `ProxyBridge` runs `socat UNIX-LISTEN:<sock>,fork TCP:<proxy>`; the socket is mounted
at /run/autovibe/proxy.sock, and the sandbox's first program (`workers.sandbox_init`: prlimit,
then a few lines of sh) starts
`socat TCP-LISTEN:<proxy_port>,bind=127.0.0.1,fork UNIX-CONNECT:/run/autovibe/proxy.sock`
before it execs the agent, so `HTTP_PROXY=http://m1:<token>@127.0.0.1:<proxy_port>` works
unchanged inside.

With `network: transparent` there is no bridge: the sandbox runs inside the assignment's own
network namespace (`workers.netns`: `ip netns exec <ns> bwrap …` and bubblewrap keeps that
network), whose every TCP connection the host redirects to the proxy's transparent listener.
The worker gets no proxy variables; the proxy identifies it by its source address. When the
proxy has a DNS listener, the namespace's resolv.conf (nameserver: the gateway) is bound at
/etc/resolv.conf, so names resolve through the proxy.

User: uid 1000 in a user namespace of its own, no capabilities. When the runner is root,
bubblewrap itself is started as an unprivileged host user (`SandboxSpec.host_uid`, by
`workers.sandbox_user`), so that uid 1000 is that user on the host, not root.

Limits, what is really enforced: rlimits, set by prlimit inside the sandbox (`workers.sandbox_init`;
without capabilities nothing in there can raise them again). RLIMIT_AS caps each process's
address space at `memory_mb` (virtual memory, per process, not the sum of all processes;
runtimes that reserve large virtual areas, such as V8 or the JVM, need more than they use).
RLIMIT_CPU caps each process's CPU time at `cpus x timeout_s` seconds; it bounds the work a
process can do, not its rate. The process count is also capped by a pids cgroup of the
sandbox's own (`process_limit`), fresh for every sandbox: the grading sandbox never shares the
agent's. No memory or cpu cgroup: on the development machines cgroup v2 has no memory or cpu
controller to delegate; `memory.max` and `cpu.max` are the next step.

End: `end` kills a sandbox and returns once none of its processes runs: through its pids
cgroup (`cgroup.kill`, or each member with SIGKILL on cgroup v1) until the cgroup is empty;
without one, by waiting for the end of the PID namespace's init, which the kernel lets go
only once every other process of the namespace is gone. A sandbox that never started says so
(`Confined.started`, from bubblewrap's `--json-status-fd`): `SandboxFailed`.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from common import processes
from contracts.dataroot import DataRoot
from contracts.settings import Settings
from workers import netns, sandbox_init
from workers.spec import AssignmentSpec, SandboxSpec

SOCKET_INSIDE = Path("/run/autovibe/proxy.sock")
"""Where the proxy bridge's Unix socket appears inside the sandbox."""
TOOLS = {"bwrap": "bubblewrap", "socat": "socat", "prlimit": "util-linux"}
"""Programs the sandbox needs -> the Debian package that has each."""
BRIDGE_READY_S = 5.0
CGROUP_RELEASE_S = 0.5
STOP_GRACE_S = 5.0
END_S = 10.0
"""Most time `end` waits for a killed sandbox's processes to be gone (a fork bomb of 512
processes is gone in ~50 ms on the development machines)."""


@dataclass(frozen=True)
class Bind:
    """A host folder shown at another path inside the sandbox."""

    source: Path
    inside: str
    writable: bool = False


def workdir_binds(spec: AssignmentSpec) -> list[Bind]:
    """The workspace shown again at the task's `workdir` (a Harbor task's /app), writable."""
    return [Bind(spec.workspace, spec.workdir, writable=True)] if spec.workdir else []


class SandboxUnavailable(RuntimeError):
    """A program the sandbox needs is not installed."""


class SandboxFailed(RuntimeError):
    """A sandbox did not start (bubblewrap could not make its namespaces, or could not be run):
    the host's failure, since nothing of the sandbox ran yet."""


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
            time.sleep(0.002)  # socat listens within a few ms

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


SYSTEM_PATHS = (
    Path("/usr"), Path("/bin"), Path("/sbin"), Path("/lib"), Path("/lib32"), Path("/lib64"),
    Path("/libx32"), Path("/etc"),
)  # fmt: skip
"""The host's system folders shown read-only (a symlink such as /bin -> usr/bin stays one)."""
ETC_SECRETS = (
    "shadow", "shadow-", "gshadow", "gshadow-", "ssh", "sudoers", "sudoers.d", "ssl/private",
    "security/opasswd", "netns", "autovibe",
)  # fmt: skip
"""Under /etc, hidden: password hashes, host keys, private keys, and our own configuration."""
SANDBOX_UID = 1000
"""uid and gid of the agent inside its user namespace (no capabilities). Outside it maps to the
runner's uid, or, when the runner is root, to `SandboxSpec.host_uid` (`workers.sandbox_user`)."""
ENV_ALLOWED = frozenset({
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
    "http_proxy", "https_proxy", "all_proxy", "no_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
    "CURL_CA_BUNDLE", "GIT_SSL_CAINFO",
    "OPENAI_BASE_URL", "OPENAI_API_BASE", "OPENAI_API_KEY", "ANTHROPIC_BASE_URL",
    "AUTOVIBE_MODEL", "AUTOVIBE_MODEL_ENDPOINT", "AUTOVIBE_MACHINE", "AUTOVIBE_ASSIGNMENT",
    "AUTOVIBE_PAYMENTS_URL", "AUTOVIBE_MACHINE_TOKEN",
    "PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TERM",
})  # fmt: skip
"""Every variable an agent may be given, whatever its caller's environment holds (locale
`LC_*` too). OPENAI_API_KEY is the placeholder the scheduler sets; the real keys never leave
the proxy. AUTOVIBE_MACHINE_TOKEN is the credential already in the proxy URL, for the payment
broker at AUTOVIBE_PAYMENTS_URL."""
HOME_INSIDE = "/tmp"
"""HOME when the agent's adapter sets none: the sandbox's private /tmp."""
SANDBOX_USER = ("-I", "-S", str(Path(__file__).with_name("sandbox_user.py")))
"""How our interpreter runs `workers.sandbox_user`: a script of the standard library alone, so
isolated and without `site` (no venv, no .pth files): it starts in ~10 ms instead of ~40."""
PIDS_CGROUPS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))
"""cgroup v1's pids hierarchy, or the v2 root when it delegates `pids`."""


def allowed_env(env: dict[str, str]) -> dict[str, str]:
    """`env` reduced to `ENV_ALLOWED` and the locale: nothing else of a caller reaches an agent."""
    return {k: v for k, v in env.items() if k in ENV_ALLOWED or k.startswith("LC_")}


def agent_env(spec_env: dict[str, str], host: dict[str, str] | None = None) -> dict[str, str]:
    """An agent's whole environment: PATH and locale of the host, the spec's variables, an
    inside HOME; nothing else of the orchestrator's (its keys, database URLs, Vault ids)."""
    host = dict(os.environ) if host is None else host
    base = {k: v for k, v in host.items() if k in ("PATH", "LANG", "TZ") or k.startswith("LC_")}
    base.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return allowed_env({**base, "HOME": HOME_INSIDE, **spec_env})


def _platform_paths() -> list[Path]:
    """Our code and the interpreter: the agents run from them (the built-in one is our code)."""
    candidates = {
        Path(__file__).resolve().parent.parent,
        Path(sys.prefix),
        Path(sys.prefix).resolve(),
        Path(sys.base_prefix).resolve(),
        Path(sys.executable).resolve().parent.parent,
    }
    return sorted(p for p in candidates if p.exists() and p != Path("/"))


def system_source(sandbox: SandboxSpec, path: Path) -> Path:
    """Where system folder `path` comes from: the task environment's root, else the host."""
    return sandbox.rootfs / path.relative_to("/") if sandbox.rootfs is not None else path


def system_sources(sandbox: SandboxSpec) -> list[tuple[Path, Path]]:
    """(path inside, source on the host) of each system folder the sandbox shows."""
    return [(path, system_source(sandbox, path)) for path in SYSTEM_PATHS]


def _root_argv(sandbox: SandboxSpec) -> list[str]:
    """The sandbox's root: listed system folders (the host's, or a task environment's),
    /etc without its secrets, our code, the interpreter, all read-only; private /dev, /proc,
    /run and a size-limited /tmp."""
    argv = ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    for path, source in system_sources(sandbox):
        if source.is_symlink():
            argv += ["--symlink", os.readlink(source), str(path)]
        elif source.is_dir():
            argv += ["--ro-bind", str(source), str(path)]
    etc = system_source(sandbox, Path("/etc"))
    for name in ETC_SECRETS:
        secret = etc / name
        if secret.is_symlink() or not secret.exists():
            continue
        inside = str(Path("/etc") / name)
        argv += ["--tmpfs", inside] if secret.is_dir() else ["--ro-bind", "/dev/null", inside]
    argv += [
        "--dev", "/dev",
        "--proc", "/proc",
        "--ro-bind", "/proc/sys", "/proc/sys",
        "--perms", "1777", "--size", str(sandbox.tmp_mb * 1024 * 1024), "--tmpfs", "/tmp",
        "--size", str(16 * 1024 * 1024), "--tmpfs", "/run",
    ]  # fmt: skip
    # After the private /tmp and /run: a checkout or a virtual environment under /tmp (CI's
    # clone may be there) is shown again on top of them, read-only.
    for path in _platform_paths():
        argv += ["--ro-bind", str(path), str(path)]
    for path in sandbox.hidden:  # the data root, where our code or interpreter holds it
        argv += ["--tmpfs", str(path)]
    for path in sandbox.read_only:
        argv += ["--ro-bind", str(path), str(path)]
    return argv


def bwrap_argv(
    sandbox: SandboxSpec,
    command: list[str],
    *,
    writable: list[Path],
    workspace: Path,
    socket: Path | None,
    timeout_s: int,
    lease: netns.Lease | None = None,
    offline: bool = False,
    binds: Sequence[Bind] = (),
    chdir: str | None = None,
    status_fd: int | None = None,
) -> list[str]:
    """argv that runs `command` in `workspace` inside the sandbox, with only `writable` (the
    workspace, the output folder) writable: the proxy bridged in over `socket`, or, with a
    transparent `lease`, in that network namespace (no bridge), or `offline`: no network.
    `binds`: host folders shown again at other paths (a Harbor task's /app, /tests); `chdir`:
    where the command starts instead of the workspace; `status_fd`: bubblewrap's status (JSON
    lines) written there, the fd closed inside."""
    argv = ["bwrap", *_root_argv(sandbox)]
    if status_fd is not None:
        argv += ["--json-status-fd", str(status_fd)]
    for path in writable:
        argv += ["--bind", str(path), str(path)]
    for bind in binds:
        argv += ["--bind" if bind.writable else "--ro-bind", str(bind.source), bind.inside]
    bridge = None
    if lease is not None and lease.resolv_conf is not None:
        argv += ["--ro-bind", str(lease.resolv_conf), "/etc/resolv.conf"]
    if offline:
        argv += ["--unshare-net"]
    elif lease is None:
        assert socket is not None, "the proxy bridge needs its socket"
        argv += ["--bind", str(socket), str(SOCKET_INSIDE), "--unshare-net"]
        bridge = (sandbox.proxy_port, SOCKET_INSIDE)
    # The root bubblewrap built (a tmpfs holding the mount points) is read-only too: the
    # folders made for the binds, the artifacts folder's shape among them, take no files.
    argv += ["--remount-ro", "/"]
    argv += [
        "--chdir", chdir or str(workspace),
        "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try",
        "--disable-userns",
        "--hostname", "autovibe-sandbox",
        "--cap-drop", "ALL",
        "--new-session",
        "--die-with-parent",
        "--",
    ]  # fmt: skip
    argv += sandbox_init.init_argv(
        command,
        memory_mb=sandbox.memory_mb,
        cpu_seconds=cpu_seconds(sandbox, timeout_s),
        processes=sandbox.processes,
        file_mb=sandbox.workspace_mb,
        bridge=bridge,
    )
    if os.geteuid() == 0:
        shown = [*_platform_paths(), *sandbox.read_only]
        if sandbox.rootfs is not None:  # under the data root, which that user cannot search
            shown += [src for _, src in system_sources(sandbox) if src.is_dir()]
        shown += [b.source for b in binds if not b.writable and b.source not in writable]
        if lease is not None and lease.resolv_conf is not None:
            shown.append(lease.resolv_conf)
        given = [*writable, *([socket] if socket is not None and bridge is not None else [])]
        given += [b.source for b in binds if b.writable and b.source not in writable]
        argv = as_sandbox_user(sandbox.host_uid, given, shown, argv)
    return [*(lease.exec_prefix() if lease else []), *argv]


def as_sandbox_user(
    uid: int, writable: list[Path], shown: list[Path], argv: list[str]
) -> list[str]:
    """`argv` (bubblewrap's) run by `workers.sandbox_user` as host uid:gid `uid` rather than as
    root: `writable` (the workspace, the output folder, the bridge's socket) become its, and
    the bind sources under folders it cannot search (`shown` too) are staged for it."""
    prefix = [sys.executable, *SANDBOX_USER, "--uid", str(uid), "--gid", str(uid)]
    for path in writable:
        prefix += ["--writable", str(path)]
    for path in shown:
        prefix += ["--visible", str(path)]
    return [*prefix, "--", *argv]


@dataclass(frozen=True)
class ProcessLimit:
    """The pids cgroup one sandbox runs in, or none (`folder` None: no writable pids hierarchy,
    as for a user who is not root; RLIMIT_NPROC alone bounds the sandbox then)."""

    folder: Path | None

    @property
    def prefix(self) -> list[str]:
        """argv prefix that joins the cgroup: nothing of the sandbox runs outside it."""
        if self.folder is None:
            return []
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.folder / "cgroup.procs")]

    def members(self) -> list[int]:
        """The processes in the cgroup (exited ones, zombies included, are not)."""
        if self.folder is None:
            return []
        try:
            return [int(pid) for pid in (self.folder / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def pidfds(self) -> dict[int, int]:
        """A pidfd for each process in the cgroup (pid: fd), kept only where the cgroup still
        lists the pid once it is open: never a process that took a freed pid after the cgroup
        listed it. The caller closes them."""
        fds = _pidfds(self.members())
        still = set(self.members())
        for pid in [pid for pid in fds if pid not in still]:
            os.close(fds.pop(pid))
        return fds

    def kill(
        self, deadline: float, fds: dict[int, int] | None = None
    ) -> tuple[set[int], list[int]]:
        """SIGKILL every process in the cgroup until it is empty or `deadline` (monotonic) has
        passed, and wait until each has exited: (the processes killed, those still there).
        `fds`: pidfds of members taken before the caller signalled any (`pidfds`), waited for
        too; this closes them.

        The cgroup stops listing a process as soon as it starts exiting, before it has let go
        of its memory and files; a pidfd tells when it has.
        """
        assert self.folder is not None
        killed = set(fds or {})
        waiting = dict(fds or {})  # pid: pidfd of a process killed, not yet seen exit
        try:
            kill_file = self.folder / "cgroup.kill"  # cgroup v2, Linux 5.14+: the whole subtree
            while self.members() and time.monotonic() < deadline:
                listed = self.pidfds()
                for pid, fd in listed.items():  # a pid waited for is the same process still
                    if pid in waiting:
                        os.close(fd)
                        listed[pid] = waiting[pid]
                waiting.update(listed)
                killed.update(listed)
                if kill_file.exists():
                    kill_file.write_text("1")
                else:
                    for fd in listed.values():
                        with contextlib.suppress(ProcessLookupError):
                            signal.pidfd_send_signal(fd, signal.SIGKILL)
                waiting = _running(waiting)
                time.sleep(0.002)  # SIGKILLed processes are gone within a few ms
            for fd in waiting.values():
                _ended(fd, deadline)
        finally:
            for fd in waiting.values():
                os.close(fd)
        return killed, self.members()


def _pids_hierarchy() -> Path | None:
    """Where a sandbox's pids cgroup is made: cgroup v1's pids hierarchy, or the v2 root when
    it delegates `pids`; None when neither is writable."""
    for hierarchy in PIDS_CGROUPS:
        controllers = hierarchy / "cgroup.subtree_control"
        if hierarchy.name != "pids" and (
            not controllers.exists() or "pids" not in controllers.read_text().split()
        ):
            continue
        if (hierarchy / "cgroup.procs").exists() and os.access(hierarchy, os.W_OK):
            return hierarchy
    return None


@contextlib.contextmanager
def process_limit(name: str, limit: int) -> Iterator[ProcessLimit]:
    """A pids cgroup of its own, made fresh (never one an earlier sandbox left) and capped at
    `limit`; on leaving, whatever still runs in it is killed and the cgroup removed.

    RLIMIT_NPROC (set by `workers.sandbox_init`) counts the processes of the sandbox's uid in
    its own user namespace; the cgroup also bounds what that count misses (threads of a
    process that raced the limit, processes of other namespaces).
    """
    hierarchy = _pids_hierarchy()
    if hierarchy is None:
        yield ProcessLimit(None)
        return
    for attempt in range(1000):
        folder = hierarchy / f"autovibe-{name}-{os.getpid()}-{attempt}"
        try:
            folder.mkdir()
            break
        except FileExistsError:  # an earlier sandbox's, not yet empty
            continue
    else:
        raise SandboxFailed(f"no fresh pids cgroup under {hierarchy} for {name}")
    limiter = ProcessLimit(folder)
    try:
        (folder / "pids.max").write_text(str(limit))
        yield limiter
    finally:
        limiter.kill(time.monotonic() + END_S)
        # Busy for a few ms after the sandbox is gone (its processes are still being released);
        # past the wait, a process outlived the kill and the folder is left, empty later.
        deadline = time.monotonic() + CGROUP_RELEASE_S
        while True:
            try:
                folder.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)


@dataclass(frozen=True)
class Confined:
    """A command made to run in a sandbox: start it with `argv`, `env` and `pass_fds`, end it
    with `end(proc, confined)`; `started` says whether its sandbox was made."""

    argv: list[str]
    env: dict[str, str]
    limit: ProcessLimit
    status: IO[bytes]
    """A host-only file bubblewrap writes its status to (`--json-status-fd`): `{"child-pid": …}`
    once the sandbox's namespaces exist, nothing when it could not make them."""

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self.status.fileno(),)

    def started(self) -> bool:
        """Whether bubblewrap made the sandbox (its status names the sandbox's first process)."""
        self.status.seek(0)
        return b'"child-pid"' in self.status.read(4096)

    def check_started(self, log: Path) -> None:
        """Raise `SandboxFailed` when the sandbox was not made, with the last lines of `log`
        (the command's output, which then holds only what bubblewrap and its starter said)."""
        if not self.started():
            said = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise SandboxFailed(f"the sandbox did not start: {' / '.join(said) or 'no message'}")


@dataclass(frozen=True)
class Ended:
    """How a sandbox ended: the processes killed in it, and those still there after `END_S`."""

    killed: int
    left: int

    def __str__(self) -> str:
        said = f"{self.killed} processes of the sandbox killed"
        return said + (f", {self.left} still there after {END_S:g} s" if self.left else "")


def end(proc: subprocess.Popen[bytes], confined: Confined) -> Ended:
    """Kill the sandbox `proc` started with `confined.argv` and everything in it, reap `proc`,
    and return once none of the sandbox's processes runs (at most `END_S` later).

    With a pids cgroup: every member killed until it is empty. Without one: bubblewrap's
    group is killed (its `--die-with-parent` takes the namespace's init with it) and the
    init waited for; the kernel lets it go only once it has killed and reaped every other
    process of the PID namespace.
    """
    limit = confined.limit
    members = limit.pidfds() if limit.folder is not None else {}
    before = set(members) if limit.folder is not None else set(_tree(proc.pid))
    inits = [] if limit.folder is not None else [*_pidfds(_children(proc.pid)).values()]
    with contextlib.suppress(ProcessLookupError):  # nothing more is started from the leader
        os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + END_S
    try:
        if limit.folder is not None:
            killed, left = limit.kill(deadline, members)
            return Ended(len(before | killed), len(left))
        waited = [fd for fd in inits if not _ended(fd, deadline)]
        return Ended(len(before), len(waited))
    finally:
        for fd in inits:
            os.close(fd)
        proc.wait()


def _children(pid: int) -> list[int]:
    """`pid`'s children (bubblewrap's: the PID namespace's init)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _tree(pid: int) -> list[int]:
    """`pid` and its living descendants, as the host sees them."""
    return [pid, *processes.descendants(pid)] if processes.runs(pid) else []


def _pidfds(pids: list[int]) -> dict[int, int]:
    """A pidfd for each of `pids` still there (pid: fd); the caller closes them."""
    fds: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds[pid] = os.pidfd_open(pid)
    return fds


def _running(pidfds: dict[int, int]) -> dict[int, int]:
    """Those of `pidfds` (pid: pidfd) whose process has not exited; the others' are closed."""
    running = {}
    for pid, fd in pidfds.items():
        if _ended(fd, 0.0):
            os.close(fd)
        else:
            running[pid] = fd
    return running


def _ended(pidfd: int, deadline: float) -> bool:
    poll = select.poll()
    poll.register(pidfd, select.POLLIN)
    return bool(poll.poll(max(0.0, deadline - time.monotonic()) * 1000))


def _checked(spec: AssignmentSpec) -> SandboxSpec:
    box = spec.sandbox
    if box is None:
        raise SandboxUnavailable(f"{spec.assignment} has no sandbox (sandbox.kind: none)")
    require_tools()
    return box


@contextlib.contextmanager
def confine_offline(
    spec: AssignmentSpec,
    command: list[str],
    env: dict[str, str],
    binds: Sequence[Bind] = (),
) -> Iterator[Confined]:
    """`command` made to run in a fresh sandbox with no network at all: the workspace
    (also at the task's `workdir`, where the command starts) and the writable `binds` are the
    only writable paths besides a private /tmp; same root, user and limits as the agent's
    sandbox; env reduced to the allowlist. Raises `SandboxUnavailable` when the spec has no
    sandbox (the caller decides whether to run unconfined)."""
    box = _checked(spec)
    with (
        process_limit(f"{spec.assignment}-offline", box.processes) as limit,
        tempfile.TemporaryFile() as status,
    ):
        argv = bwrap_argv(
            box,
            command,
            writable=[spec.workspace],
            workspace=spec.workspace,
            socket=None,
            timeout_s=spec.timeout_s,
            offline=True,
            binds=[*workdir_binds(spec), *binds],
            chdir=spec.workdir,
            status_fd=status.fileno(),
        )
        yield Confined([*limit.prefix, *argv], allowed_env(env), limit, status)


@contextlib.contextmanager
def confine(spec: AssignmentSpec, command: list[str], env: dict[str, str]) -> Iterator[Confined]:
    """`command` made to run in the spec's sandbox; its network lives for the block.

    Writable inside: the workspace and the output folder, nothing else of the artifacts.
    `proxy`: the bridge. `transparent`: the assignment's network namespace with its
    credential (the password of the env's proxy URL) registered for the proxy; the env loses
    its proxy variables and reaches the host's services through the gateway. Either way the
    env is reduced to `ENV_ALLOWED`.
    """
    box = _checked(spec)
    env = allowed_env(env)
    writable = [spec.workspace, spec.output]
    with contextlib.ExitStack() as stack:
        limit = stack.enter_context(process_limit(f"{spec.assignment}-agent", box.processes))
        status = stack.enter_context(tempfile.TemporaryFile())
        if box.network == "proxy":
            bridge = stack.enter_context(ProxyBridge(box))
            argv = bwrap_argv(
                box,
                command,
                writable=writable,
                workspace=spec.workspace,
                socket=bridge.socket,
                timeout_s=spec.timeout_s,
                binds=workdir_binds(spec),
                chdir=spec.workdir,
                status_fd=status.fileno(),
            )
            yield Confined([*limit.prefix, *argv], env, limit, status)
            return
        token = netns.credential_of(spec.env)
        if box.transparent_port is None or token is None:
            raise SandboxUnavailable(
                "`sandbox.network: transparent` needs the proxy's transparent port "
                "(sandbox.transparent_port) and a machine credential in the worker's HTTP_PROXY"
            )
        root = DataRoot.at(spec.data_root or Settings().data)
        # SandboxSpec.dns_port: the proxy's DNS listener (None: names are not resolved).
        dns_port = box.dns_port or 0
        lease = stack.enter_context(
            netns.transparent(
                root, spec.assignment, token, box.proxy_host, box.transparent_port, dns_port
            )
        )
        argv = bwrap_argv(
            box,
            command,
            writable=writable,
            workspace=spec.workspace,
            socket=None,
            timeout_s=spec.timeout_s,
            lease=lease,
            binds=workdir_binds(spec),
            chdir=spec.workdir,
            status_fd=status.fileno(),
        )
        worker_env = netns.worker_env(env, lease, box.proxy_host)
        yield Confined([*limit.prefix, *argv], worker_env, limit, status)
