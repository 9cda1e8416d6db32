"""proxy.output_cap: one reading of a request's output cap (issue 18, finding 5)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.output_cap import output_cap


@pytest.mark.parametrize(
    ("api", "doc", "provider", "asked", "field"),
    [
        ("openai_completions", {"max_tokens": 16}, "local", 16, "max_tokens"),
        ("openai_completions", {"max_tokens": 0}, "local", None, "max_tokens"),
        ("openai_completions", {"max_tokens": -1}, "local", None, "max_tokens"),
        ("openai_completions", {"max_tokens": True}, "local", None, "max_tokens"),
        ("openai_completions", {"max_tokens": 2.5}, "local", None, "max_tokens"),
        ("openai_completions", {}, "local", None, "max_tokens"),
        ("openai_chat", {"max_completion_tokens": 9, "max_tokens": 99}, "openai", 9,
         "max_completion_tokens"),
        ("openai_chat", {"max_tokens": 7}, "openai", 7, "max_tokens"),
        ("openai_chat", {}, "openai", None, "max_completion_tokens"),
        ("openai_chat", {}, "local", None, "max_tokens"),
        ("openai_responses", {"max_output_tokens": 5, "max_tokens": 50}, "openai", 5,
         "max_output_tokens"),
        ("openai_responses", {"max_tokens": 50}, "openai", None, "max_output_tokens"),
        ("anthropic_messages", {"max_tokens": 1024}, "anthropic", 1024, "max_tokens"),
    ],
)  # fmt: skip
def test_each_api_names_its_cap(
    api: Any, doc: dict[str, Any], provider: str, asked: int | None, field: str
) -> None:
    cap = output_cap(api, doc, provider)
    assert (cap.asked, cap.field) == (asked, field)
