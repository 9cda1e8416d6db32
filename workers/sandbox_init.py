"""First program inside the sandbox: set the limits, bridge the proxy to loopback, exec the agent.

`python -m workers.sandbox_init [--proxy-port P --socket S] --memory-mb M --cpu-seconds C
--processes N --file-mb F -- ARGV`.
Without `--proxy-port` no bridge is started (transparent mode: the network namespace itself
leads to the proxy).
The socat it starts stays a child of the agent; when the agent ends, bubblewrap's init ends
and the kernel kills everything left in the PID namespace, socat included.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

LISTEN_WAIT_S = 5.0
EXIT_NO_BRIDGE = 70
_TCP_LISTEN = "0A"


def set_limits(memory_mb: int, cpu_seconds: int, processes: int, file_mb: int) -> None:
    """Soft and hard alike: with no capabilities in the sandbox they can only go down.

    RLIMIT_NPROC counts the processes of this user namespace's uid (the sandbox's own; never
    the host's root, see `workers.sandbox_user`), beside the pids cgroup
    (`workers.sandbox.process_limit`). RLIMIT_FSIZE caps each file written.
    """
    memory = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
    size = file_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def listening(port: int) -> bool:
    """Whether 127.0.0.1:`port` is listening in this network namespace (no probe connection)."""
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == _TCP_LISTEN:
            return True
    return False


def start_bridge(port: int, socket: str) -> subprocess.Popen[bytes]:
    bridge = subprocess.Popen(
        ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr", f"UNIX-CONNECT:{socket}"],
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + LISTEN_WAIT_S
    while not listening(port):
        if bridge.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sandbox proxy bridge on 127.0.0.1:{port} did not start")
        time.sleep(0.01)
    return bridge


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="workers.sandbox_init")
    parser.add_argument("--proxy-port", type=int)
    parser.add_argument("--socket")
    parser.add_argument("--memory-mb", type=int, required=True)
    parser.add_argument("--cpu-seconds", type=int, required=True)
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--file-mb", type=int, required=True)
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    set_limits(args.memory_mb, args.cpu_seconds, args.processes, args.file_mb)
    try:
        if args.proxy_port is not None:
            start_bridge(args.proxy_port, args.socket)
    except RuntimeError as exc:
        print(f"autovibe sandbox: {exc}", file=sys.stderr)
        return EXIT_NO_BRIDGE
    os.execvp(args.command[0], args.command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
