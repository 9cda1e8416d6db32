"""Every flow becomes one FlowRecord in the spool: answered, refused by us, or failed.

Runs after identity and metering in the addon list, so it reads what they left in
`flow.metadata`. Each flow is written once, by whichever of its final hooks comes first; a
websocket's handshake flow is written when the connection closes, with its messages.

Headers and bodies go in the record redacted (proxy.addons.redaction). A body is kept whole up
to `autovibe_spool_body_max` bytes; its size and hash always cover all of it. A response that
metering streams through is copied as it passes, bounded by the same cap: the stream itself is
never held back. The schema and its rules: docs/capture-record.md.

A DNS query (the proxy's `dns` mode, for workers in transparent mode) is a record too: method
`DNS`, the name as host, `dns:<name>?type=<type>` (RFC 4501) as url, the answers as the response
body, attributed by the source address like the worker's connections. So is a raw TCP stream
(a listed raw-TCP exception, or one the egress policy refused): method `TCP`, `tcp://host:port`
as url, the bytes each way as request and response bytes, their first bytes as the bodies.

A flow meant for the payment broker (`proxy.addons.egress.for_broker`) keeps only the sizes of
its bodies (`withheld`) and no query string: they hold where the money goes and the receipts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from mitmproxy import ctx, dns, exceptions, http, tcp
from mitmproxy.addonmanager import Loader
from mitmproxy.net.dns import response_codes
from mitmproxy.net.dns import types as dns_types
from mitmproxy.websocket import WebSocketMessage as MitmMessage
from wsproto.frame_protocol import Opcode

from contracts.records import Body, FlowRecord, WebSocket, WebSocketMessage
from proxy.addons import dataroot
from proxy.addons.budget import decision_of
from proxy.addons.egress import for_broker
from proxy.addons.identity import identity_of
from proxy.addons.metering import metered
from proxy.addons.redaction import Redactor, redactor_for
from proxy.addons.refusal import refused
from proxy.addons.routing import routed
from proxy.usage import DECODE_LIMIT, _decoder
from traffic.spool import Spool

log = logging.getLogger(__name__)

CAPTURED_KEY = "autovibe.captured"
RECORD_KEY = "autovibe.capture.record"
"""`Captured`: what later addons read of the record spooled for this flow."""
TAP_KEY = "autovibe.capture.tap"
"""The `BodyTap` copying a streamed response, in `flow.metadata`."""
WEBSOCKET_KEY = "autovibe.capture.websocket"
"""The `WebSocketTap` of a websocket's handshake flow, in `flow.metadata`."""
STREAM_KEY = "autovibe.capture.stream"
"""The `StreamTap` of a raw TCP flow, in `flow.metadata`."""
SPOOL_BODY_OPTION = "autovibe_spool_body_max"
DEFAULT_SPOOL_BODY_MAX = 8 * 1024 * 1024
NORMAL_CLOSES = frozenset({1000, 1001, 1005})
"""Websocket close codes that end a connection without an error (RFC 6455 7.4.1)."""
_DECODE_SLICE = 16 * 1024


@dataclass(frozen=True)
class Captured:
    """A spooled flow as the addons after capture (metrics) read it: no bodies or headers, so
    the flow carries nothing large once it is spooled."""

    status: int | None
    request_bytes: int
    response_bytes: int

    @classmethod
    def of(cls, flow: http.HTTPFlow) -> Captured:
        """The flow's, as capture left it, or read from the flow now."""
        found = flow.metadata.get(RECORD_KEY)
        if isinstance(found, Captured):
            return found
        record = record_of(flow)
        return cls(record.status, record.request_bytes, record.response_bytes)


class BodyTap:
    """A bounded copy of a body as it passes chunk by chunk: decoded, counted and hashed whole."""

    def __init__(self, content_encoding: str | None, keep: int) -> None:
        """`content_encoding` None: bytes that have none (a raw TCP stream), kept as they are."""
        self.keep = keep
        self.kept = bytearray()
        self.size = 0
        self.hash = hashlib.sha256()
        self.decode: Callable[[bytes], bytes] | None = (
            None if content_encoding is None else _decoder(content_encoding)
        )
        self.decode_error: str | None = None
        self.raw = self.decode is None
        """The encoding cannot be undone, or there is none: the bytes are kept as they travelled."""
        if self.raw and content_encoding is not None:
            self.decode_error = f"cannot decode Content-Encoding {content_encoding!r}"

    def feed(self, chunk: bytes) -> None:
        if self.raw:
            self._take(chunk)
            return
        if self.decode is None:  # decoding failed earlier: the rest is not read
            return
        try:
            for start in range(0, len(chunk), _DECODE_SLICE):
                self._take(self.decode(chunk[start : start + _DECODE_SLICE]))
                if self.size > DECODE_LIMIT:
                    raise ValueError(f"more than {DECODE_LIMIT} decoded bytes")
        except Exception as exc:  # zlib, brotli and zstd each raise their own errors
            self.decode, self.decode_error = None, f"cannot decode the body: {exc}"

    def _take(self, data: bytes) -> None:
        self.size += len(data)
        self.hash.update(data)
        room = self.keep - len(self.kept)
        if room > 0:
            self.kept += data[:room]

    def body(self, redactor: Redactor) -> Body:
        truncated = self.size > len(self.kept) or (self.decode is None and not self.raw)
        digest = self.hash.hexdigest()
        return make_body(
            bytes(self.kept), self.size, digest, redactor, truncated, self.decode_error
        )


