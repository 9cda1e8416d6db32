"""Reasoning kept apart from the answer: a thinking model's `<think>…</think>` becomes its own part.

The text arrives in chunks as it is generated, and a tag may be split across chunks, so the
splitter holds back only what could still be the start of a tag. Only a think block at the very
start of the output counts (leading whitespace aside), as vLLM's `deepseek_r1` parser reads it; a
prompt that already ends in `<think>` (R1-style chat templates open it for the model) starts in
the reasoning. An unterminated block is all reasoning, as it is in vLLM.
"""

from __future__ import annotations

from typing import Literal

OPEN = "<think>"
CLOSE = "</think>"

Kind = Literal["reasoning", "content"]
Piece = tuple[Kind, str]


class ReasoningSplitter:
    """Feed the output text chunk by chunk; get back (kind, text) pieces without the tags."""

    def __init__(self, *, in_reasoning: bool = False) -> None:
        self._state: Literal["start", "reasoning", "after", "content"] = (
            "reasoning" if in_reasoning else "start"
        )
        self._held = ""

    def feed(self, text: str) -> list[Piece]:
        self._held += text
        pieces: list[Piece] = []
        while self._held:
            if self._state == "start":
                stripped = self._held.lstrip()
                if stripped.startswith(OPEN):
                    self._state, self._held = "reasoning", stripped[len(OPEN) :]
                elif not stripped or OPEN.startswith(stripped):
                    break  # whitespace, or a tag still arriving
                else:
                    self._state = "content"
            elif self._state == "reasoning":
                end = self._held.find(CLOSE)
                if end >= 0:
                    pieces.append(("reasoning", self._held[:end]))
                    self._state, self._held = "after", self._held[end + len(CLOSE) :]
                    continue
                keep = _partial_suffix(self._held, CLOSE)
                pieces.append(("reasoning", self._held[: len(self._held) - keep]))
                self._held = self._held[len(self._held) - keep :]
                break
            elif self._state == "after":
                # The separator after </think> belongs to neither part.
                self._held = self._held.lstrip()
                if self._held:
                    self._state = "content"
            else:
                pieces.append(("content", self._held))
                self._held = ""
        return [(kind, text) for kind, text in pieces if text]

    def finish(self) -> list[Piece]:
        """The end of the output: whatever was held back."""
        held, self._held = self._held, ""
        if not held:
            return []
        return [("reasoning" if self._state == "reasoning" else "content", held)]


def split(text: str, *, in_reasoning: bool = False) -> tuple[str | None, str]:
    """A whole output as (reasoning or None when there is none, content)."""
    splitter = ReasoningSplitter(in_reasoning=in_reasoning)
    parts: dict[Kind, str] = {"reasoning": "", "content": ""}
    for kind, piece in [*splitter.feed(text), *splitter.finish()]:
        parts[kind] += piece
    has_reasoning = in_reasoning or text.lstrip().startswith(OPEN)
    return (parts["reasoning"] if has_reasoning else None), parts["content"]


def opens_reasoning(prompt: str) -> bool:
    """Whether a rendered prompt leaves the model inside a think block (R1-style templates)."""
    return prompt.rstrip().endswith(OPEN)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
