"""`Coalesce`: a run of `SendData` to one TCP connection leaves as one write, in order."""

from __future__ import annotations

from mitmproxy.connection import Client, Server
from mitmproxy.proxy import commands
from mitmproxy.test import tflow

from proxy.addons import coalesce
from proxy.addons.coalesce import coalesced


def _client() -> Client:
    return tflow.tclient_conn()


def _server(protocol: str = "tcp") -> Server:
    server = tflow.tserver_conn()
    server.transport_protocol = protocol  # type: ignore[assignment]
    return server


def _sent(produced: list[commands.Command]) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for command in coalesced(iter(produced)):
        if isinstance(command, commands.SendData):
            out.append(("send", (id(command.connection), command.data)))
        else:
            out.append((type(command).__name__, id(getattr(command, "connection", None))))
    return out


def test_a_run_to_one_connection_is_joined() -> None:
    client = _client()
    out = _sent([commands.SendData(client, b"HTTP/1.1 200 OK\r\n\r\n"),
                 commands.SendData(client, b"5\r\nhello\r\n"),
                 commands.SendData(client, b"0\r\n\r\n")])  # fmt: skip
    assert out == [("send", (id(client), b"HTTP/1.1 200 OK\r\n\r\n5\r\nhello\r\n0\r\n\r\n"))]


def test_order_with_other_connections_and_commands_is_kept() -> None:
    client, server = _client(), _server()
    produced: list[commands.Command] = [
        commands.SendData(server, b"head"),
        commands.SendData(server, b"body"),
        commands.SendData(client, b"a"),
        commands.CloseConnection(client),
        commands.SendData(client, b"b"),
        commands.SendData(server, b"c"),
        commands.SendData(client, b"d"),
    ]
    assert _sent(produced) == [
        ("send", (id(server), b"headbody")),
        ("send", (id(client), b"a")),
        ("CloseConnection", id(client)),
        ("send", (id(client), b"b")),
        ("send", (id(server), b"c")),
        ("send", (id(client), b"d")),
    ]


def test_datagrams_are_never_joined() -> None:
    server = _server("udp")
    out = _sent([commands.SendData(server, b"query 1"), commands.SendData(server, b"query 2")])
    assert out == [("send", (id(server), b"query 1")), ("send", (id(server), b"query 2"))]


def test_a_run_stops_at_the_size_limit() -> None:
    client = _client()
    half = b"x" * (coalesce.MAX_JOINED // 2)
    sends = [half, half, b"tail", b"more"]
    out = _sent([commands.SendData(client, data) for data in sends])
    assert out == [("send", (id(client), half + half)), ("send", (id(client), b"tailmore"))]


def test_a_lone_command_is_passed_as_it_is() -> None:
    client = _client()
    alone = commands.SendData(client, b"one")
    assert list(coalesced(iter([alone]))) == [alone]
    assert list(coalesced(iter([]))) == []
