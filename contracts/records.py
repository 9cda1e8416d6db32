"""The capture record: one line of the traffic spool per proxied flow (docs/capture-record.md).

Schema 2 adds headers, bodies and websocket messages to schema 1; every field it added has a
default, so schema-1 lines still read as FlowRecords (with no headers and no bodies). Schema 3
adds `budget_decision`, the budget decision as a typed record beside the `budget` text, and
`usage.unit`/`units`; `FlowRecord.decision()` reads it from either, so older lines still tell
their decision.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Literal

from pydantic import BaseModel, Field

SCHEMA_VERSION = 4

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


class BudgetDecision(BaseModel):
    """What the budget addon decided on one flow (`proxy/addons/budget.py`), as a record.

    `reserved`: the call may cost up to `reserved` in `scopes`, not settled yet (a flow
    captured mid-way). `settled`: reserved, then charged `settled`, the call having ended by
    `ending` (`response`, `error: <why>`, `orphan sweep`). `refused`: not let through, for
    `error` (`budget_exhausted`, `budget_unavailable`, …) by `scopes[0]` when a scope refused.
    """

    action: Literal["reserved", "settled", "refused"]
    scopes: list[str] = Field(default_factory=list)
    reserved: Decimal | None = None
    settled: Decimal | None = None
    currency: str | None = None
    ending: str | None = None
    error: str | None = None
    input_estimate: str | None = None
    """What the reservation counted as input beyond the request's body (images at their
    ceiling, files and unseen earlier conversations at the context window, …); None when the
    body alone was counted (`proxy.input_estimate`)."""

    @property
    def scope(self) -> str | None:
        """The refusing scope of a refusal (None when no scope refused); else the first."""
        return self.scopes[0] if self.scopes else None

    def text(self) -> str:
        """The one line `FlowRecord.budget` has always held (schemas 1 and 2)."""
        if self.action == "refused":
            return f"refused {self.error}" + (f" by {self.scope}" if self.scope else "")
        text = f"reserved {self.reserved} {self.currency} in {','.join(self.scopes)}"
        if self.action == "settled":
            if self.ending == ORPHAN_ENDING:
                text += f"; settled {self.settled} by the orphan sweep"
            else:
                text += f"; settled {self.settled} on {self.ending}"
        return text

    @classmethod
    def from_text(cls, text: str | None) -> BudgetDecision | None:
        """The decision a schema-1 or -2 `budget` line states; None when it states none."""
        if not text:
            return None
        refused = _REFUSED.fullmatch(text)
        if refused:
            scope = refused["scope"]
            return cls(action="refused", error=refused["error"], scopes=[scope] if scope else [])
        held = _HELD.fullmatch(text)
        if held is None:
            return None
        try:
            reserved = Decimal(held["reserved"])
            settled = None if held["settled"] is None else Decimal(held["settled"])
        except InvalidOperation:
            return None
        return cls(
            action="reserved" if settled is None else "settled",
            scopes=held["scopes"].split(","),
            reserved=reserved,
            settled=settled,
            currency=held["currency"],
            ending=ORPHAN_ENDING if held["orphan"] else held["ending"],
        )


ORPHAN_ENDING = "orphan sweep"
"""`BudgetDecision.ending` of a reservation the orphan sweeper settled (its proxy died)."""
_REFUSED = re.compile(r"refused (?P<error>\w+)(?: by (?P<scope>\S+))?")
_HELD = re.compile(
    r"reserved (?P<reserved>\S+) (?P<currency>[A-Z]{3}) in (?P<scopes>\S+)"
    r"(?:; settled (?P<settled>\S+) (?:on (?P<ending>.+)|(?P<orphan>by the orphan sweep)))?",
    re.DOTALL,
)


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
    route_reason: str | None = None
    """Why routing sent an `auto` call where it went (local first, saturated, too long)."""
    response_id: str | None = None
    streamed: bool = False
    usage: Usage | None = None
    cost_usd: Decimal = Field(default=Decimal(0))
    error: str | None = None
    upstream_error: str | None = None
    """How a provider's answer fell short of a whole one (schema 4): the error it named
    (`rate_limit_error`, `overloaded_error`, `rate_limit_exceeded`, `server_error`, …),
    `http_<status>` when it named none, `stream_cut`, or `no_response`; None for a whole answer,
    a flow to no provider, and the proxy's own refusals."""
    budget: str | None = None
    """The budget decision as one line for people: reserved in which scopes and settled, or
    why refused (`BudgetDecision.text`)."""
    budget_decision: BudgetDecision | None = None
    """The budget decision as a record (schema 3); older lines have only `budget`."""
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

    def decision(self) -> BudgetDecision | None:
        """The budget decision, from the record (schema 3) or from its text (schemas 1, 2)."""
        return self.budget_decision or BudgetDecision.from_text(self.budget)


BODY_FIELDS = ("request_body", "response_body")
HEADER_FIELDS = ("request_headers", "response_headers")
