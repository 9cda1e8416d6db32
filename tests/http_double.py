"""One base for the HTTP doubles of the systems that cannot run here (Elasticsearch, Vault, Nomad).

A double is a threaded server on 127.0.0.1 that hands every request to its `_handle`, which
checks it against the documented API, records it, and answers as the real server would, or
answers 400 and lists it in `violations`. `start()`, `stop()` and `url` are the same for all;
`JsonRequest` and `read_json` are what the JSON APIs (Vault, Nomad) record of each call.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlsplit


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    """A double stopped can listen again on the port it had."""
    daemon_threads = True


@dataclass
class JsonRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    token: str | None
    body: Any
    """The JSON body, its text when it is not JSON, None when empty."""


class HttpDouble:
    """Serves `methods` on 127.0.0.1."""

    methods: ClassVar[tuple[str, ...]] = ("GET", "POST", "PUT", "DELETE")
    """The HTTP methods the real API has (any other is answered 501, as by http.server)."""
    _port: int = 0

    def start(self, port: int = 0) -> None:
        """Listen on `port` (0: any free one)."""
        double = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                double._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        for method in self.methods:
            setattr(Handler, f"do_{method}", Handler._any)
        self._server = _Server(("127.0.0.1", port), Handler)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError


def read_body(handler: BaseHTTPRequestHandler) -> bytes:
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def read_json(
    handler: BaseHTTPRequestHandler, token_header: str, *, keep_blank_values: bool = False
) -> JsonRequest:
    """The request as a JSON API sees it: path unquoted, query parsed, token from its header."""
    parts = urlsplit(handler.path)
    raw = read_body(handler)
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = raw.decode(errors="replace")
    return JsonRequest(
        handler.command,
        unquote(parts.path),
        parse_qs(parts.query, keep_blank_values=keep_blank_values),
        handler.headers.get(token_header),
        body,
    )


def reply(
    handler: BaseHTTPRequestHandler,
    status: int,
    data: bytes,
    content_type: str | None,
    headers: Iterable[tuple[str, str]] = (),
) -> None:
    """One complete answer: status, Content-Type (none when None), Content-Length, `headers`."""
    handler.send_response(status)
    if content_type is not None:
        handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    for name, value in headers:
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)
