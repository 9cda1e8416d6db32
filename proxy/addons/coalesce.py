"""Coalesce: the bytes a connection's layers send in one go leave in one write, not several.

mitmproxy's layers answer each event with commands, and its connection handler writes each
`SendData` to the socket as it comes: one `send` system call per command. Several often come
together for the same connection: a request's head and its body to the upstream; a streamed
answer's last chunk and the chunked encoding's end (`0\\r\\n\\r\\n`); a response's head and the
first chunk that arrived with it. Streaming (which metering turns on for event streams, so the
agent gets each token as it comes) makes it worse: bare mitmdump buffers the answer and writes
it once. Writes were the largest single cost of the proxy under streaming load (a quarter of its
samples, py-spy on `python -m bench.proxy`'s sse cell at 16 connections).

Once a client connects, this addon wraps its connection handler's root layer so that a run of
`SendData` commands for the same TCP connection, yielded one right after the other while the
layers handle one event, becomes one command with the bytes joined. Nothing is held back past
the event: the joined command is yielded as soon as the next command (or the end of the
event) shows the run is over, so every byte still leaves while mitmproxy handles the event
that produced it, in the same order relative to every other command (closing, opening,
hooks). UDP connections (DNS, QUIC) are left alone: there a command is a datagram. A run stops
at `MAX_JOINED` bytes, so a large body is not copied once more for a call saved.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from mitmproxy import connection, ctx
from mitmproxy.proxy import commands, events

log = logging.getLogger(__name__)

MAX_JOINED = 256 * 1024
"""Bytes at most in one joined write; the rest starts a new run."""


def coalesced(produced: Iterator[commands.Command]) -> Iterator[commands.Command]:
    """`produced` with each run of consecutive `SendData` to one TCP connection joined."""
    pending: commands.SendData | None = None
    parts: list[bytes] = []
    size = 0
    for command in produced:
        if type(command) is commands.SendData and command.connection.transport_protocol == "tcp":
            if pending is not None:
                if command.connection is pending.connection and size + len(command.data) <= (
                    MAX_JOINED
                ):
                    parts.append(command.data)
                    size += len(command.data)
                    continue
                yield _joined(pending, parts)
            pending, parts, size = command, [command.data], len(command.data)
            continue
        if pending is not None:
            yield _joined(pending, parts)
            pending = None
        yield command
    if pending is not None:
        yield _joined(pending, parts)


def _joined(first: commands.SendData, parts: list[bytes]) -> commands.SendData:
    if len(parts) == 1:
        return first
    return commands.SendData(first.connection, b"".join(parts))


def wrap(handle_event: Callable[[events.Event], Iterator[commands.Command]]) -> Any:
    """A layer's `handle_event` whose commands come out `coalesced`."""

    def handle(event: events.Event) -> Iterator[commands.Command]:
        return coalesced(handle_event(event))

    handle.coalesced = True  # type: ignore[attr-defined]
    return handle


class Coalesce:
    def client_connected(self, client: connection.Client) -> None:
        # The handler registers itself under the client's id before it offers this hook, and
        # has made its root layer already; it asks that layer for commands only afterwards.
        server = ctx.master.addons.get("proxyserver")
        handler = getattr(server, "connections", {}).get(client.id)
        root = getattr(handler, "layer", None)
        if root is None or client.transport_protocol != "tcp":
            return
        if not getattr(root.handle_event, "coalesced", False):
            root.handle_event = wrap(root.handle_event)


addons = [Coalesce()]
"""Loaded as a script of its own (`mitmdump -s proxy/addons/coalesce.py`) beside lean.py and
dispatch.py by the benchmark's `mitmdump-lean` row."""
