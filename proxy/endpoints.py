"""Which endpoints of a provider the proxy lets through, and by what rule each is priced.

Every request to a cloud provider is looked up here by method and path. An endpoint is
metered by one rule — `tokens` (the LLM APIs' usage), `input_tokens` (embeddings), `images`,
`characters` (speech), `audio_seconds` (transcription) — or is `free`, or `refused`; an
endpoint the table does not declare is refused too (fail closed). Metering prices a call with
it, budget reserves the most the rule allows, and injection puts the provider's key only on
calls that are metered or free. The local model plane is not looked up: it holds no key.

The unit rules are pure functions of the request (`quote`: the model, the price of one unit,
the most units the call may use) and of the answer (`served`: the units to charge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

from contracts.config import PriceCatalog, UnitPrices
from proxy.usage import Api

Rule = Literal["tokens", "input_tokens", "images", "characters", "audio_seconds", "free", "refused"]
Unit = Literal["token", "image", "character", "second"]
UNIT_RULES: dict[Rule, Unit] = {
    "input_tokens": "token",
    "images": "image",
    "characters": "character",
    "audio_seconds": "second",
}
"""The rules priced per unit, and their unit."""
PROMPT_MARGIN_TOKENS = 64
"""Added to an embedding request's bytes for the tokens a provider may add per input."""
BYTES_PER_TOKEN = 4
"""Rough size of a token, for an embedding answer that reports no usage."""


@dataclass(frozen=True)
class Endpoint:
    """One declared endpoint: `GET /v1/models/{model}` (a `{…}` segment is any one segment,
    a last `*` any rest, none included) and how it is priced."""

    method: str
    """`GET`, `POST`, … or `*` for any."""
    path: str
    rule: Rule
    api: Api | None = None
    """The usage shape of a `tokens` endpoint."""
    why: str = ""
    """Why a `refused` endpoint is not metered, for the refusal's message."""

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"

    def matches(self, method: str, path: str) -> bool:
        if self.method not in ("*", method):
            return False
        want, got = self.path.split("/"), path.split("/")
        if want[-1] == "*":
            want = want[:-1]
            return len(got) >= len(want) and _same(want, got[: len(want)])
        return len(got) == len(want) and _same(want, got)


def _same(pattern: list[str], segments: list[str]) -> bool:
    return all(
        p == s or (p.startswith("{") and p.endswith("}") and s != "")
        for p, s in zip(pattern, segments, strict=True)
    )


LLM_APIS = (
    Endpoint("POST", "/v1/chat/completions", "tokens", "openai_chat"),
    Endpoint("POST", "/v1/completions", "tokens", "openai_completions"),
    Endpoint("POST", "/v1/responses", "tokens", "openai_responses"),
    Endpoint("POST", "/v1/messages", "tokens", "anthropic_messages"),
)
"""The LLM APIs, metered by the tokens their answers report, at every provider."""
MODEL_LISTS = (
    Endpoint("GET", "/v1/models", "free"),
    Endpoint("GET", "/v1/models/{model}", "free"),
)
BATCHES = "a batch is billed per request when it runs, hours later, outside any call the proxy sees"

OPENAI = (
    *LLM_APIS,
    *MODEL_LISTS,
    Endpoint("POST", "/v1/embeddings", "input_tokens"),
    Endpoint("POST", "/v1/images/generations", "images"),
    Endpoint("POST", "/v1/audio/speech", "characters"),
    Endpoint("POST", "/v1/audio/transcriptions", "audio_seconds"),
    Endpoint("*", "/v1/batches/*", "refused", why=BATCHES),
    Endpoint("*", "/v1/files/*", "refused", why="files feed batches and fine-tuning, not metered"),
    Endpoint(
        "*",
        "/v1/realtime/*",
        "refused",
        why="a realtime session is billed per token of websocket events the proxy does not "
        "price, and its client secrets would let a worker reach the provider directly",
    ),
    Endpoint(
        "*",
        "/v1/images/*",
        "refused",
        why="edits and variations are billed by input images the proxy does not count",
    ),
    Endpoint(
        "*",
        "/v1/audio/*",
        "refused",
        why="a translation's answer reports no duration to settle from",
    ),
)
ANTHROPIC = (
    *LLM_APIS,
    *MODEL_LISTS,
    Endpoint("POST", "/v1/messages/count_tokens", "free"),
    Endpoint("*", "/v1/messages/batches/*", "refused", why=BATCHES),
    Endpoint("*", "/v1/files/*", "refused", why="files are read by calls billed apart"),
)
TABLES: dict[str, tuple[Endpoint, ...]] = {"openai": OPENAI, "anthropic": ANTHROPIC}
"""Each provider's declared endpoints, the first match wins; a provider not named here (an
operator's OpenAI-compatible gateway) has `OTHER`."""
OTHER = (*LLM_APIS, *MODEL_LISTS)


def table(provider: str) -> tuple[Endpoint, ...]:
    return TABLES.get(provider, OTHER)


def endpoint_of(provider: str, method: str, path: str) -> Endpoint | None:
    """The provider's declared endpoint for a request path (no query); None: undeclared."""
    return next((e for e in table(provider) if e.matches(method, path)), None)


