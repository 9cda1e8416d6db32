"""Agents run headless with `-p PROMPT --output-format stream-json`: claude-code, qwen-code,
cursor-cli. Their stdout is one JSON event per line (`system`, `assistant`, `user`, …) ending
with a `result` event; it is written to `transcript.jsonl` and read back by `collect`.

All three are Node.js programs. V8 reserves about 10 GiB of address space for each
WebAssembly memory (its bounds checks trap on guard pages), so under the sandbox's RLIMIT_AS
Node's own HTTP client (undici's parser is WebAssembly) fails on its first request with
"Cannot allocate Wasm memory"; `--disable-wasm-trap-handler` (Node >= 20.15) checks bounds in
code instead.
"""

from __future__ import annotations

from typing import Any

from workers.agents.base import AgentOutcome, AgentRun, AgentUsage
from workers.agents.installed import InstalledAgent, add_usage, exit_cause, json_events

TRANSCRIPT = "transcript.jsonl"
API_ERROR = "[API Error"
NODE_OPTIONS = "--disable-wasm-trap-handler"


class HeadlessAgent(InstalledAgent):
    """An agent whose stdout is its stream-json transcript; subclasses give `agent_argv`."""

    def agent_argv(self, run: AgentRun) -> list[str]:
        raise NotImplementedError

    def env_prefix(self, run: AgentRun, **env: str) -> list[str]:
        return super().env_prefix(run, NODE_OPTIONS=NODE_OPTIONS, **env)

    def command(self, run: AgentRun) -> list[str]:
        # stdout to the transcript, stderr to the runner's agent.log.
        redirect = 'out="$1"; shift; exec "$@" > "$out"'
        return ["sh", "-c", redirect, "sh", str(run.artifacts / TRANSCRIPT), *self.agent_argv(run)]

    def collect(self, run: AgentRun, exit_code: int | None, timed_out: bool) -> AgentOutcome:
        transcript = run.artifacts / TRANSCRIPT
        events = json_events(transcript)
        usage, result = stream_usage(events)
        error = ""
        if result is not None and (
            result.get("is_error")
            or result.get("subtype") != "success"
            # qwen-code reports a failed model call as a successful answer with this text.
            or str(result.get("result", "")).startswith(API_ERROR)
        ):
            error = f"{result.get('subtype', '')}: {str(result.get('result', ''))[:300]}"
        cause = exit_cause(exit_code, timed_out, error)
        if error and cause == "finished":  # exit code 0, yet the agent says it failed
            cause = "crashed"
        if result is None:
            detail = f"no result event in {TRANSCRIPT}: the agent ended early"
        else:
            detail = f"{result.get('subtype', 'result')} after {result.get('num_turns', '?')} turns"
            if error:
                detail = error
        return AgentOutcome(
            exit_cause=cause,
            exit_code=exit_code,
            transcript=transcript,
            usage=usage,
            version=self.version(),
            detail=detail,
        )


def stream_usage(events: list[dict[str, Any]]) -> tuple[AgentUsage, dict[str, Any] | None]:
    """Model calls (distinct assistant message ids) and tokens, and the `result` event.

    A response with several content blocks arrives as several `assistant` events sharing one
    message id and usage; it is one call. The result's own `usage` total wins when present.
    """
    usage = AgentUsage()
    final = None
    seen: set[str] = set()
    for event in events:
        if event.get("type") == "result":
            final = event
        if event.get("type") != "assistant":
            continue
        message = event.get("message")
        message = message if isinstance(message, dict) else {}
        key = str(message.get("id") or f"#{len(seen)}")
        if key in seen or _text(message).startswith(API_ERROR):
            continue
        seen.add(key)
        usage.calls += 1
        add_usage(usage, message.get("usage"))
    if final is not None and isinstance(final.get("usage"), dict):
        total = AgentUsage(calls=usage.calls)
        add_usage(total, final["usage"])
        if total.total_tokens:
            usage = total
    return usage, final


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list) and content and isinstance(content[0], dict):
        return str(content[0].get("text") or "")
    return ""


def origin(endpoint: str) -> str:
    """`http://host:port` of an OpenAI-style `…/v1` base URL (Anthropic clients add `/v1`)."""
    return endpoint.rstrip("/").removesuffix("/v1")
