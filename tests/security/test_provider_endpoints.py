"""Every request to a provider is metered or refused, and the provider's key goes only with what
the proxy meters, only over TLS to the public providers (issue 18, finding 3), through the real
mitmdump with a machine credential.

Before, every request to a provider host got the real key: embeddings, images, audio,
batches and files were billed to the organisation while the counters stayed at 0, and a
plain-HTTP request to a provider's host carried the key in the clear. Now each provider
declares its endpoints (`proxy/endpoints.py`): embeddings, image generation, speech and
transcription are reserved before and charged exactly after; batches, files, the realtime API
and whatever is not declared are refused before the key goes in. The stand-ins speak OpenAI's
and Anthropic's wire formats and remember every request with its headers.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "workers"))
from proxy_harness import PRICES_YAML, Proxy, Upstream, _Handler, metering_proxy, serve
from worker_harness import settled_counters

from contracts.records import FlowRecord

KEY = "sk-real-provider-key-for-endpoint-tests"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
UNIT_PRICES = """\
units:
  openai:
    embeddings_per_mtok: {text-embedding-3-small: "400"}
    images_per_image:
      dall-e-3: {standard: {1024x1024: "0.04"}, hd: {1024x1792: "0.12"}}
      dall-e-2: {standard: {512x512: "0.018", 1024x1024: "0.02"}}
    speech_per_mchar: {tts-1: "15.00"}
    transcription_per_minute: {whisper-1: "0.006"}