def llm_api(method: str, path: str) -> Api | None:
    """Which LLM API a request calls, whoever serves it; None when it is no LLM call."""
    return next((e.api for e in LLM_APIS if e.matches(method, path)), None)


def allowed(provider: str) -> str:
    """The provider's metered and free endpoints, for a refusal's message."""
    return ", ".join(
        f"{e.name} ({e.rule.replace('_', ' ')})" for e in table(provider) if e.rule != "refused"
    )


class Unpriced(Exception):
    """prices.yaml has no price for what the request asks for; the message names it."""


class Unmeterable(Exception):
    """The request does not say what the rule needs to price it (model, input, …)."""


@dataclass(frozen=True)
class Quote:
    """What a unit-priced call may cost, known before it is forwarded."""

    model: str
    unit: Unit
    price: Decimal
    """USD per `per` units, as prices.yaml states it."""
    per: int
    most: int
    """The most units the call may be charged for: what budget reserves."""
    fixed: bool = False
    """The units are known from the request (characters to speak): the answer is not read."""

    def cost_usd(self, units: int) -> Decimal:
        return self.price * units / self.per

    @property
    def most_usd(self) -> Decimal:
        return self.cost_usd(self.most)


def quote(
    rule: Rule,
    provider: str,
    doc: dict[str, Any] | None,
    body_bytes: int,
    prices: PriceCatalog,
    audio_max_seconds: int,
) -> Quote:
    """The price of a unit-priced request: `doc` is its JSON body or, for a transcription,
    its form fields. Raises Unmeterable or Unpriced."""
    doc = doc or {}
    units = prices.units.get(provider) or UnitPrices()
    if rule == "images":
        # OpenAI's documented defaults: one standard 1024x1024 image of dall-e-2.
        model = doc.get("model", "dall-e-2")
        n, size, quality = doc.get("n", 1), doc.get("size", "1024x1024"), doc.get("quality")
        if not isinstance(model, str) or type(n) is not int or not 1 <= n <= 10:
            raise Unmeterable("`model` must be a string and `n` an integer from 1 to 10")
        quality = "standard" if quality is None else quality
        by_quality = units.images_per_image.get(model, {})
        price = None
        if isinstance(quality, str) and isinstance(size, str):
            price = by_quality.get(quality, {}).get(size)
        if price is None:
            priced = [f"{q} {s}" for q, sizes in by_quality.items() for s in sizes]
            raise Unpriced(
                f"no price for a {quality} {size} image of {provider}/{model}; priced: "
                f"{', '.join(priced) or 'none'}"
            )
        return Quote(model, "image", price, 1, most=n)
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise Unmeterable("the request must name its `model`")
    if rule == "input_tokens":
        found = units.embeddings_per_mtok.get(model)
        if found is None:
            raise Unpriced(f"no embeddings price for {provider}/{model}")
        # A token is at least one byte of the JSON body (a text's character, an id's digit).
        return Quote(model, "token", found, 1_000_000, most=body_bytes + PROMPT_MARGIN_TOKENS)
    if rule == "characters":
        text = doc.get("input")
        if not isinstance(text, str):
            raise Unmeterable("`input` must be the text to speak")
        found = units.speech_per_mchar.get(model)
        if found is None:
            raise Unpriced(f"no per-character speech price for {provider}/{model}")
        return Quote(model, "character", found, 1_000_000, most=len(text), fixed=True)
    if rule == "audio_seconds":
        found = units.transcription_per_minute.get(model)
        if found is None:
            raise Unpriced(f"no per-minute transcription price for {provider}/{model}")
        return Quote(model, "second", found, 60, most=audio_max_seconds)
    raise ValueError(f"{rule} is not priced per unit")


def served(quote: Quote, answer: dict[str, Any] | None, request_bytes: int) -> tuple[int, bool]:
    """The units to charge for a served call from its JSON answer (None: unread), and whether
    they are estimated. An answer that does not say is charged the most it could have been,
    except embeddings, estimated from the request's size like any token usage."""
    if quote.fixed:
        return quote.most, False
    answer = answer or {}
    found = answer.get("usage")
    usage: dict[str, Any] = found if isinstance(found, dict) else {}
    if quote.unit == "token":
        tokens = usage.get("prompt_tokens")
        if type(tokens) is int and tokens > 0:
            return tokens, False
        return max(1, math.ceil(request_bytes / BYTES_PER_TOKEN)), True
    if quote.unit == "image":
        data = answer.get("data")
        return (len(data), False) if isinstance(data, list) else (quote.most, True)
    # Transcription: `usage` of type duration, or verbose_json's `duration`; OpenAI bills
    # whisper rounded to the nearest second.
    seconds = usage.get("seconds") if usage.get("type") == "duration" else answer.get("duration")
    if (
        isinstance(seconds, int | float)
        and type(seconds) is not bool
        and math.isfinite(seconds)
        and seconds >= 0
    ):
        rounded = Decimal(str(seconds)).to_integral_value(ROUND_HALF_UP)
        return max(1, int(rounded)), False
    return quote.most, True
