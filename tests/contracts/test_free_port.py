"""`free_port`: the ports tests and benches start their stacks on."""

from __future__ import annotations

import socket

from contracts.settings import FREE_PORTS, ephemeral_ports, free_port


def test_a_picked_port_is_outside_the_range_the_kernel_hands_out_and_never_picked_twice() -> None:
    ephemeral = ephemeral_ports()
    assert FREE_PORTS.stop <= ephemeral.start or FREE_PORTS.start >= ephemeral.stop, (
        f"this host's ephemeral range {ephemeral.start}-{ephemeral.stop - 1} covers FREE_PORTS:"
        " free_port falls back to the kernel's choice here"
    )
    picked = [free_port() for _ in range(300)]
    assert len(set(picked)) == len(picked)
    assert all(port in FREE_PORTS for port in picked)
    # What the suite saw: a server bound to port 0 right after a pick never gets that port.
    servers = []
    try:
        for _ in range(50):
            server = socket.socket()
            server.bind(("127.0.0.1", 0))
            servers.append(server)
        assert not {s.getsockname()[1] for s in servers} & set(picked)
    finally:
        for server in servers:
            server.close()


def test_a_port_in_use_is_never_picked() -> None:
    taken = []
    try:
        for port in FREE_PORTS[:: len(FREE_PORTS) // 200]:
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            sock.listen()
            taken.append(sock)
        in_use = {s.getsockname()[1] for s in taken}
        assert not {free_port() for _ in range(200)} & in_use
    finally:
        for sock in taken:
            sock.close()