class WebSocketTap:
    """Counts every message of a websocket and keeps their payloads up to a byte cap."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.kept = 0
        self.record = WebSocket()

    def add(self, message: MitmMessage, redactor: Redactor) -> None:
        record, size = self.record, len(message.content)
        if message.from_client:
            record.messages_from_client += 1
            record.bytes_from_client += size
        else:
            record.messages_from_server += 1
            record.bytes_from_server += size
        if self.kept >= self.keep and size:
            record.messages_omitted += 1
            return
        piece = message.content[: self.keep - self.kept]
        self.kept += len(piece)
        digest = hashlib.sha256(message.content).hexdigest()
        record.messages.append(
            WebSocketMessage(
                from_client=message.from_client,
                timestamp=message.timestamp,
                type="text" if message.type == Opcode.TEXT else "binary",
                content=make_body(piece, size, digest, redactor, size > len(piece), None),
            )
        )

    def close(self, flow: http.HTTPFlow, redactor: Redactor) -> WebSocket:
        data, record = flow.websocket, self.record
        if data is not None:
            record.ts_end = data.timestamp_end
            record.close_code = data.close_code
            record.closed_by_client = data.closed_by_client
            reason = data.close_reason
            record.close_reason = redactor.bytes(reason.encode()).decode() if reason else None
        return record


class StreamTap:
    """Both directions of a raw TCP stream: counted, hashed, the first bytes of each kept."""

    def __init__(self, keep: int) -> None:
        self.client = BodyTap(None, keep)
        self.server = BodyTap(None, keep)
        self.first_server_byte_at: float | None = None

    def add(self, message: tcp.TCPMessage) -> None:
        if message.from_client:
            self.client.feed(message.content)
            return
        if self.first_server_byte_at is None and message.content:
            self.first_server_byte_at = message.timestamp
        self.server.feed(message.content)


def make_body(
    kept: bytes,
    size: int,
    whole_sha256: str | None,
    redactor: Redactor,
    truncated: bool,
    decode_error: str | None,
) -> Body:
    """The record of a body of `size` bytes whose first bytes (or all) are `kept`.

    A body kept whole is hashed after redaction, so the hash proves what the record holds and
    confirms no guess at a redacted secret; a truncated one is hashed as it travelled
    (`whole_sha256`), since the record never holds the rest.
    """
    redacted = redactor.bytes(kept)
    if truncated:
        redacted = _cut_partial_secret(redacted, redactor.secrets())
        digest = whole_sha256 or hashlib.sha256(kept).hexdigest()
    elif redacted is kept and whole_sha256 is not None:
        digest = whole_sha256
    else:
        digest = hashlib.sha256(redacted).hexdigest()
    text, encoding = text_of(redacted, cut=truncated)
    return Body(
        text=text,
        encoding=encoding,
        size=size,
        sha256=digest,
        truncated=truncated,
        decode_error=decode_error,
    )


def text_of(data: bytes, *, cut: bool) -> tuple[str, Literal["utf-8", "base64"]]:
    """`data` as UTF-8 text, or as base64 when it is not; a `cut` body may end mid-character."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as exc:
        if cut and exc.end == len(data) and exc.start >= len(data) - 3:
            try:
                return data[: exc.start].decode("utf-8"), "utf-8"
            except UnicodeDecodeError:
                pass
    return base64.b64encode(data).decode("ascii"), "base64"


def _cut_partial_secret(data: bytes, secrets: Iterable[str]) -> bytes:
    """A body cut short may end inside a secret: drop such a tail rather than keep its start."""
    for secret in secrets:
        encoded = secret.encode()
        for n in range(min(len(encoded) - 1, len(data)), 0, -1):
            if data.endswith(encoded[:n]):
                return data[:-n]
    return data


