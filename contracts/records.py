"""The capture record: one line of the traffic spool per proxied flow (docs/capture-record.md).

Schema 2 adds headers, bodies and websocket messages to schema 1; every field it added has a
default, so schema-1 lines still read as FlowRecords (with no headers and no bodies).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, Field

SCHEMA_VERSION = 2

Header = tuple[str, str]
"""One header line, `[name, value]` in JSON; a list of them keeps order and duplicates."""


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    estimated: bool = False
    """True when the response carried no usage and tokens were estimated from bytes."""
    cache_creation_tokens: int = 0
    """Part of `prompt_tokens` written to the provider's prompt cache (Anthropic)."""
    cache_read_tokens: int = 0
    """Part of `prompt_tokens` read from the provider's prompt cache (cheaper)."""
    unit: Literal["image", "character", "second"] | None = None
    """What a call priced by neither chat nor embedding tokens was priced by; None otherwise."""
    units: int = 0
    """How many `unit`s the call was charged for (images made, input characters spoken,
    seconds of audio transcribed)."""


class Body(BaseModel):
    """A message body after content decoding (gzip, br, …), redacted, maybe cut short."""

    text: str = ""
    """The body, or its first part when `truncated`: UTF-8 text, or base64 (`encoding`)."""
    encoding: Literal["utf-8", "base64"] = "utf-8"
    """`base64` when the decoded bytes are not UTF-8 text (images, protobuf, …)."""
    size: int = 0
    """Bytes of the whole decoded body, as it travelled."""
    sha256: str = ""
    """Hex SHA-256 of the whole body: of the redacted bytes `text` holds when the body is kept
    whole, of the decoded bytes as they travelled when `truncated` (docs/capture-record.md)."""
    truncated: bool = False
    """`text` holds only the first bytes of the body (the spool's or the index's cap)."""
    decode_error: str | None = None
    """Why the content encoding could not be undone; `text` then holds the encoded bytes."""


class WebSocketMessage(BaseModel):
    from_client: bool
    timestamp: float
    type: Literal["text", "binary"]
    content: Body
    """The message's payload, redacted; `text` is empty once the connection's cap is spent."""


class WebSocket(BaseModel):
    """What passed over a websocket after its handshake (the flow's 101 response)."""

    messages_from_client: int = 0
    messages_from_server: int = 0
    bytes_from_client: int = 0
    bytes_from_server: int = 0
    ts_end: float | None = None
    close_code: int | None = None
    """1000 normal; 1006 when the connection was lost without a close frame."""
    close_reason: str | None = None
    closed_by_client: bool | None = None
    messages: list[WebSocketMessage] = Field(default_factory=list)
    """The messages in order, as long as the connection's byte cap lasts."""
    messages_omitted: int = 0
    """Messages counted above but not listed: they came after the byte cap was spent."""


class FlowRecord(BaseModel):
    """What the proxy knows about one request/response pair; the spool holds these as JSONL."""

    schema_version: int = SCHEMA_VERSION
    id: str
    ts_start: float
    ts_end: float
    duration_ms: float
    ttfb_ms: float | None = None
    """Request start to the response headers, as the proxy saw them."""
    first_chunk_ms: float | None = None
    """Request start to the first body bytes of a response streamed through the proxy."""
    method: str
    url: str
    host: str
    path: str
    status: int | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    project: str | None = None
    trial: str | None = None
    assignment: str | None = None
    machine: str | None = None
    provider: str | None = None
    model: str | None = None
    requested_model: str | None = None
    """What the agent asked for when routing chose the model (`auto`); None otherwise."""
    response_id: str | None = None
    streamed: bool = False
    usage: Usage | None = None
    cost_usd: Decimal = Field(default=Decimal(0))
    error: str | None = None
    budget: str | None = None
    """The budget decision: what was reserved in which scopes and settled, or why refused."""
    request_headers: list[Header] = Field(default_factory=list)
    """As forwarded upstream, redacted (schema 2)."""
    response_headers: list[Header] = Field(default_factory=list)
    """As answered to the client, redacted (schema 2)."""
    request_body: Body | None = None
    """None when the request had no body (schema 2)."""
    response_body: Body | None = None
    """None when the response had no body, or none came (schema 2)."""
    websocket: WebSocket | None = None
    """Set on the handshake flow of a websocket connection, written when it closes (schema 2)."""


BODY_FIELDS = ("request_body", "response_body")
HEADER_FIELDS = ("request_headers", "response_headers")
