"""proxy.endpoints: each provider's declared endpoints and the unit prices of its calls
(issue 18, finding 3), in process; tests/security/test_provider_endpoints.py proves the wiring
through the real mitmdump."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from contracts.config import PriceCatalog, load_prices
from proxy.endpoints import (
    Quote,
    Unmeterable,
    Unpriced,
    endpoint_of,
    llm_api,
    quote,
    served,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def prices() -> PriceCatalog:
    return load_prices(CONFIGS)


@pytest.mark.parametrize(
    ("provider", "method", "path", "rule"),
    [
        ("openai", "POST", "/v1/chat/completions", "tokens"),
        ("openai", "POST", "/v1/embeddings", "input_tokens"),
        ("openai", "POST", "/v1/images/generations", "images"),
        ("openai", "POST", "/v1/audio/speech", "characters"),
        ("openai", "POST", "/v1/audio/transcriptions", "audio_seconds"),
        ("openai", "GET", "/v1/models", "free"),
        ("openai", "GET", "/v1/models/gpt-4o-mini", "free"),
        ("openai", "POST", "/v1/batches", "refused"),
        ("openai", "GET", "/v1/batches/batch_1", "refused"),
        ("openai", "GET", "/v1/files", "refused"),
        ("openai", "GET", "/v1/realtime", "refused"),
        ("openai", "POST", "/v1/realtime/client_secrets", "refused"),
        ("openai", "POST", "/v1/images/edits", "refused"),
        ("openai", "POST", "/v1/audio/translations", "refused"),
        ("openai", "POST", "/v1/assistants", None),
        ("openai", "GET", "/v1/embeddings", None),
        ("openai", "POST", "/v1/embeddings/", None),
        ("openai", "POST", "/v1/%65mbeddings", None),
        ("openai", "GET", "/v1/models/", None),
        ("openai", "POST", "/v1/messages/count_tokens", None),
        ("anthropic", "POST", "/v1/messages", "tokens"),
        ("anthropic", "POST", "/v1/messages/count_tokens", "free"),
        ("anthropic", "POST", "/v1/messages/batches", "refused"),
        ("anthropic", "GET", "/v1/messages/batches/msgbatch_1/results", "refused"),
        ("anthropic", "POST", "/v1/embeddings", None),
        ("gateway", "POST", "/v1/chat/completions", "tokens"),
        ("gateway", "POST", "/v1/embeddings", None),
    ],
)
def test_each_provider_declares_its_endpoints(
    provider: str, method: str, path: str, rule: str | None
) -> None:
    found = endpoint_of(provider, method, path)
    assert (found.rule if found else None) == rule


def test_the_llm_apis_are_known_whoever_serves_them() -> None:
    assert llm_api("POST", "/v1/responses") == "openai_responses"
    assert llm_api("POST", "/v1/embeddings") is None
    assert llm_api("GET", "/v1/chat/completions") is None


def test_images_cost_n_times_the_price_of_model_quality_and_size(prices: PriceCatalog) -> None:
    doc = {"model": "dall-e-3", "quality": "hd", "size": "1792x1024", "n": 1}
    hd = quote("images", "openai", doc, 0, prices, 1500)
    assert (hd.unit, hd.most, hd.most_usd) == ("image", 1, Decimal("0.12"))
    defaults = quote("images", "openai", {"prompt": "x", "n": 3}, 0, prices, 1500)
    assert (defaults.model, defaults.most_usd) == ("dall-e-2", Decimal("0.06"))
    assert served(defaults, {"data": [{"url": "a"}, {"url": "b"}]}, 0) == (2, False)
    assert served(defaults, None, 0) == (3, True), "an unread answer is charged the most"


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ({"model": "gpt-image-1", "quality": "low"}, Unpriced),
        ({"model": "dall-e-3", "size": "4096x4096"}, Unpriced),
        ({"model": "dall-e-3", "size": ["1024x1024"]}, Unpriced),
        ({"model": "dall-e-3", "quality": {"hd": 1}}, Unpriced),
        ({"model": "dall-e-3", "n": True}, Unmeterable),
        ({"model": "dall-e-2", "n": 11}, Unmeterable),
        ({"model": "dall-e-2", "n": 0}, Unmeterable),
        ({"model": 3}, Unmeterable),
    ],
)
def test_an_image_request_it_cannot_price_is_refused(
    prices: PriceCatalog, doc: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        quote("images", "openai", doc, 0, prices, 1500)


def test_speech_is_priced_per_input_character_before_the_call(prices: PriceCatalog) -> None:
    speech = quote("characters", "openai", {"model": "tts-1", "input": "é" * 200}, 0, prices, 1)
    assert (speech.most, speech.fixed, speech.most_usd) == (200, True, Decimal("0.003"))
    assert served(speech, None, 0) == (200, False)
    with pytest.raises(Unpriced):  # billed by audio tokens, not characters
        quote("characters", "openai", {"model": "gpt-4o-mini-tts", "input": "x"}, 0, prices, 1)
    with pytest.raises(Unmeterable):
        quote("characters", "openai", {"model": "tts-1", "input": ["x"]}, 0, prices, 1)


@pytest.mark.parametrize(
    ("answer", "units", "estimated"),
    [
        ({"text": "hi", "usage": {"type": "duration", "seconds": 7.4}}, 7, False),
        ({"text": "hi", "usage": {"type": "duration", "seconds": 7.5}}, 8, False),
        ({"text": "hi", "usage": {"type": "duration", "seconds": 0.2}}, 1, False),
        ({"text": "hi", "duration": 61.5}, 62, False),
        ({"text": "hi"}, 1500, True),
        ({"text": "hi", "duration": float("inf")}, 1500, True),
        ({"text": "hi", "duration": True}, 1500, True),
        ({"text": "hi", "usage": {"type": "tokens", "input_tokens": 9}}, 1500, True),
        (None, 1500, True),
    ],
)
def test_a_transcription_is_charged_by_the_second_it_reports(
    prices: PriceCatalog, answer: dict[str, Any] | None, units: int, estimated: bool
) -> None:
    whisper = quote("audio_seconds", "openai", {"model": "whisper-1"}, 0, prices, 1500)
    assert (whisper.unit, whisper.most, whisper.most_usd) == ("second", 1500, Decimal("0.15"))
    assert served(whisper, answer, 0) == (units, estimated)


def test_embeddings_reserve_the_body_size_and_charge_the_reported_tokens(
    prices: PriceCatalog,
) -> None:
    doc = {"model": "text-embedding-3-small", "input": "hello"}
    embedding = quote("input_tokens", "openai", doc, 60, prices, 1)
    assert (embedding.unit, embedding.most) == ("token", 60 + 64)
    assert embedding.cost_usd(1_000_000) == Decimal("0.02")
    assert served(embedding, {"usage": {"prompt_tokens": 3, "total_tokens": 3}}, 60) == (3, False)
    assert served(embedding, {"usage": {"prompt_tokens": 0}}, 60) == (15, True)
    with pytest.raises(Unpriced):
        quote("input_tokens", "openai", {"model": "gpt-4o-mini", "input": "x"}, 1, prices, 1)


def test_a_quote_keeps_the_price_as_configured() -> None:
    odd = Quote("m", "second", Decimal("0.007"), 60, most=60)
    assert odd.most_usd == Decimal("0.007") and odd.cost_usd(1) == Decimal("0.007") / 60


def test_every_configured_unit_price_can_be_quoted(prices: PriceCatalog) -> None:
    """Each model priced under `units:` in configs/prices.yaml is let through, never refused."""
    for provider, units in prices.units.items():
        for model in units.embeddings_per_mtok:
            quote("input_tokens", provider, {"model": model}, 10, prices, 1)
        for model, qualities in units.images_per_image.items():
            for quality, sizes in qualities.items():
                for size in sizes:
                    doc = {"model": model, "quality": quality, "size": size}
                    quote("images", provider, doc, 0, prices, 1)
        for model in units.speech_per_mchar:
            quote("characters", provider, {"model": model, "input": "x"}, 0, prices, 1)
        for model in units.transcription_per_minute:
            quote("audio_seconds", provider, {"model": model}, 0, prices, 1)