def _whole_body(message: http.Message, keep: int, redactor: Redactor) -> Body | None:
    """The body of a request or response that mitmproxy read whole; None when empty."""
    raw = message.raw_content
    if not raw:
        return None
    decode_error = None
    try:
        data = message.get_content(strict=True) or b""
    except ValueError as exc:
        data, decode_error = raw, f"cannot decode the body: {exc}"
    kept = data[:keep]
    truncated = len(data) > len(kept)
    whole = hashlib.sha256(data).hexdigest() if truncated else None
    return make_body(kept, len(data), whole, redactor, truncated, decode_error)


def withheld(body: Body | None) -> Body | None:
    """What the spool keeps of a payment broker's body: its size, no text and no hash.

    Purchase details (`pay_to`, receipts) are encrypted in the broker's attempt log; a plain
    hash here would confirm a guess at them, the rest of the body being in that log.
    """
    if body is None:
        return None
    return Body(size=body.size, truncated=True, decode_error=body.decode_error)


def record_of(
    flow: http.HTTPFlow,
    redactor: Redactor | None = None,
    spool_body_max: int = DEFAULT_SPOOL_BODY_MAX,
) -> FlowRecord:
    """The capture record of a flow as it stands now; bodies redacted by `redactor`."""
    redactor = redactor or Redactor(None)
    request, response = flow.request, flow.response
    ts_start = request.timestamp_start
    if response is not None and response.timestamp_end is not None:
        ts_end = response.timestamp_end
    elif flow.error is not None:
        ts_end = flow.error.timestamp
    else:
        ts_end = time.time()
    ttfb_ms = None
    if response is not None and response.timestamp_start is not None:
        ttfb_ms = (response.timestamp_start - ts_start) * 1000
    identity = identity_of(flow)
    facts = metered(flow)
    first_chunk_ms = None
    if facts is not None and facts.first_chunk_at is not None:
        first_chunk_ms = (facts.first_chunk_at - ts_start) * 1000
    response_body = None
    tap = flow.metadata.get(TAP_KEY)
    if isinstance(tap, BodyTap):
        response_body = tap.body(redactor) if tap.size or tap.decode_error else None
    elif response is not None:
        response_body = _whole_body(response, spool_body_max, redactor)
    websocket_tap = flow.metadata.get(WEBSOCKET_KEY)
    websocket = (
        websocket_tap.close(flow, redactor) if isinstance(websocket_tap, WebSocketTap) else None
    )
    response_bytes = 0
    if response is not None and response.raw_content is not None:
        response_bytes = len(response.raw_content)
    elif facts is not None:
        # Streamed through: mitmproxy kept no body, the meter counted what passed.
        response_bytes = facts.response_bytes
    decision = decision_of(flow)
    request_body = _whole_body(request, spool_body_max, redactor)
    url, path = request.url, request.path
    if for_broker(flow):
        request_body = withheld(request_body)
        if refused(flow) is None:  # the proxy's own refusal tells nothing of the purchase
            response_body = withheld(response_body)
        url, path = url.partition("?")[0], path.partition("?")[0]
    return FlowRecord(
        id=flow.id,
        ts_start=ts_start,
        ts_end=ts_end,
        duration_ms=(ts_end - ts_start) * 1000,
        ttfb_ms=ttfb_ms,
        first_chunk_ms=first_chunk_ms,
        method=request.method,
        # Where the flow really went, not what its Host header claims.
        url=url,
        host=request.host,
        path=path,
        status=response.status_code if response is not None else None,
        request_bytes=len(request.raw_content or b""),
        response_bytes=response_bytes,
        project=identity.project if identity else None,
        trial=identity.trial if identity else None,
        assignment=identity.assignment if identity else None,
        machine=identity.machine if identity else None,
        provider=facts.provider if facts else None,
        model=facts.model if facts else None,
        requested_model=route.requested if (route := routed(flow)) else None,
        route_reason=route.reason if route else None,
        response_id=facts.response_id if facts else None,
        streamed=facts.streamed if facts else False,
        usage=facts.usage if facts else None,
        cost_usd=facts.cost_usd if facts else Decimal(0),
        budget=None if decision is None else decision.text(),
        budget_decision=decision,
        error=_error_of(flow, facts.problem if facts else None, websocket),
        upstream_error=facts.upstream_error if facts else None,
        request_headers=list(request.headers.items(multi=True)),
        response_headers=list(response.headers.items(multi=True)) if response else [],
        request_body=request_body,
        response_body=response_body,
        websocket=websocket,
    )


