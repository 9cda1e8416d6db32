"""What an LLM call costs: provider from the destination, model from the request, usage from
the response, price from configs/prices.yaml.

A call whose price is unknown is refused before it is forwarded (fail closed). A successful
response without usage is charged by an estimate from its bytes, marked `estimated`, never zero.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from contracts.config import ConfigError, PriceCatalog, load_prices
from contracts.records import Usage
from contracts.settings import Settings
from proxy.addons.refusal import fail_closed, refuse, refused

METADATA_KEY = "autovibe.metering"
LLM_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
CLOUD_HOSTS = {"api.openai.com": "openai", "api.anthropic.com": "anthropic"}
BYTES_PER_TOKEN = 4
"""Rough size of a token on the wire, for responses that report no usage."""


@dataclass
class Metered:
    """Metering facts about one flow to a provider, left in `flow.metadata` for capture."""

    provider: str
    model: str | None = None
    response_id: str | None = None
    streamed: bool = False
    usage: Usage | None = None
    cost_usd: Decimal = Decimal(0)
    prices: PriceCatalog | None = None
    """The catalogue that let the call through, so a reload mid-call cannot unprice it."""


def metered(flow: http.HTTPFlow) -> Metered | None:
    """What metering learned about the flow; None when the destination is not a provider."""
    facts = flow.metadata.get(METADATA_KEY)
    return facts if isinstance(facts, Metered) else None


def parse_model_hosts(value: str) -> frozenset[tuple[str, int]]:
    """`host:port,host:port` → {(host, port)}; raises ValueError naming the bad entry."""
    hosts = set()
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{entry!r} is not host:port")
        hosts.add((host.strip("[]").lower(), int(port)))
    return frozenset(hosts)


def usage_from_body(content_type: str, body: bytes) -> tuple[Usage | None, str | None]:
    """OpenAI usage and response id from a JSON or server-sent-events body, where present."""
    if content_type.startswith("text/event-stream"):
        return _usage_from_events(body)
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None
    if not isinstance(doc, dict):
        return None, None
    return _usage(doc.get("usage")), _id(doc)


def _usage_from_events(body: bytes) -> tuple[Usage | None, str | None]:
    usage: Usage | None = None
    response_id: str | None = None
    for raw in body.decode("utf-8", errors="replace").splitlines():
        line = raw.strip()
        if not line.startswith("data:"):
            continue
        payload = line.removeprefix("data:").strip()
        if payload == "[DONE]":
            break
        try:
            chunk = json.loads(payload)
        except ValueError:
            continue
        if not isinstance(chunk, dict):
            continue
        response_id = response_id or _id(chunk)
        # With stream_options.include_usage the last chunk carries the usage; others say null.
        usage = _usage(chunk.get("usage")) or usage
    return usage, response_id


def _usage(value: Any) -> Usage | None:
    if not isinstance(value, dict):
        return None
    prompt, completion = value.get("prompt_tokens"), value.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    total = value.get("total_tokens")
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total if isinstance(total, int) else prompt + completion,
    )


def _id(doc: dict[str, Any]) -> str | None:
    value = doc.get("id")
    return value if isinstance(value, str) else None


def estimate(request_bytes: int, response_bytes: int) -> Usage:
    """Tokens guessed from sizes, at least one each way so a call is never free."""
    prompt = max(1, math.ceil(request_bytes / BYTES_PER_TOKEN))
    completion = max(1, math.ceil(response_bytes / BYTES_PER_TOKEN))
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        estimated=True,
    )


class Metering:
    def __init__(self) -> None:
        self.prices: PriceCatalog | None = None
        self.model_hosts: frozenset[tuple[str, int]] = frozenset()

    def load(self, loader: Loader) -> None:
        defaults = Settings.model_fields
        loader.add_option(
            name="autovibe_configs",
            typespec=str,
            default=str(defaults["configs"].default),
            help="Folder holding prices.yaml; LLM calls whose model has no price are refused.",
        )
        loader.add_option(
            name="autovibe_model_hosts",
            typespec=str,
            default=f"{defaults['host'].default}:{defaults['model_port'].default}",
            help="Comma-separated host:port of the local model plane; calls there are "
            "metered as provider `local`.",
        )

    def configure(self, updated: set[str]) -> None:
        if "autovibe_configs" in updated:
            configs = Path(ctx.options.autovibe_configs)
            if not (configs / "prices.yaml").is_file():
                raise exceptions.OptionsError(
                    f"autovibe_configs: no prices.yaml in {str(configs)!r}"
                )
            try:
                self.prices = load_prices(configs)
            except ConfigError as exc:
                raise exceptions.OptionsError(f"autovibe_configs: {exc}") from exc
        if "autovibe_model_hosts" in updated:
            try:
                self.model_hosts = parse_model_hosts(ctx.options.autovibe_model_hosts)
            except ValueError as exc:
                raise exceptions.OptionsError(f"autovibe_model_hosts: {exc}") from exc

    def provider(self, host: str, port: int) -> str | None:
        host = host.lower()
        if (host, port) in self.model_hosts:
            return "local"
        return CLOUD_HOSTS.get(host)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        provider = self.provider(flow.request.host, flow.request.port)
        if provider is None:
            return
        facts = Metered(provider=provider)
        flow.metadata[METADATA_KEY] = facts
        if not is_llm_call(flow):
            return
        model = _requested_model(flow.request.get_content(strict=False) or b"")
        if model is None:
            refuse(
                flow,
                400,
                {
                    "error": "no_model",
                    "detail": "an LLM request must be a JSON object naming its `model`; "
                    "the proxy refuses what it cannot meter",
                },
            )
            return
        facts.model, facts.prices = model, self.prices
        assert self.prices is not None
        if self.prices.price(provider, model) is None:
            refuse(
                flow,
                402,
                {
                    "error": "unknown_price",
                    "provider": provider,
                    "model": model,
                    "detail": f"no price for {provider}/{model} in prices.yaml; "
                    "the proxy refuses what it cannot meter",
                },
            )

    def response(self, flow: http.HTTPFlow) -> None:
        facts = metered(flow)
        if facts is None or facts.model is None or refused(flow) or flow.response is None:
            return
        content_type = flow.response.headers.get("Content-Type", "")
        body = flow.response.get_content(strict=False) or b""
        facts.streamed = content_type.startswith("text/event-stream")
        usage, facts.response_id = usage_from_body(content_type, body)
        # A provider charges for answers, not for refusals: only a 2xx without usage is estimated.
        if usage is None and 200 <= flow.response.status_code < 300:
            usage = estimate(len(flow.request.raw_content or b""), len(body))
        _charge(facts, usage)

    def error(self, flow: http.HTTPFlow) -> None:
        facts = metered(flow)
        if facts is None or facts.model is None or refused(flow) or facts.usage is not None:
            return
        # The request may have reached the provider before the failure: charge an estimate.
        if flow.server_conn.timestamp_tcp_setup is not None:
            received = flow.response.raw_content if flow.response is not None else None
            sizes = len(flow.request.raw_content or b""), len(received or b"")
            _charge(facts, estimate(*sizes))


def _charge(facts: Metered, usage: Usage | None) -> None:
    facts.usage = usage
    if usage is None:
        return
    assert facts.prices is not None and facts.model is not None
    cost = facts.prices.cost_usd(
        facts.provider, facts.model, usage.prompt_tokens, usage.completion_tokens
    )
    assert cost is not None, "a call is only let through with a known price"
    facts.cost_usd = cost


def is_llm_call(flow: http.HTTPFlow) -> bool:
    return flow.request.method == "POST" and urlsplit(flow.request.path).path in LLM_PATHS


def _requested_model(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    model = doc.get("model") if isinstance(doc, dict) else None
    return model if isinstance(model, str) and model else None
