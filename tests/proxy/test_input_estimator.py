"""The input a call may be billed for, in process (`proxy.input_estimate`); the wiring into the
budget's reservation is tested through the real mitmdump in tests/security/test_input_estimates.py.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.input_estimate import (
    DEFAULT_CONTEXT_TOKENS,
    DEFAULT_IMAGE_CEILING,
    PROMPT_MARGIN_TOKENS,
    History,
    InputEstimate,
    Window,
    context_window,
    estimate_input,
    image_ceiling,
)
from proxy.usage import Api

MINI = Window(128_000, True)
PIXELS = "data:image/png;base64," + "iVBORw0KGgo" * 5_000


def estimate(
    api: Api, doc: dict[str, Any], window: Window = MINI, history: History | None = None
) -> tuple[InputEstimate, int]:
    body = json.dumps(doc).encode()
    found = estimate_input(api, "gpt-4o-mini", doc, len(body), window, history or History())
    return found, len(body)


def test_a_plain_call_counts_its_body_bytes_and_says_nothing() -> None:
    found, size = estimate("openai_chat", {"messages": [{"role": "user", "content": "hi"}]})
    assert found.tokens == size + PROMPT_MARGIN_TOKENS
    assert found.note is None


def test_images_count_the_family_ceiling_instead_of_their_bytes() -> None:
    parts = [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "image_url", "image_url": {"url": PIXELS, "detail": "high"}},
    ]
    found, size = estimate("openai_chat", {"messages": [{"role": "user", "content": parts}]})
    assert found.tokens == size - len(PIXELS) + PROMPT_MARGIN_TOKENS + 2 * (2_833 + 8 * 5_667)
    assert found.note == "2 image(s) at 48169 tokens each"


def test_images_of_every_api_are_found_where_the_provider_reads_them() -> None:
    responses = {
        "input": [
            {"role": "user", "content": [{"type": "input_image", "image_url": PIXELS}]},
            {"type": "function_call_output", "call_id": "c1",
             "output": [{"type": "input_image", "file_id": "file-1"}]},
        ]
    }  # fmt: skip
    found, size = estimate("openai_responses", responses)
    assert found.tokens == size - len(PIXELS) + PROMPT_MARGIN_TOKENS + 2 * 48_169
    anthropic = {
        "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": PIXELS[22:]}},
            {"type": "tool_result", "tool_use_id": "t1", "content": [
                {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
        ]}]
    }  # fmt: skip
    body = json.dumps(anthropic).encode()
    found = estimate_input(
        "anthropic_messages", "claude-sonnet-4-5", anthropic, len(body), Window(200_000, True),
        History(),
    )  # fmt: skip
    assert found.tokens == len(body) - len(PIXELS[22:]) + PROMPT_MARGIN_TOKENS + 2 * 1_600


def test_an_image_part_outside_the_content_is_text_counted_by_its_bytes() -> None:
    # A hostile body hides a large "image" in a tool's schema, which the provider reads as
    # text: its bytes must stay counted.
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "image_url", "image_url": {"url": PIXELS}}}}  # fmt: skip
    found, size = estimate("openai_chat", {"messages": [], "tools": [tool]})
    assert found.tokens == size + PROMPT_MARGIN_TOKENS


def test_files_by_reference_and_pdfs_count_the_context_window() -> None:
    by_id = {"messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "file-abc"}}]}]}  # fmt: skip
    found, _ = estimate("openai_chat", by_id)
    assert found.tokens == 128_000
    assert "capped at the 128000-token context window" in (found.note or "")
    unknown = Window(DEFAULT_CONTEXT_TOKENS, False)
    found, size = estimate("openai_chat", by_id, unknown)
    assert found.tokens == size + PROMPT_MARGIN_TOKENS + DEFAULT_CONTEXT_TOKENS
    text = {"messages": [{"role": "user", "content": [{"type": "document", "source": {
        "type": "text", "media_type": "text/plain", "data": "plain words"}}]}]}  # fmt: skip
    found, size = estimate("anthropic_messages", text)
    assert found.tokens == size + PROMPT_MARGIN_TOKENS, "inline text is counted by its bytes"
    pdf = {"messages": [{"role": "user", "content": [{"type": "document", "source": {
        "type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}}]}]}  # fmt: skip
    found, _ = estimate("anthropic_messages", pdf)
    assert found.tokens == 128_000


def test_a_known_previous_response_counts_its_metered_tokens() -> None:
    history = History()
    history.remember("resp_1", 1_234)
    doc = {"input": "next", "previous_response_id": "resp_1"}
    found, size = estimate("openai_responses", doc, history=history)
    assert found.tokens == size + PROMPT_MARGIN_TOKENS + 1_234
    assert found.note == "previous_response_id resp_1: 1234 tokens as metered here"


def test_an_unknown_previous_response_or_conversation_counts_the_context_window() -> None:
    doc = {"input": "next", "previous_response_id": "resp_elsewhere"}
    found, _ = estimate("openai_responses", doc)
    assert found.tokens == 128_000
    assert found.note is not None and "resp_elsewhere not seen here" in found.note
    found, size = estimate("openai_responses", doc, Window(DEFAULT_CONTEXT_TOKENS, False))
    assert found.tokens == size + PROMPT_MARGIN_TOKENS + DEFAULT_CONTEXT_TOKENS
    history = History()
    history.remember("conversation:conv_1", 500)
    for conversation in ("conv_1", {"id": "conv_1"}):
        found, size = estimate("openai_responses", {"conversation": conversation}, MINI, history)
        assert found.tokens == size + PROMPT_MARGIN_TOKENS + 500
    found, _ = estimate("openai_responses", {"conversation": "conv_2"}, MINI, history)
    assert found.tokens == 128_000
    template = {"prompt": {"id": "pmpt_1", "version": "2"}}
    found, _ = estimate("openai_responses", template)
    assert found.tokens == 128_000


def test_previous_response_id_means_nothing_to_chat() -> None:
    found, size = estimate("openai_chat", {"messages": [], "previous_response_id": "resp_x"})
    assert found.tokens == size + PROMPT_MARGIN_TOKENS


def test_history_keeps_only_the_latest() -> None:
    history = History(size=2)
    for n in range(3):
        history.remember(f"resp_{n}", n)
    assert history.recall("resp_0") is None
    assert (history.recall("resp_1"), history.recall("resp_2")) == (1, 2)


def test_context_windows_and_image_ceilings_by_family() -> None:
    local = {"tiny": 8192}
    assert context_window("local", "tiny", local) == Window(8192, True)
    assert context_window("local", "other", local) == Window(DEFAULT_CONTEXT_TOKENS, False)
    assert context_window("openai", "gpt-4o-mini-2024-07-18", {}) == Window(128_000, True)
    assert context_window("openai", "gpt-4.1-nano", {}) == Window(1_047_576, True)
    assert context_window("openrouter", "openai/gpt-5-mini", {}) == Window(400_000, True)
    assert context_window("anthropic", "claude-haiku-4-5", {}) == Window(200_000, True)
    long = context_window(
        "anthropic", "claude-sonnet-4-5", {}, anthropic_beta="context-1m-2025-08-07"
    )
    assert long == Window(1_000_000, True)
    assert context_window("deepseek", "deepseek-chat", {}).documented is False
    assert image_ceiling("gpt-4o") == 1_445
    assert image_ceiling("gpt-4.1-mini") == 2_489  # the patch family, not gpt-4.1's tiles
    assert image_ceiling("o4-mini") == 2_642
    assert image_ceiling("claude-sonnet-4-5") == 1_600
    assert image_ceiling("tiny") == DEFAULT_IMAGE_CEILING == 48_169