def dns_record_of(flow: dns.DNSFlow, redactor: Redactor | None = None) -> FlowRecord:
    """The capture record of a DNS query: name, type, answers, who asked (capture-record.md)."""
    request, response = flow.request, flow.response
    question = request.question
    name = question.name if question else ""
    kind = dns_types.to_str(question.type) if question else "?"
    if response is not None:
        ts_end = response.timestamp
    elif flow.error is not None:
        ts_end = flow.error.timestamp
    else:
        ts_end = time.time()
    body = None
    error = flow.error.msg if flow.error is not None else None
    if response is not None:
        code = response_codes.to_str(response.response_code)
        answers = [record.to_json() for record in response.answers]
        data = json.dumps({"response_code": code, "answers": answers}).encode()
        body = make_body(data, len(data), None, redactor or Redactor(None), False, None)
        if error is None and response.response_code != response_codes.NOERROR:
            error = f"dns: {code}"
    identity = identity_of(flow)
    return FlowRecord(
        id=flow.id,
        ts_start=request.timestamp,
        ts_end=ts_end,
        duration_ms=(ts_end - request.timestamp) * 1000,
        method="DNS",
        url=f"dns:{name}?type={kind}",
        host=name,
        path="",
        status=(
            response_codes.http_equiv_status_code(response.response_code) if response else None
        ),
        request_bytes=len(request.packed),
        response_bytes=len(response.packed) if response is not None else 0,
        project=identity.project if identity else None,
        trial=identity.trial if identity else None,
        assignment=identity.assignment if identity else None,
        machine=identity.machine if identity else None,
        error=error,
        response_body=body,
    )


def tcp_record_of(
    flow: tcp.TCPFlow, tap: StreamTap, redactor: Redactor | None = None
) -> FlowRecord:
    """The capture record of a raw TCP stream: where it went, bytes and first bytes each way,
    when it started, first heard from the server and ended, who opened it (capture-record.md)."""
    redactor = redactor or Redactor(None)
    for message in flow.messages:  # what no `tcp_message` hook saw (a refused stream's start)
        tap.add(message)
    flow.messages.clear()
    address = flow.server_conn.address
    host, port = (str(address[0]), int(address[1])) if address else ("", 0)
    ts_start = flow.timestamp_created
    ts_end = flow.error.timestamp if flow.error is not None else time.time()
    first = tap.first_server_byte_at
    identity = identity_of(flow)
    return FlowRecord(
        id=flow.id,
        ts_start=ts_start,
        ts_end=ts_end,
        duration_ms=(ts_end - ts_start) * 1000,
        ttfb_ms=(first - ts_start) * 1000 if first is not None else None,
        method="TCP",
        url=f"tcp://{host}:{port}" if ":" not in host else f"tcp://[{host}]:{port}",
        host=host,
        path="",
        request_bytes=tap.client.size,
        response_bytes=tap.server.size,
        project=identity.project if identity else None,
        trial=identity.trial if identity else None,
        assignment=identity.assignment if identity else None,
        machine=identity.machine if identity else None,
        error=flow.error.msg if flow.error is not None else None,
        request_body=tap.client.body(redactor) if tap.client.size else None,
        response_body=tap.server.body(redactor) if tap.server.size else None,
    )


def _error_of(
    flow: http.HTTPFlow, metering_problem: str | None, websocket: WebSocket | None
) -> str | None:
    if flow.error is not None:
        return flow.error.msg
    reason = refused(flow)
    if reason is not None:
        return reason
    if websocket is not None and websocket.close_code not in NORMAL_CLOSES:
        side = "client" if websocket.closed_by_client else "server"
        if websocket.close_code == 1006:
            return f"websocket: the {side} connection was lost without a close frame (1006)"
        reason = f" {websocket.close_reason}" if websocket.close_reason else ""
        return f"websocket: closed by the {side} with {websocket.close_code}{reason}"
    return f"metering: {metering_problem}" if metering_problem else None


