"""What a call to a provider costs: provider from the destination, endpoint and its pricing
rule from `proxy.endpoints`, model from the request, usage from the response, price from
configs/prices.yaml.

An endpoint the provider's table does not meter is refused (403 `endpoint_not_metered`), and a
call whose price is unknown is refused (402 `unknown_price`), before either is forwarded (fail
closed). Calls priced per unit (embeddings, images, speech, transcription) are quoted from the
request (`proxy.endpoints.quote`) and charged from the answer (`served`). Event streams
and bodies of unknown length pass through chunk by chunk as they arrive, read on the way by a
`proxy.usage.UsageMeter`; other answers are read whole. A successful response without usage,
or a stream cut short, is charged by an estimate from its bytes, marked `estimated`, never zero;
so is one whose usage says it read 0 input tokens (an upstream that does not count). A cut
stream's output is the deltas that arrived, its input what the stream had reported or else the
request's size. An error answer (429, 529 overloaded, 5xx) is passed to the agent as the
provider sent it, `retry-after` included, and costs nothing; how an answer fell short (the
error the provider named, `stream_cut`, `no_response`) is kept for the record
(`upstream_error`), where the report counts it per provider.

The contract other addons rely on: once a flow is over — in the `response` and `error` hooks,
whichever addon runs first — `metered(flow)` holds its final usage and cost.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
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
from proxy.addons import providers
from proxy.addons.providers import Providers
from proxy.addons.providers import parse_provider_hosts as parse_provider_hosts
from proxy.addons.refusal import fail_closed, refuse, refused
from proxy.addresses import ModelPlane
from proxy.endpoints import (
    Endpoint,
    Quote,
    Unmeterable,
    Unpriced,
    allowed,
    endpoint_of,
    quote,
    served,
)
from proxy.endpoints import llm_api as api_of
from proxy.output_cap import output_cap
from proxy.usage import PARSE_LIMIT, Api, UsageMeter

log = logging.getLogger(__name__)

METADATA_KEY = "autovibe.metering"
BYTES_PER_TOKEN = 4
"""Rough size of a token on the wire, for responses that report no usage."""
AUDIO_MAX_SECONDS = 1500
"""Default of `autovibe_audio_max_seconds`: OpenAI's limit on the audio of one transcription
by its gpt-4o models (whisper-1 takes files of up to 25 MB)."""


@dataclass
class Metered:
    """Metering facts about one flow to a provider, left in `flow.metadata` for capture."""

    provider: str
    model: str | None = None
    endpoint: Endpoint | None = None
    """The provider's declared endpoint the request called, once let through."""
    api: Api | None = None
    quote: Quote | None = None
    """The price of a call metered per unit (images, characters, …); None for LLM calls."""
    response_id: str | None = None
    streamed: bool = False
    """The response passed through chunk by chunk, not read whole first."""
    usage_requested: bool = False
    """The proxy added `stream_options.include_usage` to the forwarded request."""
    usage: Usage | None = None
    cost_usd: Decimal = Decimal(0)
    prices: PriceCatalog | None = None
    """The catalogue that let the call through, so a reload mid-call cannot unprice it."""
    request_doc: dict[str, Any] | None = None
    """The request body as metering parsed it, and as it forwards it (with any
    `stream_options` it added); the budget addon, next in line, reads it instead of parsing
    the body again."""
    meter: UsageMeter | None = None
    first_chunk_at: float | None = None
    response_bytes: int = 0
    """Response body bytes as they travelled; for a streamed response, all that was seen."""
    problem: str | None = None
    """What went wrong reading the usage (malformed body, cut stream, …), for the record."""
    upstream_error: str | None = None
    """How the provider's answer fell short of a whole one (`upstream_error_of`), for the
    record and the report's count per provider."""
    final: bool = False
    """Usage and cost are settled: the flow is over."""


def metered(flow: http.HTTPFlow) -> Metered | None:
    """What metering learned about the flow; None when the destination is not a provider.

    Once the flow is over (answered or failed) the usage and cost in it are final, whichever
    addon asks first.
    """
    facts = flow.metadata.get(METADATA_KEY)
    if not isinstance(facts, Metered):
        return None
    if not facts.final and _is_over(flow):
        _settle(flow, facts)
    return facts


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
    """OpenAI usage and response id from a whole JSON or server-sent-events body."""
    meter = UsageMeter("openai_chat", content_type)
    meter.feed(body)
    meter.finish()
    return (meter.usage if meter.complete else None), meter.response_id


