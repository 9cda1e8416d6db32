"""A request's output cap, read one way for metering, routing and budget.

Each API names its cap differently: OpenAI chat `max_completion_tokens` (or the older
`max_tokens`), completions and Anthropic Messages `max_tokens`, Responses `max_output_tokens`.
A cap of 0 or less, a boolean or a non-integer is no cap: llama.cpp's server generates to the
end of its context on `max_tokens: 0`, so reserving for 0 would reserve for nothing. When the
proxy writes a cap in, it uses the field the target API defines (`field`), so a request is
never changed with a field its API rejects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.usage import Api

FIELDS: dict[Api, tuple[str, ...]] = {
    "openai_chat": ("max_completion_tokens", "max_tokens"),
    "openai_completions": ("max_tokens",),
    "openai_responses": ("max_output_tokens",),
    "anthropic_messages": ("max_tokens",),
}
"""The cap's names per API, the one the API documents first."""
LEGACY_PROVIDERS = frozenset({"local"})
"""Providers whose chat API knows only `max_tokens` (llama.cpp, vLLM's older servers)."""


@dataclass(frozen=True)
class OutputCap:
    asked: int | None
    """The positive cap the request set, or None: absent, 0, negative or not an integer."""
    field: str
    """The field to write a cap into: the one the request used, else the API's own."""


def output_cap(api: Api, doc: dict[str, Any] | None, provider: str | None = None) -> OutputCap:
    """The request's cap under `api`'s names, and where a cap belongs in its body."""
    names = FIELDS[api]
    doc = doc or {}
    for name in names:
        value = doc.get(name)
        if name in doc:
            asked = value if type(value) is int and value > 0 else None
            return OutputCap(asked, name)
    field = names[-1] if provider in LEGACY_PROVIDERS else names[0]
    return OutputCap(None, field)
