"""What a call may be billed as input, for the budget's reservation: its body, and what the
body only points at.

A token is at least one byte of the JSON body, so the body's size (plus a margin) bounds the
input of a plain call. It does not bound what the provider adds from elsewhere or bills by
another measure:

- an image is billed by its pixels, not its bytes: each image part counts the documented
  most one image of the model's family can cost (`image_ceiling`), and an inline (base64)
  image's bytes are taken out of the body's count;
- a file or document by reference (file id, URL), or a PDF inline, is billed for its text and
  page images, which the request does not show: each counts the model's context window;
- the Responses API's `previous_response_id` and `conversation` prepend the earlier
  conversation: the input and output tokens of the response (or of the conversation's latest
  response) this proxy metered (`History`), else, when this proxy never saw it (another
  proxy's, or from before a restart), the context window; so does a stored prompt template.

No call is billed more input than its context holds: where the window is documented, the
estimate stops there. `InputEstimate.basis` says what went beyond the body, for the
reservation's note and the budget decision. The settle still charges the reported usage.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.usage import Api

PROMPT_MARGIN_TOKENS = 64
"""Added to the body's bytes: chat-template tokens, and the output cap the budget may write."""
HISTORY_SIZE = 50_000
"""Responses and conversations `History` remembers, the latest (about 200 bytes each, 10 MB in
all): a chain names the response just before it, minutes ago at most."""

# Context windows, from each provider's model pages as we last read them (2025; re-check):
# https://platform.openai.com/docs/models (gpt-4o, gpt-4o-mini: 128,000; gpt-4.1 family:
# 1,047,576; gpt-5 family: 400,000; o1, o3, o4-mini: 200,000) and
# https://docs.claude.com/en/docs/about-claude/models/overview (200,000; 1,000,000 for
# Sonnet 4 and 4.5 with the `context-1m-2025-08-07` beta header).
CONTEXT_WINDOWS: dict[str, int] = {
    "gpt-4o": 128_000,
    "gpt-4o-mini": 128_000,
    "gpt-4.1": 1_047_576,
    "gpt-5": 400_000,
    "o1": 200_000,
    "o3": 200_000,
    "o4-mini": 200_000,
    "claude": 200_000,
}
"""Documented context window by model family (the longest matching prefix wins)."""
CLAUDE_LONG_CONTEXT = 1_000_000
"""Claude's window when the request asks for the 1M-token beta (`anthropic-beta: context-1m-…`)."""
DEFAULT_CONTEXT_TOKENS = 1_048_576
"""The window of a model none of the above documents: 2**20, above the largest listed."""

# The most one image can cost, per model family. OpenAI
# (https://platform.openai.com/docs/guides/images-vision#calculating-costs): tile models fit an
# image in 2048x2048, scale its short side down to 768 and charge base + tiles x per-tile, at
# most 4 x 2 tiles of 512 px (2048x768); patch models charge 32-px patches, at most 1,536,
# times a multiplier. Anthropic (https://docs.claude.com/en/docs/build-with-claude/vision
# #evaluate-image-size): an image above ~1,600 tokens (1.15 megapixels) is scaled down first.
IMAGE_CEILINGS: dict[str, int] = {
    "gpt-4o": 85 + 8 * 170,
    "gpt-4.1": 85 + 8 * 170,
    "gpt-4.5": 85 + 8 * 170,
    "gpt-4o-mini": 2_833 + 8 * 5_667,
    "gpt-5": 70 + 8 * 140,  # also gpt-5-chat-latest
    "o1": 75 + 8 * 150,  # also o1-pro
    "o3": 75 + 8 * 150,
    "computer-use-preview": 65 + 8 * 129,
    "gpt-4.1-mini": 2_489,  # 1,536 patches x 1.62, rounded up
    "gpt-5-mini": 2_489,
    "gpt-4.1-nano": 3_779,  # x 2.46
    "gpt-5-nano": 3_779,
    "o4-mini": 2_642,  # x 1.72
    "claude": 1_600,
}
"""Documented most tokens per image by model family (the longest matching prefix wins)."""
DEFAULT_IMAGE_CEILING = max(IMAGE_CEILINGS.values())
"""An image to a model of no listed family (a gateway's, the local plane's): the most any
listed family charges."""


@dataclass(frozen=True)
class Window:
    """A model's context window in tokens, and whether a provider documents it."""

    tokens: int
    documented: bool


@dataclass(frozen=True)
class InputEstimate:
    tokens: int
    """The most input tokens the call may be billed for."""
    basis: tuple[str, ...] = ()
    """What was counted beyond the body, one phrase each; empty for a plain call."""

    @property
    def note(self) -> str | None:
        return "; ".join(self.basis) or None


class History:
    """Input + output tokens of the Responses API calls this proxy metered, by response id and
    by conversation: the earlier conversation a later call prepends. Bounded: the oldest go."""

    def __init__(self, size: int = HISTORY_SIZE) -> None:
        self.size = size
        self._tokens: OrderedDict[str, int] = OrderedDict()

    def remember(self, key: str, tokens: int) -> None:
        self._tokens[key] = tokens
        self._tokens.move_to_end(key)
        while len(self._tokens) > self.size:
            self._tokens.popitem(last=False)

    def recall(self, key: str) -> int | None:
        return self._tokens.get(key)


def conversation_key(doc: Mapping[str, Any] | None) -> str | None:
    """The `History` key of a Responses request's `conversation` (an id, or `{"id": …}`)."""
    value = (doc or {}).get("conversation")
    if isinstance(value, dict):
        value = value.get("id")
    return f"conversation:{value}" if isinstance(value, str) and value else None


