"""A stand-in of the Telegram Bot API (core.telegram.org/bots/api), for the bot's tests.

A real HTTP server on loopback at `<url>/bot<token>/<method>`, taking parameters as the API
does (query string, application/x-www-form-urlencoded, application/json, multipart/form-data)
and answering `{"ok": true, "result": …}` or `{"ok": false, "error_code": N, "description":
…}`. Only the methods the bot uses exist (getMe, getUpdates, sendMessage, editMessageText,
sendPhoto); any other is 404, a wrong token 401. Documented behaviour kept: getUpdates returns
updates with `update_id >= offset` and forgets the ones before it, waiting up to `timeout`
seconds for one; text is 1-4096 characters; editing a message to the text it has is a 400
("message is not modified"); a photo is a multipart file upload.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

BOT = {"id": 777000, "is_bot": True, "first_name": "autovibe", "username": "autovibe_bot"}


@dataclass
class Sent:
    chat_id: int
    message_id: int
    text: str | None
    edits: list[str] = field(default_factory=list)
    photo: bytes | None = None


@dataclass
class BotApi:
    token: str
    url: str = ""
    updates: list[dict[str, Any]] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    next_update: int = 1
    cond: threading.Condition = field(default_factory=threading.Condition)

    def push(self, user_id: int, text: str) -> None:
        """A user writes `text` to the bot in their private chat."""
        with self.cond:
            uid = self.next_update
            self.next_update += 1
            command = text.split(" ", 1)[0]
            message: dict[str, Any] = {
                "message_id": 10_000 + uid,
                "from": {"id": user_id, "is_bot": False, "first_name": f"user{user_id}"},
                "chat": {"id": user_id, "type": "private"},
                "date": int(time.time()),
                "text": text,
            }
            if command.startswith("/"):
                message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command)}]
            self.updates.append({"update_id": uid, "message": message})
            self.cond.notify_all()

    def chat(self, chat_id: int) -> list[Sent]:
        return [m for m in self.sent if m.chat_id == chat_id]

    def method_calls(self, method: str) -> int:
        return sum(1 for name, _ in self.calls if name == method)


class _Fail(Exception):
    def __init__(self, code: int, description: str) -> None:
        self.code = code
        self.description = description


def _params(handler: BaseHTTPRequestHandler) -> tuple[dict[str, Any], dict[str, bytes]]:
    query = {k: v[0] for k, v in parse_qs(urlsplit(handler.path).query).items()}
    length = int(handler.headers.get("Content-Length") or 0)
    raw = handler.rfile.read(length) if length else b""
    kind = handler.headers.get("Content-Type", "")
    files: dict[str, bytes] = {}
    if not raw:
        return query, files
    if kind.startswith("application/json"):
        return {**query, **json.loads(raw)}, files
    if kind.startswith("application/x-www-form-urlencoded"):
        return {**query, **{k: v[0] for k, v in parse_qs(raw.decode()).items()}}, files
    if kind.startswith("multipart/form-data"):
        head = f"Content-Type: {kind}\r\n\r\n".encode()
        message = BytesParser(policy=HTTP).parsebytes(head + raw)
        fields: dict[str, Any] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            if part.get_filename() is not None:
                files[str(name)] = payload
            else:
                fields[str(name)] = payload.decode()
        return {**query, **fields}, files
    raise _Fail(400, f"Bad Request: unsupported content type {kind}")


def _handler(api: BotApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def _serve(self) -> None:
            path = urlsplit(self.path).path
            try:
                prefix, _, method = path.strip("/").partition("/")
                if prefix != f"bot{api.token}":
                    raise _Fail(401, "Unauthorized")
                params, files = _params(self)
                api.calls.append((method, params))
                result = self._call(method, params, files)
                body = {"ok": True, "result": result}
                status = 200
            except _Fail as exc:
                body = {"ok": False, "error_code": exc.code, "description": exc.description}
                status = exc.code
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _call(self, method: str, p: dict[str, Any], files: dict[str, bytes]) -> Any:
            if method == "getMe":
                return BOT
            if method == "getUpdates":
                return self._updates(p)
            if method == "sendMessage":
                return self._message(int(p["chat_id"]), _text(p))
            if method == "editMessageText":
                return self._edit(int(p["chat_id"]), int(p["message_id"]), _text(p))
            if method == "sendPhoto":
                photo = files.get("photo")
                if photo is None or not photo.startswith(b"\x89PNG\r\n\x1a\n"):
                    raise _Fail(400, "Bad Request: photo must be an uploaded image")
                return self._message(int(p["chat_id"]), None, photo, p.get("caption"))
            raise _Fail(404, "Not Found")

        def _updates(self, p: dict[str, Any]) -> list[dict[str, Any]]:
            offset = int(p.get("offset", 0) or 0)
            deadline = time.monotonic() + float(p.get("timeout", 0) or 0)
            with api.cond:
                if offset:
                    api.updates = [u for u in api.updates if u["update_id"] >= offset]
                while not api.updates and time.monotonic() < deadline:
                    api.cond.wait(deadline - time.monotonic())
                return list(api.updates[: int(p.get("limit", 100) or 100)])

        def _message(
            self, chat_id: int, text: str | None, photo: bytes | None = None, caption: Any = None
        ) -> dict[str, Any]:
            with api.cond:
                message_id = len(api.sent) + 1
                api.sent.append(Sent(chat_id, message_id, text, photo=photo))
            message: dict[str, Any] = {
                "message_id": message_id,
                "from": BOT,
                "chat": {"id": chat_id, "type": "private"},
                "date": int(time.time()),
            }
            if text is not None:
                message["text"] = text
            if photo is not None:
                message["photo"] = [
                    {"file_id": f"ph{message_id}", "file_unique_id": f"u{message_id}",
                     "width": 640, "height": 480, "file_size": len(photo)}
                ]  # fmt: skip
                if caption:
                    message["caption"] = caption
            return message

        def _edit(self, chat_id: int, message_id: int, text: str) -> dict[str, Any]:
            with api.cond:
                found = [m for m in api.sent if (m.chat_id, m.message_id) == (chat_id, message_id)]
                if not found:
                    raise _Fail(400, "Bad Request: message to edit not found")
                current = found[0].edits[-1] if found[0].edits else found[0].text
                if current == text:
                    raise _Fail(400, "Bad Request: message is not modified")
                found[0].edits.append(text)
            return {
                "message_id": message_id,
                "from": BOT,
                "chat": {"id": chat_id, "type": "private"},
                "date": int(time.time()),
                "edit_date": int(time.time()),
                "text": text,
            }

    return Handler


def _text(p: dict[str, Any]) -> str:
    text = p.get("text")
    if not isinstance(text, str) or not text.strip():
        raise _Fail(400, "Bad Request: message text is empty")
    if len(text) > 4096:
        raise _Fail(400, "Bad Request: message is too long")
    return text


@contextmanager
def bot_api_standin(token: str) -> Iterator[BotApi]:
    api = BotApi(token)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    server.daemon_threads = True
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