def estimate(
    request_bytes: int,
    response_bytes: int,
    known: Usage | None = None,
    events: int | None = None,
    max_tokens: int | None = None,
) -> Usage:
    """Tokens guessed from sizes, at least one each way so a call is never free.

    `known` is what a cut stream had already reported (Anthropic's input and cache tokens
    come first): those input counts are kept. The output of an event stream is its events
    that carried output (`events`, one token each: a server sends a delta per token; the
    envelope bytes would count ten times too many), that of a plain body its bytes; never
    above the request's `max_tokens`.
    """
    prompt = max(1, math.ceil(request_bytes / BYTES_PER_TOKEN))
    completion = events if events is not None else math.ceil(response_bytes / BYTES_PER_TOKEN)
    if max_tokens is not None and max_tokens > 0:
        completion = min(completion, max_tokens)
    completion = max(1, completion)
    cache_creation = cache_read = 0
    if known is not None and known.prompt_tokens > 0:
        prompt = known.prompt_tokens
        cache_creation, cache_read = known.cache_creation_tokens, known.cache_read_tokens
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        estimated=True,
        cache_creation_tokens=cache_creation,
        cache_read_tokens=cache_read,
    )


class Metering:
    def __init__(self) -> None:
        self.prices: PriceCatalog | None = None
        self.model_plane = ModelPlane(())
        self.providers = Providers()
        self.audio_max_seconds = AUDIO_MAX_SECONDS

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
        loader.add_option(
            name="autovibe_audio_max_seconds",
            typespec=int,
            default=AUDIO_MAX_SECONDS,
            help="Seconds of audio a transcription is reserved for (its length is known only "
            "from the answer); a longer one is charged in full when it settles.",
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
        if providers.OPTIONS & updated:
            # The same hosts get keys injected (injection) and are metered here.
            self.providers = providers.from_options()
        if "autovibe_audio_max_seconds" in updated:
            if ctx.options.autovibe_audio_max_seconds < 1:
                raise exceptions.OptionsError(
                    "autovibe_audio_max_seconds must be at least 1, got "
                    f"{ctx.options.autovibe_audio_max_seconds}"
                )
            self.audio_max_seconds = ctx.options.autovibe_audio_max_seconds
        if "autovibe_model_hosts" in updated:
            try:
                self.model_plane = ModelPlane(parse_model_hosts(ctx.options.autovibe_model_hosts))
            except ValueError as exc:
                raise exceptions.OptionsError(f"autovibe_model_hosts: {exc}") from exc

    def provider(self, host: str, port: int) -> str | None:
        host = host.lower()
        if self.model_plane.serves(host, port):
            return "local"
        return self.providers.at(host, port)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        provider = self.provider(flow.request.host, flow.request.port)
        if provider is None:
            return
        facts = Metered(provider=provider)
        flow.metadata[METADATA_KEY] = facts
        method = flow.request.method
        path = self.providers.api_path(provider, urlsplit(flow.request.path).path)
        endpoint = endpoint_of(provider, method, path)
        if provider == "local":
            # The model plane holds no key and is paid by the hour: only its LLM APIs count.
            if endpoint is None or endpoint.api is None:
                return
        elif endpoint is None or endpoint.rule == "refused":
            refuse(flow, 403, not_metered(provider, method, path, endpoint))
            return
        facts.endpoint = endpoint
        if endpoint.rule == "free":
            return
        if endpoint.api is None:
            self._quote(flow, facts, endpoint)
            return
        api = endpoint.api
        doc = _request_doc(flow.request.get_content(strict=False) or b"")
        model = doc.get("model") if doc is not None else None
        if not isinstance(model, str) or not model:
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
        facts.model, facts.api, facts.prices, facts.request_doc = model, api, self.prices, doc
        assert self.prices is not None and doc is not None
        if api == "openai_responses" and doc.get("background") is True:
            # Answered at once without usage; the tokens are generated, and billed, later.
            refusal = not_metered(provider, method, path, endpoint)
            refusal["detail"] = (
                "a background response is generated after its call has ended, outside any "
                "call the proxy sees, so it cannot be metered; send it without `background`"
            )
            refuse(flow, 403, refusal)
            return
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
            return
        if (
            self._sends_stream_usage(provider)
            and api in ("openai_chat", "openai_completions")
            and _ask_for_stream_usage(doc)
        ):
            flow.request.content = json.dumps(doc).encode()
            facts.usage_requested = True

    def _sends_stream_usage(self, provider: str) -> bool:
        """Whether the provider's chat/completions streams send usage when asked
        (`stream_options`): the model plane and the providers that speak OpenAI's format."""
        known = self.providers.of(provider)
        return provider == "local" or (known is not None and "openai" in known.wire)

    def _quote(self, flow: http.HTTPFlow, facts: Metered, endpoint: Endpoint) -> None:
        """Price a call metered per unit from its request, or refuse it."""
        assert self.prices is not None
        body = flow.request.get_content(strict=False) or b""
        form = endpoint.rule == "audio_seconds"
        doc = _form_fields(flow) if form else _request_doc(body)
        try:
            facts.quote = quote(
                endpoint.rule, facts.provider, doc, len(body), self.prices, self.audio_max_seconds
            )
        except Unmeterable as exc:
            refuse(flow, 400, {
                "error": "unmeterable_request",
                "endpoint": endpoint.name,
                "detail": f"{exc}; the proxy refuses what it cannot meter",
            })  # fmt: skip
            return
        except Unpriced as exc:
            model = doc.get("model") if doc is not None else None
            refuse(flow, 402, {
                "error": "unknown_price",
                "provider": facts.provider,
                "model": model if isinstance(model, str) else None,
                "detail": f"{exc} in prices.yaml; the proxy refuses what it cannot meter",
            })  # fmt: skip
            return
        facts.model, facts.prices = facts.quote.model, self.prices
        facts.request_doc = None if form else doc

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        facts = metered(flow)
        response = flow.response
        if facts is None or facts.model is None or refused(flow) or response is None:
            return
        if facts.quote is not None and facts.quote.fixed:
            # Its units are known from the request: the answer (audio) passes unread, counted.
            facts.streamed = True
            response.stream = _counted(facts)
            return
        content_type = response.headers.get("Content-Type", "")
        facts.meter = UsageMeter(
            facts.api, content_type, response.headers.get("Content-Encoding", "")
        )
        length = response.headers.get("Content-Length", "")
        if (
            content_type.lower().startswith("text/event-stream")
            or not length.isdigit()
            or int(length) > PARSE_LIMIT
        ):
            facts.streamed = True
            response.stream = _pass_through(flow, facts)

    def response(self, flow: http.HTTPFlow) -> None:
        metered(flow)  # settles the usage, if no addon before this one asked

    def error(self, flow: http.HTTPFlow) -> None:
        metered(flow)


def _pass_through(flow: http.HTTPFlow, facts: Metered) -> Callable[[bytes], bytes]:
    """The `response.stream` callable: each chunk goes on unchanged, read on the way.

    It holds the flow's id, not the flow: the flow holds it (`response.stream`), and a cycle
    would leave the whole flow to the garbage collector instead of reference counting."""
    meter, flow_id = facts.meter, flow.id
    assert meter is not None

    def chunk_seen(chunk: bytes) -> bytes:
        try:
            if chunk:
                if facts.first_chunk_at is None:
                    facts.first_chunk_at = time.time()
                meter.feed(chunk)
            else:  # the end of the body: settle before the response hook runs
                meter.finish()
        except Exception:
            # Reading usage must never cost the agent its answer; the estimate covers it.
            log.exception("metering failed on %s; the stream goes on unread", flow_id)
            facts.problem = facts.problem or "metering fault (see the proxy log)"
            meter.finish()
        return chunk

    return chunk_seen


def _counted(facts: Metered) -> Callable[[bytes], bytes]:
    """The `response.stream` callable of an answer passed on unread: it only counts bytes."""

    def chunk_seen(chunk: bytes) -> bytes:
        if chunk and facts.first_chunk_at is None:
            facts.first_chunk_at = time.time()
        facts.response_bytes += len(chunk)
        return chunk

    return chunk_seen


def _is_over(flow: http.HTTPFlow) -> bool:
    return flow.error is not None or (
        flow.response is not None and flow.response.timestamp_end is not None
    )


def upstream_error_of(flow: http.HTTPFlow, meter: UsageMeter | None) -> str | None:
    """How a provider's answer fell short of a whole one: the error it named (in an error
    answer or an error event of its stream: `rate_limit_error`, `overloaded_error`,
    `rate_limit_exceeded`, `server_error`, …), `http_<status>` for an error status that names
    none, `stream_cut` for an answer whose connection broke before its end, `no_response` when
    none came; None for a whole answer."""
    response = flow.response
    named = meter.upstream_error if meter is not None else None
    if response is None:
        return "no_response" if flow.error is not None else None
    if response.status_code >= 400:
        return named or f"http_{response.status_code}"
    if named is not None:
        return named
    return "stream_cut" if flow.error is not None else None


def _settle(flow: http.HTTPFlow, facts: Metered) -> None:
    facts.final = True
    if facts.model is None or refused(flow):
        return
    response, meter = flow.response, facts.meter
    if meter is not None:
        if not facts.streamed and response is not None and response.raw_content is not None:
            meter.feed(response.raw_content)
        meter.finish()
        facts.response_id = meter.response_id
        facts.response_bytes = meter.raw_bytes
        facts.problem = facts.problem or meter.problem
    facts.upstream_error = upstream_error_of(flow, meter)
    request_bytes = len(flow.request.raw_content or b"")
    if facts.quote is not None:
        _charge_units(flow, facts, facts.quote, request_bytes)
        return
    usage = meter.usage if meter is not None and meter.complete else None
    if usage is not None and usage.prompt_tokens <= 0:
        # No LLM call reads zero input tokens (the chat template alone is some): an upstream
        # that reports 0 does not count, and its call would be settled as free (litellm#37923).
        facts.problem = facts.problem or "upstream reported 0 input tokens; usage estimated"
        usage = None
    if usage is None:
        # A 2xx is an answer, even one cut short: charged for what it had generated.
        answered = response is not None and 200 <= response.status_code < 300
        # The request may have reached the provider before a failure: charge an estimate.
        reached = (
            response is None
            and flow.error is not None
            and flow.server_conn.timestamp_tcp_setup is not None
        )
        # A provider charges for answers, not for refusals: a 4xx/5xx without usage (429, 529
        # overloaded, 500), however it ended, is free.
        if answered or reached:
            seen = max(meter.raw_bytes, meter.decoded_bytes) if meter is not None else 0
            usage = estimate(
                request_bytes,
                seen,
                known=meter.usage if meter else None,
                events=meter.output_events if meter is not None and meter.events else None,
                max_tokens=(output_cap(facts.api, facts.request_doc).asked if facts.api else None),
            )
    _charge(facts, usage)


def _charge_units(flow: http.HTTPFlow, facts: Metered, quote: Quote, request_bytes: int) -> None:
    """Charge a call priced per unit for what its answer says was served."""
    response = flow.response
    answered = response is not None and 200 <= response.status_code < 300
    reached = flow.error is not None and flow.server_conn.timestamp_tcp_setup is not None
    if not (answered or reached):
        return  # a provider charges for answers, not for refusals
    meter = facts.meter
    answer = meter.document if meter is not None and answered else None
    units, estimated = served(quote, answer, request_bytes)
    unit = quote.unit
    if unit == "token":
        usage = Usage(prompt_tokens=units, total_tokens=units, estimated=estimated)
    else:
        usage = Usage(unit=unit, units=units, estimated=estimated)
    facts.usage, facts.cost_usd = usage, quote.cost_usd(units)


def _charge(facts: Metered, usage: Usage | None) -> None:
    facts.usage = usage
    if usage is None:
        return
    assert facts.prices is not None and facts.model is not None
    cost = facts.prices.cost_usd(
        facts.provider,
        facts.model,
        usage.prompt_tokens,
        usage.completion_tokens,
        cache_read=usage.cache_read_tokens,
        cache_write=usage.cache_creation_tokens,
    )
    assert cost is not None, "a call is only let through with a known price"
    facts.cost_usd = cost


def llm_api(flow: http.HTTPFlow) -> Api | None:
    """Which LLM API a request calls, or None when it is no LLM call."""
    return api_of(flow.request.method, urlsplit(flow.request.path).path)


def not_metered(provider: str, method: str, path: str, endpoint: Endpoint | None) -> dict[str, str]:
    """The body of the 403 for an endpoint the provider's table does not meter."""
    why = endpoint.why if endpoint is not None else "not declared"
    return {
        "error": "endpoint_not_metered",
        "provider": provider,
        "endpoint": f"{method} {path}",
        "detail": f"{method} {path} at {provider} has no pricing rule ({why}), so the proxy "
        f"refuses it and never sends the key with it; metered or free: {allowed(provider)}",
    }


def _form_fields(flow: http.HTTPFlow) -> dict[str, Any]:
    """The `model` of a multipart form (an audio upload), its file left undecoded."""
    model = flow.request.multipart_form.get(b"model")
    return {"model": model.decode("utf-8", "replace")} if isinstance(model, bytes) else {}


def _request_doc(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _ask_for_stream_usage(doc: dict[str, Any]) -> bool:
    """Add `stream_options.include_usage` to a streaming request that lacks it; True if added."""
    options = doc.get("stream_options")
    if doc.get("stream") is not True or not isinstance(options, dict | None):
        return False
    if options and options.get("include_usage"):
        return False
    doc["stream_options"] = {**(options or {}), "include_usage": True}
    return True
