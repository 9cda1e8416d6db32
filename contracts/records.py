"""The capture record: one line of the traffic spool per proxied flow (schema version 1)."""

from __future__ import annotations

from decimal import Decimal

from pydantic import BaseModel, Field

SCHEMA_VERSION = 1


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
    response_id: str | None = None
    streamed: bool = False
    usage: Usage | None = None
    cost_usd: Decimal = Field(default=Decimal(0))
    error: str | None = None
    budget: str | None = None
    """The budget decision: what was reserved in which scopes and settled, or why refused."""