class Capture:
    def __init__(self) -> None:
        self.spool: Spool | None = None
        self.redactor = Redactor(None)
        self.body_max = DEFAULT_SPOOL_BODY_MAX

    def load(self, loader: Loader) -> None:
        dataroot.add_option(loader)
        loader.add_option(
            name=SPOOL_BODY_OPTION,
            typespec=int,
            default=DEFAULT_SPOOL_BODY_MAX,
            help="Bytes of each body (and of each websocket's messages) kept in the spool; "
            "beyond them the record says truncated, with the size and hash of the whole.",
        )

    def configure(self, updated: set[str]) -> None:
        if dataroot.OPTION in updated:
            if self.spool is not None:
                self.spool.close()
            self.spool = Spool(dataroot.current())
            self.redactor = redactor_for(dataroot.current())
        if SPOOL_BODY_OPTION in updated:
            value: int = getattr(ctx.options, SPOOL_BODY_OPTION)
            if value < 0:
                raise exceptions.OptionsError(
                    f"{SPOOL_BODY_OPTION} must be 0 or more bytes, got {value}"
                )
            self.body_max = value

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or not response.stream:
            return  # read whole by mitmproxy: captured from the flow in `response`
        tap = BodyTap(response.headers.get("Content-Encoding", ""), self.body_max)
        flow.metadata[TAP_KEY] = tap
        response.stream = _tapped(flow, response.stream, tap)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is not None:
            # The handshake: written when the connection closes, with what passed over it.
            flow.metadata[WEBSOCKET_KEY] = WebSocketTap(self.body_max)
            return
        self._capture(flow)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        tap = flow.metadata.get(WEBSOCKET_KEY)
        if not isinstance(tap, WebSocketTap) or flow.websocket is None:
            return
        messages = flow.websocket.messages
        tap.add(messages[-1], self.redactor)
        # mitmproxy keeps every message of a connection; the tap has what the record needs.
        del messages[:-1]

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._capture(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._capture(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        # A refused or unreachable CONNECT; a successful one is not a flow of its own,
        # the requests tunnelled through it are.
        self._capture(flow)

    def dns_response(self, flow: dns.DNSFlow) -> None:
        self._capture_dns(flow)

    def dns_error(self, flow: dns.DNSFlow) -> None:
        self._capture_dns(flow)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        flow.metadata[STREAM_KEY] = StreamTap(self.body_max)

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        tap = flow.metadata.get(STREAM_KEY)
        if not isinstance(tap, StreamTap):
            return
        tap.add(flow.messages[-1])
        # mitmproxy keeps every message of a stream; the tap has what the record needs.
        flow.messages.clear()

    def tcp_end(self, flow: tcp.TCPFlow) -> None:
        self._capture_stream(flow)

    def tcp_error(self, flow: tcp.TCPFlow) -> None:
        self._capture_stream(flow)

    def done(self) -> None:
        if self.spool is not None:
            self.spool.close()

    def _capture_stream(self, flow: tcp.TCPFlow) -> None:
        tap = flow.metadata.pop(STREAM_KEY, None)
        if not isinstance(tap, StreamTap):
            return  # written already (each flow ends once), or started before capture ran
        assert self.spool is not None
        try:
            self.spool.append(self.redactor.record(tcp_record_of(flow, tap, self.redactor)))
        except (OSError, ValueError):
            log.exception("could not spool TCP stream %s to %s", flow.id, flow.server_conn.address)

    def _capture_dns(self, flow: dns.DNSFlow) -> None:
        if flow.metadata.get(CAPTURED_KEY):
            return
        flow.metadata[CAPTURED_KEY] = True
        assert self.spool is not None
        try:
            self.spool.append(self.redactor.record(dns_record_of(flow, self.redactor)))
        except (OSError, ValueError):
            log.exception("could not spool DNS query %s %s", flow.id, flow.request.question)

    def _capture(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(CAPTURED_KEY):
            return
        flow.metadata[CAPTURED_KEY] = True
        assert self.spool is not None
        try:
            record = record_of(flow, self.redactor, self.body_max)
            # The copy of the body is in the record now: the flow need not keep it.
            flow.metadata.pop(TAP_KEY, None)
            flow.metadata[RECORD_KEY] = Captured(
                record.status, record.request_bytes, record.response_bytes
            )
            self.spool.append(self.redactor.record(record))
        except (OSError, ValueError):
            # The spool is the source of truth; losing a line is an incident, not a warning.
            log.exception("could not spool flow %s %s", flow.id, flow.request.url)


def _tapped(
    flow: http.HTTPFlow, stream: bool | Callable[[bytes], bytes | Iterable[bytes]], tap: BodyTap
) -> Callable[[bytes], bytes | Iterable[bytes]]:
    """`stream` (metering's pass-through, or plain `True`) with a copy of each chunk kept.

    Holds the flow's id, not the flow (see `proxy.addons.metering._pass_through`)."""
    flow_id = flow.id

    def tapped(chunk: bytes) -> bytes | Iterable[bytes]:
        out = stream(chunk) if callable(stream) else chunk
        if chunk:
            try:
                tap.feed(chunk)
            except Exception:
                # Capturing must never cost the agent its answer.
                log.exception("capture failed on %s; the stream goes on uncopied", flow_id)
                tap.decode, tap.raw = None, False
                tap.decode_error = tap.decode_error or "capture fault (see the proxy log)"
        return out

    return tapped
