"""Credential injection and redaction.

Through the real mitmdump: a stand-in cloud provider (plain HTTP) is mapped as provider
`openai`; the worker sends the placeholder key, the upstream must receive the real one from
the file secret store, and no file under the data root may hold the secret afterwards. Which
header takes the key, and the refusals before any key goes in, are tested in the proxy's
addon chain (proxy_harness.addon_chain).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy import http
from proxy_harness import PRICES_YAML, Chain, Proxy, Upstream, addon_chain, serve

from budget import open_ample
from common.processes import stop
from contracts.credentials import load_or_create_key
from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from proxy.addons.metering import parse_provider_hosts
from proxy.addons.redaction import REDACTED, redact_headers
from proxy.launch import mitmdump_argv, wait_ready
from secretstore import get_store

SECRET = "sk-real-provider-key-0123456789abcdef"
PLACEHOLDER = "autovibe-machine-credential"


@pytest.fixture(scope="module")
def cloud() -> Iterator[Upstream]:
    yield from serve()


@pytest.fixture(scope="module")
def injecting_proxy(tmp_path_factory: pytest.TempPathFactory, cloud: Upstream) -> Iterator[Proxy]:
    configs = tmp_path_factory.mktemp("configs")
    (configs / "prices.yaml").write_text(PRICES_YAML)
    settings = Settings(
        data=tmp_path_factory.mktemp("data"),
        configs=configs,
        proxy_port=free_port(),
        model_port=free_port(),
    )
    root = DataRoot.at(settings.data)
    key = load_or_create_key(root)
    open_ample(root.budget_counters, "p1", ["m1"])
    get_store("file", root).put("providers/openai", SECRET)
    argv = [*mitmdump_argv(settings), "--set", f"autovibe_provider_hosts={cloud.url[7:]}=openai"]
    with (root.root / "mitmdump.log").open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(settings.host, settings.proxy_port, timeout=30, process=process)
            yield Proxy(settings, root, key)
        finally:
            stop(process)


def test_real_key_reaches_provider_and_no_file_holds_it(
    injecting_proxy: Proxy, cloud: Upstream
) -> None:
    identity = injecting_proxy.identity("a1")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    with injecting_proxy.client(identity) as client:
        resp = client.post(
            f"{cloud.url}/v1/chat/completions?echo={SECRET}",
            json=body,
            headers={"Authorization": f"Bearer {PLACEHOLDER}", "Cookie": f"s={SECRET}"},
        )
    assert resp.status_code == 200, resp.text
    seen = cloud.seen[-1]["headers"]
    assert seen["Authorization"] == f"Bearer {SECRET}"
    assert SECRET not in resp.text
    record = injecting_proxy.spooled_one(assignment="a1")
    assert REDACTED in record.url
    leaks = [
        p
        for p in injecting_proxy.root.root.rglob("*")
        if p.is_file() and "vault-secrets" not in p.parts and SECRET.encode() in p.read_bytes()
    ]
    assert not leaks, f"secret written to {leaks}"


# -- the key as it leaves, in the proxy's addon chain (no mitmdump) ----------------------------

CLOUD = "127.0.0.1:8600"


def cloud_call(chain: Chain, path: str, headers: dict[str, str]) -> http.HTTPFlow:
    body = {"model": "gpt-4o-mini", "messages": []}
    flow = chain.flow(chain.identity("a-key"), f"http://{CLOUD}{path}", body, headers=headers)
    return chain.send(flow)


def test_anthropic_style_key_header_is_replaced(tmp_path: Path) -> None:
    with addon_chain(
        tmp_path,
        8500,
        f"autovibe_provider_hosts={CLOUD}=openai",
        secrets={"providers/openai": SECRET},
    ) as chain:
        sent = cloud_call(chain, "/v1/chat/completions", {"x-api-key": PLACEHOLDER})
    assert sent.response is None
    assert sent.request.headers["x-api-key"] == SECRET
    assert "authorization" not in sent.request.headers


def test_no_key_and_no_metered_endpoint_are_refused_before_the_call_leaves(
    tmp_path: Path,
) -> None:
    with addon_chain(tmp_path, 8500, f"autovibe_provider_hosts={CLOUD}=openai") as chain:
        placeholder = {"Authorization": f"Bearer {PLACEHOLDER}"}
        keyless = cloud_call(chain, "/v1/chat/completions", placeholder)
        unmetered = cloud_call(chain, "/v1/fine_tuning/jobs", placeholder)
    assert keyless.response is not None and keyless.response.status_code == 502
    assert json.loads(keyless.response.get_content() or b"")["error"] == "no_provider_key"
    assert unmetered.response is not None and unmetered.response.status_code == 403
    assert json.loads(unmetered.response.get_content() or b"")["error"] == "endpoint_not_metered"
    # Refused with the worker's placeholder still on: no key was ever written in.
    assert keyless.request.headers["Authorization"] == f"Bearer {PLACEHOLDER}"


def test_parsing_and_header_redaction() -> None:
    assert parse_provider_hosts("h:1=openai, ") == {("h", 1): "openai"}
    with pytest.raises(ValueError, match="host:port=provider"):
        parse_provider_hosts("h=openai")
    assert redact_headers([("X-Api-Key", "k"), ("X-Note", f"a{SECRET}")], [SECRET]) == [
        ["X-Api-Key", REDACTED],
        ["X-Note", f"a{REDACTED}"],
    ]
