"""First programs inside the sandbox: set the limits, bridge the proxy onto loopback, exec the
agent, with no interpreter in front of it.

`init_argv` is what bubblewrap runs: `prlimit` (util-linux) sets the rlimits on itself and execs
the command; with the proxy bridge, that command is `/bin/sh` running `BRIDGE`, which starts
`socat TCP-LISTEN:<port>,bind=127.0.0.1,fork UNIX-CONNECT:<socket>`, waits until it listens
(reading /proc/net/tcp with shell builtins, no probe connection) and execs the agent. Without
a bridge (offline grading, transparent mode) prlimit execs the command itself. Both programs
come from the sandbox's root (the host's, or a task environment's Debian root, where
util-linux and dash are essential and socat is installed).

The socat stays a child of the agent; when the agent ends, bubblewrap's init ends and the
kernel kills everything left in the PID namespace, socat included.
"""

from __future__ import annotations

from pathlib import Path

LISTEN_TRIES = 1000
"""How often the bridge's listening socket is looked for, 5 ms apart (about 5 s)."""
EXIT_NO_BRIDGE = 70
"""Exit status of the sandbox when the bridge did not start; the message is on stderr."""

BRIDGE = """
socat "TCP-LISTEN:$1,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$2" </dev/null &
tries=0
while :; do
    while read -r _ address _ state _; do
        [ "$address" = "$3" ] && [ "$state" = 0A ] && break 2
    done </proc/net/tcp
    tries=$((tries + 1))
    if [ "$tries" -gt "$4" ] || ! kill -0 "$!" 2>/dev/null; then
        echo "autovibe sandbox: sandbox proxy bridge on 127.0.0.1:$1 did not start" >&2
        exit "$5"
    fi
    sleep 0.005
done
shift 5
exec "$@"
"""
"""sh script: $1 port, $2 socket, $3 the listening address as /proc/net/tcp shows it, $4 tries,
$5 exit status on failure, then the command."""


def limit_argv(memory_mb: int, cpu_seconds: int, processes: int, file_mb: int) -> list[str]:
    """`prlimit` setting soft and hard limits alike: with no capabilities in the sandbox they can
    only go down.

    RLIMIT_NPROC counts the processes of this user namespace's uid (the sandbox's own; never
    the host's root, see `workers.sandbox_user`), beside the pids cgroup
    (`workers.sandbox.process_limit`). RLIMIT_FSIZE caps each file written.
    """
    memory, size = memory_mb * 1024 * 1024, file_mb * 1024 * 1024
    return [
        "prlimit",
        f"--as={memory}:{memory}",
        f"--cpu={cpu_seconds}:{cpu_seconds}",
        f"--nproc={processes}:{processes}",
        f"--fsize={size}:{size}",
        "--",
    ]


def bridge_argv(port: int, socket: Path) -> list[str]:
    """`/bin/sh` running `BRIDGE`: 127.0.0.1:`port` forwarded to `socket`, then the command."""
    listening = f"0100007F:{port:04X}"  # 127.0.0.1:port in /proc/net/tcp
    return [
        "/bin/sh", "-c", BRIDGE, "autovibe-bridge",
        str(port), str(socket), listening, str(LISTEN_TRIES), str(EXIT_NO_BRIDGE),
    ]  # fmt: skip


def init_argv(
    command: list[str],
    *,
    memory_mb: int,
    cpu_seconds: int,
    processes: int,
    file_mb: int,
    bridge: tuple[int, Path] | None = None,
) -> list[str]:
    """argv that bubblewrap runs: the limits, the bridge (port, socket inside) if any, `command`."""
    limits = limit_argv(memory_mb, cpu_seconds, processes, file_mb)
    return [*limits, *(bridge_argv(*bridge) if bridge else []), *command]
