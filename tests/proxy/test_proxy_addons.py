"""The addons inside mitmproxy's own addon test context: options, pricing and body parsing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow, tutils
from proxy_harness import PRICES_YAML

from contracts.config import load_prices
from contracts.records import Usage
from contracts.settings import PROJECT_ROOT
from proxy.addons.identity import Identity
from proxy.addons.metering import Metering, estimate, parse_model_hosts, usage_from_body
from proxy.usage import UsageMeter


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    (tmp_path / "prices.yaml").write_text(PRICES_YAML)
    return tmp_path


def llm_flow(model: str, host: str = "127.0.0.1", port: int = 8500) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request = tutils.treq(
        method=b"POST",
        host=host,
        port=port,
        path=b"/v1/chat/completions",
        content=json.dumps({"model": model, "messages": []}).encode(),
    )
    return flow


@pytest.mark.parametrize("value", ["nohost", "127.0.0.1:http", "127.0.0.1:70000", ":8500"])
def test_bad_model_hosts_are_refused_by_name(value: str, configs: Path) -> None:
    metering = Metering()
    with (
        taddons.context(metering) as ctx,
        pytest.raises(exceptions.OptionsError, match=re.escape(repr(value))),
    ):
        ctx.configure(metering, autovibe_configs=str(configs), autovibe_model_hosts=value)


def test_missing_or_invalid_prices_are_refused(tmp_path: Path) -> None:
    metering = Metering()
    with taddons.context(metering) as ctx:
        with pytest.raises(exceptions.OptionsError, match=r"no prices\.yaml"):
            ctx.configure(metering, autovibe_configs=str(tmp_path))
        (tmp_path / "prices.yaml").write_text("fx: {USD: '1'}\nlocal: {tiny: {hourly_usd: -1}}\n")
        with pytest.raises(exceptions.OptionsError, match=r"local\.tiny\.hourly_usd"):
            ctx.configure(metering, autovibe_configs=str(tmp_path))


def test_empty_data_root_is_refused(tmp_path: Path) -> None:
    identity = Identity()
    with taddons.context(identity) as ctx:
        ctx.configure(identity, autovibe_data=str(tmp_path))
        with pytest.raises(exceptions.OptionsError, match="autovibe_data"):
            ctx.configure(identity, autovibe_data=" ")
    assert identity.key is not None


def test_model_hosts_parse() -> None:
    assert parse_model_hosts("127.0.0.1:8500, Models.internal:80,") == {
        ("127.0.0.1", 8500),
        ("models.internal", 80),
    }
    assert parse_model_hosts("[::1]:8500") == {("::1", 8500)}


def test_every_configured_model_can_be_metered() -> None:
    """Each model priced in configs/prices.yaml is let through, never refused as unpriced."""
    configs = PROJECT_ROOT / "configs"
    catalog = load_prices(configs)
    metering = Metering()
    with taddons.context(metering) as ctx:
        ctx.configure(
            metering, autovibe_configs=str(configs), autovibe_model_hosts="127.0.0.1:8500"
        )
        models = [("127.0.0.1", 8500, name) for name in catalog.local]
        models += [
            (host, 443, model)
            for host, provider in (("api.openai.com", "openai"), ("api.anthropic.com", "anthropic"))
            for model in catalog.providers.get(provider, {})
        ]
        for host, port, model in models:
            flow = llm_flow(model, host, port)
            metering.request(flow)
            assert flow.response is None, (model, flow.response and flow.response.text)


def test_a_failing_check_refuses_instead_of_forwarding(configs: Path) -> None:
    metering = Metering()
    with taddons.context(metering) as ctx:
        ctx.configure(
            metering, autovibe_configs=str(configs), autovibe_model_hosts="127.0.0.1:8500"
        )
        metering.prices = None  # a broken catalogue: the check itself fails
        flow = llm_flow("tiny")
        metering.request(flow)
    assert flow.response is not None and flow.response.status_code == 500
    assert json.loads(flow.response.content or b"")["error"] == "proxy_fault"


def test_usage_is_read_from_json_and_events() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    body = json.dumps({"id": "chatcmpl-1", "usage": usage}).encode()
    assert usage_from_body("application/json", body) == (Usage.model_validate(usage), "chatcmpl-1")

    events = (
        b'data: {"id": "c-2", "usage": null}\n\n'
        b": keep-alive comment\n\n"
        b'data: {"id": "c-2", "choices": [], "usage": {"prompt_tokens": 5, '
        b'"completion_tokens": 6}}\r\n\r\n'
        b"data: [DONE]\n\n"
    )
    assert usage_from_body("text/event-stream; charset=utf-8", events) == (
        Usage(prompt_tokens=5, completion_tokens=6, total_tokens=11),
        "c-2",
    )
    assert usage_from_body("application/json", b"not json") == (None, None)
    assert usage_from_body("text/event-stream", b"data: [DONE]\n\n") == (None, None)


def test_estimate_is_never_zero() -> None:
    assert estimate(0, 0) == Usage(
        prompt_tokens=1, completion_tokens=1, total_tokens=2, estimated=True
    )
    assert estimate(9, 400).prompt_tokens == 3
    assert estimate(9, 400).completion_tokens == 100


def test_a_stream_without_usage_is_estimated_from_its_events_and_capped_by_max_tokens() -> None:
    # 32 deltas of a llama.cpp-style stream that reports no usage: ~250 bytes of envelope
    # each, so the bytes alone would say ~2000 tokens.
    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "tiny"}
    events = b"".join(
        b"data: "
        + json.dumps({**chunk, "choices": [{"index": 0, "delta": {"content": "tok"}}]}).encode()
        + b"\n\n"
        for _ in range(32)
    )
    meter = UsageMeter("openai_chat", "text/event-stream")
    meter.feed(events + b"data: [DONE]\n\n")
    meter.finish()
    assert not meter.complete and meter.output_events == 32
    assert estimate(400, meter.raw_bytes, events=meter.output_events).completion_tokens == 32
    assert estimate(400, meter.raw_bytes).completion_tokens > 500
    assert estimate(400, meter.raw_bytes, max_tokens=16).completion_tokens == 16
    assert estimate(400, 0, max_tokens=16).completion_tokens == 1
