"""A provider's key goes only with calls the proxy meters, and only over TLS to the public
providers (issue 18, finding 3), through the real mitmdump with a machine credential.

Before, every request to a provider host got the real key: embeddings, images, audio,
batches and files were billed to the organisation while the counters stayed at 0, and a
plain-HTTP request to a provider's host carried the key in the clear.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))
from proxy_harness import Proxy, Upstream, metering_proxy, serve

KEY = "sk-real-provider-key-for-endpoint-tests"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def provider() -> Iterator[Upstream]:
    """An OpenAI stand-in the proxy knows as provider `openai` (autovibe_provider_hosts)."""
    yield from serve()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, provider: Upstream) -> Iterator[Proxy]:
    hosts = f"autovibe_provider_hosts=127.0.0.1:{provider.port}=openai"
    yield from metering_proxy(
        tmp_path_factory, 1, "--set", hosts, secrets={"providers/openai": KEY}
    )


def keyed(provider: Upstream, path: str) -> list[str]:
    return [
        s["headers"].get("Authorization", "") for s in provider.seen if s["path"].startswith(path)
    ]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}),
        ("POST", "/v1/images/generations", {"model": "gpt-image-1", "prompt": "x"}),
        ("POST", "/v1/audio/speech", {"model": "tts-1", "input": "x", "voice": "alloy"}),
        ("POST", "/v1/batches", {"input_file_id": "file-1", "endpoint": "/v1/chat/completions"}),
        ("GET", "/v1/files", None),
    ],
)
def test_an_endpoint_without_a_pricing_rule_gets_no_key_and_no_call(
    proxy: Proxy, provider: Upstream, method: str, path: str, body: dict[str, str] | None
) -> None:
    assignment = "a" + path.replace("/", "-")
    with proxy.client(Proxy.identity(assignment)) as client:
        response = client.request(
            method, f"{provider.url}{path}", json=body, headers={"Authorization": "Bearer x"}
        )
    assert response.status_code == 403, response.text
    refusal = response.json()
    assert refusal["error"] == "endpoint_not_metered" and refusal["endpoint"] == f"{method} {path}"
    assert keyed(provider, path) == [], "the call reached the provider"
    record = proxy.spooled_one(assignment=assignment)
    assert record.status == 403 and KEY not in record.model_dump_json()


def test_metered_and_free_endpoints_still_get_the_key(proxy: Proxy, provider: Upstream) -> None:
    with proxy.client(Proxy.identity("a-keyed")) as client:
        chat = client.post(
            f"{provider.url}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer x"}
        )
        models = client.get(f"{provider.url}/v1/models", headers={"Authorization": "Bearer x"})
    assert (chat.status_code, models.status_code) == (200, 200)
    assert keyed(provider, "/v1/chat/completions")[-1] == f"Bearer {KEY}"
    assert keyed(provider, "/v1/models")[-1] == f"Bearer {KEY}"
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