def _family(table: Mapping[str, int], model: str) -> str | None:
    """The longest prefix of `model` (a gateway's `vendor/` taken off) in `table`; a prefix
    matches the whole name or up to a `-` (a date, a size) or `:`."""
    name = model.rpartition("/")[2].lower()
    found = [
        prefix
        for prefix in table
        if name == prefix or (name.startswith(prefix) and name[len(prefix)] in "-:")
    ]
    return max(found, key=len) if found else None


def context_window(
    provider: str, model: str, local: Mapping[str, int], *, anthropic_beta: str = ""
) -> Window:
    """The model's context window: models.yaml's for the local plane (`local`, by served
    name), the documented one of its family otherwise, else DEFAULT_CONTEXT_TOKENS."""
    if provider == "local":
        served = local.get(model)
        return Window(served, True) if served else Window(DEFAULT_CONTEXT_TOKENS, False)
    family = _family(CONTEXT_WINDOWS, model)
    if family is None:
        return Window(DEFAULT_CONTEXT_TOKENS, False)
    if family == "claude" and "context-1m" in anthropic_beta:
        return Window(CLAUDE_LONG_CONTEXT, True)
    return Window(CONTEXT_WINDOWS[family], True)


def image_ceiling(model: str) -> int:
    """The most input tokens one image to `model` may cost."""
    family = _family(IMAGE_CEILINGS, model)
    return DEFAULT_IMAGE_CEILING if family is None else IMAGE_CEILINGS[family]


def estimate_input(
    api: Api,
    model: str,
    doc: Mapping[str, Any] | None,
    body_bytes: int,
    window: Window,
    history: History,
) -> InputEstimate:
    """The most input tokens a call may be billed for (see the module's docstring)."""
    doc = doc or {}
    images = files = inline = 0
    for kind, size in _media(doc):
        inline += size
        if kind == "image":
            images += 1
        else:
            files += 1
    tokens = max(0, body_bytes - inline) + PROMPT_MARGIN_TOKENS
    basis = []
    if images:
        each = image_ceiling(model)
        tokens += images * each
        basis.append(f"{images} image(s) at {each} tokens each")
    if files:
        tokens += files * window.tokens
        basis.append(f"{files} file(s) by reference or PDF at the {window.tokens}-token context")
    if api == "openai_responses":
        earlier = [("previous_response_id", doc.get("previous_response_id"))]
        conversation = conversation_key(doc)
        if conversation is not None:
            earlier.append(("conversation", conversation))
        for field, key in earlier:
            if not isinstance(key, str) or not key:
                continue
            shown = _short(key.removeprefix("conversation:"))
            seen = history.recall(key)
            if seen is not None:
                tokens += seen
                basis.append(f"{field} {shown}: {seen} tokens as metered here")
            else:
                tokens += window.tokens
                basis.append(
                    f"{field} {shown} not seen here: the {window.tokens}-token context window"
                )
        prompt = doc.get("prompt")
        if isinstance(prompt, dict) and isinstance(prompt.get("id"), str):
            tokens += window.tokens
            basis.append(
                f"prompt template {_short(prompt['id'])}: the {window.tokens}-token context window"
            )
    if window.documented and tokens > window.tokens:
        tokens = window.tokens
        basis.append(f"capped at the {window.tokens}-token context window of {_short(model)}")
    return InputEstimate(tokens, tuple(basis))


CONTENT_KEYS = ("messages", "input", "content", "output", "source")
"""Where a provider reads content parts: chat and Messages `messages`, Responses `input`, a
message's `content`, a tool result's `output` (Responses) or `content` (Messages), a
document's `source`. Parts anywhere else (a tool's schema, metadata) are text to the model,
counted by their bytes."""


def _media(doc: Mapping[str, Any]) -> Iterator[tuple[str, int]]:
    """(`image` or `file`, its inline bytes in the body) for each media part of a request."""
    stack: list[Any] = [doc.get("messages"), doc.get("input")]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            found = _medium(node)
            if found is not None:
                yield found
            stack.extend(node[key] for key in CONTENT_KEYS if key in node)


def _medium(part: dict[str, Any]) -> tuple[str, int] | None:
    """What one content part is: an image or a file, and its inline bytes; None: neither."""
    kind = part.get("type")
    if kind in ("image_url", "input_image"):  # chat completions, Responses
        url = part.get("image_url")
        if isinstance(url, dict):
            url = url.get("url")
        return "image", _inline(url) if isinstance(url, str) and url.startswith("data:") else 0
    if kind == "file" or kind == "input_file":  # chat completions, Responses
        file = part.get("file") if kind == "file" else part
        data = file.get("file_data") if isinstance(file, dict) else None
        return "file", _inline(data)
    source = part.get("source")
    if kind not in ("image", "document") or not isinstance(source, dict):
        return None
    inline = _inline(source.get("data")) if source.get("type") == "base64" else 0
    if kind == "image":  # Messages: base64, url or file
        return "image", inline
    if source.get("type") in ("text", "content"):
        return None  # a plain-text document is counted by its bytes, its parts where they are
    return "file", inline  # a PDF: base64, url or file


def _inline(value: object) -> int:
    """Characters of an inline payload: at most the bytes it takes in the JSON body."""
    return len(value) if isinstance(value, str) else 0


def _short(text: str) -> str:
    """An id a client chose, cut to a length a note can carry."""
    return text[:64]