"""
"""The tests' own unit prices (embeddings at 400 USD per million tokens, so that the few tokens
of a test cost whole micro-units)."""
EMBEDDING_TOKENS = 25
SPEECH = b"ID3" + bytes(range(256)) * 40
"""What the stand-in answers a speech request with: audio bytes, passed on unread."""
AUDIO_MAX_SECONDS = 1500


class _Provider(_Handler):
    """OpenAI's (and, on its own port, Anthropic's) wire formats, as a test needs them."""

    def do_GET(self) -> None:
        self._remember(b"")
        self._json({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._remember(body)
        path = self.path.partition("?")[0]
        if path == "/v1/audio/transcriptions":
            if b"verbose_json" in body:
                self._json({"task": "transcribe", "text": "hello", "duration": 61.5})
            elif b'name="response_format"\r\n\r\ntext' in body:
                self._send(200, "text/plain", b"hello\n")
            else:
                self._json({"text": "hello", "usage": {"type": "duration", "seconds": 7.4}})
            return
        if path == "/v1/audio/speech":
            self._send(200, "audio/mpeg", SPEECH)
            return
        doc = json.loads(body)
        if path == "/v1/embeddings":
            usage = {"prompt_tokens": EMBEDDING_TOKENS, "total_tokens": EMBEDDING_TOKENS}
            vector = {"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 0.3]}
            self._json({"object": "list", "data": [vector], "model": doc["model"], "usage": usage})
        elif path == "/v1/images/generations":
            if "fail" in doc["prompt"]:
                self._json({"error": {"type": "server_error"}}, status=500)
                return
            # "fewer": the provider made one image less than asked (a safety filter).
            made = doc.get("n", 1) - ("fewer" in doc["prompt"])
            self._json(
                {"created": 1, "data": [{"url": f"https://img/{i}.png"} for i in range(made)]}
            )
        elif path == "/v1/chat/completions":
            usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
            self._json({"id": "chatcmpl-1", "choices": [{"message": {}}], "usage": usage})
        else:
            self._json({"id": "reached", "object": path})

    def _remember(self, body: bytes) -> None:
        self.upstream.seen.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
        )

    def _json(self, doc: dict[str, Any], status: int = 200) -> None:
        self._send(status, "application/json", json.dumps(doc).encode())


def _serve() -> Iterator[Upstream]:
    yield from serve(_Provider)


@pytest.fixture(scope="module")
def provider() -> Iterator[Upstream]:
    """An OpenAI stand-in the proxy knows as provider `openai` (autovibe_provider_hosts)."""
    yield from _serve()


@pytest.fixture(scope="module")
def anthropic() -> Iterator[Upstream]:
    yield from _serve()


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, provider: Upstream, anthropic: Upstream
) -> Iterator[Proxy]:
    configs = tmp_path_factory.mktemp("unit-prices")
    (configs / "prices.yaml").write_text(PRICES_YAML + UNIT_PRICES)
    hosts = (
        f"autovibe_provider_hosts=127.0.0.1:{provider.port}=openai,"
        f"127.0.0.1:{anthropic.port}=anthropic"
    )
    yield from metering_proxy(
        tmp_path_factory,
        1,
        "--set",
        hosts,
        "--set",
        f"autovibe_audio_max_seconds={AUDIO_MAX_SECONDS}",
        secrets={"providers/openai": KEY, "providers/anthropic": KEY},
        configs=configs,
    )


def keyed(provider: Upstream, path: str) -> list[str]:
    return [
        s["headers"].get("Authorization", "") for s in provider.seen if s["path"].startswith(path)
    ]


def counters(proxy: Proxy) -> tuple[Decimal, Decimal]:
    """The project's (spent, reserved) once no reservation is open: the calls of this module
    run one at a time, and each is settled just after its answer went out."""
    return settled_counters(proxy.root)


def reserved_of(record: FlowRecord) -> Decimal:
    decision = record.budget_decision
    assert decision is not None and decision.currency == "USD", record.budget
    assert decision.reserved is not None and record.budget == decision.text()
    return decision.reserved


def metered_call(
    proxy: Proxy, provider: Upstream, assignment: str, path: str, **request: Any
) -> tuple[httpx.Response, FlowRecord, Decimal]:
    """POST through the proxy; the answer, the spooled record and what the counters spent,
    after checking the call carried the key and left no reservation open."""
    spent, reserved = counters(proxy)
    assert reserved == 0
    seen = len(provider.seen)
    with proxy.client(Proxy.identity(assignment)) as client:
        response = client.post(
            f"{provider.url}{path}", headers={"Authorization": "Bearer x"}, **request
        )
    record = proxy.spooled_one(assignment=assignment)
    after, still_reserved = counters(proxy)
    assert still_reserved == 0, "the reservation was not released"
    assert [s["headers"]["Authorization"] for s in provider.seen[seen:]] == [f"Bearer {KEY}"]
    assert KEY not in record.model_dump_json()
    assert record.cost_usd == after - spent, "the counters and the record disagree"
    return response, record, after - spent


REFUSED = [
    ("openai", "POST", "/v1/batches", {"input_file_id": "file-1", "endpoint": "/v1/embeddings"}),
    ("openai", "GET", "/v1/batches/batch_1", None),
    ("openai", "GET", "/v1/files", None),
    ("openai", "POST", "/v1/files", {"purpose": "batch"}),
    ("openai", "GET", "/v1/realtime?model=gpt-4o-realtime-preview", None),
    ("openai", "POST", "/v1/realtime/client_secrets", {"session": {"type": "realtime"}}),
    ("openai", "POST", "/v1/images/edits", {"model": "dall-e-2", "prompt": "x"}),
    ("openai", "POST", "/v1/audio/translations", {"model": "whisper-1"}),
    ("openai", "POST", "/v1/assistants", {"model": "gpt-4o-mini"}),
    ("openai", "GET", "/v1/embeddings", None),
    ("anthropic", "POST", "/v1/messages/batches", {"requests": []}),
    ("anthropic", "GET", "/v1/messages/batches/msgbatch_1/results", None),
    ("anthropic", "POST", "/v1/embeddings", {"model": "x", "input": "x"}),
]


@pytest.mark.parametrize(("name", "method", "path", "body"), REFUSED)
def test_an_endpoint_without_a_pricing_rule_gets_no_key_and_no_call(
    proxy: Proxy,
    provider: Upstream,
    anthropic: Upstream,
    name: str,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    upstream = provider if name == "openai" else anthropic
    assignment = "a-" + re.sub(r"[^a-z0-9]+", "-", f"{name}{method}{path}".lower())
    # The realtime API is a websocket: its handshake is refused like any request.
    upgrade = {}
    if "realtime?" in path:
        upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip
    before = counters(proxy)
    with proxy.client(Proxy.identity(assignment)) as client:
        response = client.request(
            method,
            f"{upstream.url}{path}",
            json=body,
            headers={"Authorization": "Bearer x", "x-api-key": "x", **upgrade},
        )
    assert response.status_code == 403, response.text
    refusal = response.json()
    endpoint = f"{method} {path.partition('?')[0]}"
    assert refusal["error"] == "endpoint_not_metered" and refusal["endpoint"] == endpoint
    assert refusal["provider"] == name and "no pricing rule" in refusal["detail"]
    assert not [s for s in upstream.seen if s["path"] == path], "the call reached the provider"
    record = proxy.spooled_one(assignment=assignment)
    assert record.status == 403 and record.cost_usd == 0 and KEY not in record.model_dump_json()
    assert counters(proxy) == before


def test_an_embedding_is_reserved_from_its_size_and_charged_its_tokens(
    proxy: Proxy, provider: Upstream
) -> None:
    body = {"model": "text-embedding-3-small", "input": "The food was delicious."}
    response, record, spent = metered_call(proxy, provider, "a-embed", "/v1/embeddings", json=body)
    assert response.status_code == 200 and response.json()["data"][0]["embedding"]
    price = Decimal(400) / 1_000_000
    assert spent == EMBEDDING_TOKENS * price == Decimal("0.01")
    assert record.usage is not None and record.usage.prompt_tokens == EMBEDDING_TOKENS
    assert not record.usage.estimated and record.usage.unit is None
    request_bytes = len(provider.seen[-1]["body"])  # as forwarded, unchanged
    assert reserved_of(record) == (request_bytes + 64) * price


def test_images_are_reserved_n_times_and_charged_per_image_made(
    proxy: Proxy, provider: Upstream
) -> None:
    hd = {"model": "dall-e-3", "prompt": "a cat", "size": "1024x1792", "quality": "hd"}
    response, record, spent = metered_call(
        proxy, provider, "a-image-hd", "/v1/images/generations", json=hd
    )
    assert response.status_code == 200 and len(response.json()["data"]) == 1
    assert spent == Decimal("0.12") and reserved_of(record) == Decimal("0.12")
    assert record.usage is not None and (record.usage.unit, record.usage.units) == ("image", 1)
    # OpenAI's defaults: dall-e-2, 1024x1024, standard; three asked, two made.
    fewer = {"prompt": "three dogs, fewer", "n": 3}
    _, record, spent = metered_call(
        proxy, provider, "a-image-fewer", "/v1/images/generations", json=fewer
    )
    assert reserved_of(record) == 3 * Decimal("0.02") and spent == 2 * Decimal("0.02")
    assert record.model == "dall-e-2" and record.usage is not None and record.usage.units == 2


def test_a_failed_image_call_costs_nothing_and_releases_its_reservation(
    proxy: Proxy, provider: Upstream
) -> None:
    failing = {"model": "dall-e-2", "prompt": "fail", "size": "512x512", "n": 2}
    response, record, spent = metered_call(
        proxy, provider, "a-image-fail", "/v1/images/generations", json=failing
    )
    assert response.status_code == 500 and spent == 0 and record.usage is None
    assert reserved_of(record) == 2 * Decimal("0.018")


def test_speech_is_charged_per_input_character_and_its_audio_passes_unread(
    proxy: Proxy, provider: Upstream
) -> None:
    text = "Twenty-six characters: ok." * 4
    speech = {"model": "tts-1", "input": text, "voice": "alloy"}
    response, record, spent = metered_call(
        proxy, provider, "a-speech", "/v1/audio/speech", json=speech
    )
    assert response.status_code == 200 and response.content == SPEECH
    assert spent == len(text) * Decimal(15) / 1_000_000 == Decimal("0.00156")
    assert reserved_of(record) == spent and record.streamed
    assert record.usage is not None and (record.usage.unit, record.usage.units) == (
        "character",
        len(text),
    )
    assert record.response_bytes == len(SPEECH)


@pytest.mark.parametrize(
    ("response_format", "seconds", "estimated"),
    [
        (None, 7, False),  # usage: {type: duration, seconds: 7.4}, to the nearest second
        ("verbose_json", 62, False),  # duration: 61.5
        ("text", AUDIO_MAX_SECONDS, True),  # no duration in the answer: the whole reservation
    ],
)
def test_a_transcription_is_reserved_for_the_cap_and_charged_by_the_second(
    proxy: Proxy, provider: Upstream, response_format: str | None, seconds: int, estimated: bool
) -> None:
    form = {"model": "whisper-1"}
    if response_format is not None:
        form["response_format"] = response_format
    audio = {"file": ("speech.wav", b"RIFF" + bytes(4096), "audio/wav")}
    response, record, spent = metered_call(
        proxy,
        provider,
        f"a-transcribe-{response_format}",
        "/v1/audio/transcriptions",
        data=form,
        files=audio,
    )
    assert response.status_code == 200
    per_second = Decimal("0.006") / 60
    assert reserved_of(record) == AUDIO_MAX_SECONDS * per_second == Decimal("0.15")
    assert spent == seconds * per_second
    assert record.usage is not None and record.usage.estimated is estimated
    assert (record.usage.unit, record.usage.units) == ("second", seconds)


@pytest.mark.parametrize(
    ("path", "request_kwargs"),
    [
        ("/v1/images/generations", {"json": {"model": "gpt-image-1", "prompt": "x"}}),
        ("/v1/audio/speech", {"json": {"model": "gpt-4o-mini-tts", "input": "x", "voice": "a"}}),
        ("/v1/embeddings", {"json": {"model": "text-embedding-3-large", "input": "x"}}),
        (
            "/v1/audio/transcriptions",
            {"data": {"model": "gpt-4o-transcribe"}, "files": {"file": ("a.wav", b"RIFF")}},
        ),
    ],
)
def test_a_model_without_a_unit_price_is_refused_before_the_key(
    proxy: Proxy, provider: Upstream, path: str, request_kwargs: dict[str, Any]
) -> None:
    assignment = "a-unpriced-" + path.rsplit("/", 1)[1]
    before, seen = counters(proxy), len(provider.seen)
    with proxy.client(Proxy.identity(assignment)) as client:
        response = client.post(f"{provider.url}{path}", **request_kwargs)
    assert response.status_code == 402, response.text
    assert response.json()["error"] == "unknown_price"
    assert len(provider.seen) == seen and counters(proxy) == before


def test_metered_and_free_endpoints_still_get_the_key(
    proxy: Proxy, provider: Upstream, anthropic: Upstream
) -> None:
    with proxy.client(Proxy.identity("a-keyed")) as client:
        chat = client.post(
            f"{provider.url}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer x"}
        )
        models = client.get(f"{provider.url}/v1/models", headers={"Authorization": "Bearer x"})
        count = client.post(
            f"{anthropic.url}/v1/messages/count_tokens",
            json={"model": "claude-haiku-4-5", "messages": []},
            headers={"x-api-key": "x"},
        )
    assert (chat.status_code, models.status_code, count.status_code) == (200, 200, 200)
    assert keyed(provider, "/v1/chat/completions")[-1] == f"Bearer {KEY}"
    assert keyed(provider, "/v1/models")[-1] == f"Bearer {KEY}"
    assert anthropic.seen[-1]["headers"]["x-api-key"] == KEY
    record = proxy.spooled_one(assignment="a-keyed", path="/v1/chat/completions")
    assert record.provider == "openai" and record.cost_usd > 0


def test_a_public_providers_key_never_travels_in_the_clear(proxy: Proxy) -> None:
    """Plain HTTP to api.openai.com's TLS port: allowed by the egress policy, priced and
    reserved like any call, then refused before the key is put in or a connection is made."""
    with proxy.client(Proxy.identity("a-cleartext")) as client:
        response = client.post(
            "http://api.openai.com:443/v1/chat/completions",
            json=CHAT,
            headers={"Authorization": "Bearer x"},
        )
    assert response.status_code == 403, response.text
    assert response.json()["error"] == "key_over_cleartext"
    record = proxy.spooled_one(assignment="a-cleartext")
    assert KEY not in record.model_dump_json() and record.cost_usd == 0


def test_a_background_response_is_refused_it_would_be_billed_after_the_call(
    proxy: Proxy, provider: Upstream
) -> None:
    """A Responses call with `background: true` is answered at once without usage, and the
    tokens are generated and billed later: nothing the proxy could meter."""
    before, seen = counters(proxy), len(provider.seen)
    background = {"model": "gpt-4o-mini", "input": "write a novel", "background": True}
    with proxy.client(Proxy.identity("a-background")) as client:
        response = client.post(f"{provider.url}/v1/responses", json=background)
    assert response.status_code == 403, response.text
    assert response.json()["error"] == "endpoint_not_metered"
    assert len(provider.seen) == seen and counters(proxy) == before
