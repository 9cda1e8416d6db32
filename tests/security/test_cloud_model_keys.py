"""A trial's cloud model is called by its provider's real host name, through the real mitmdump,
and only the proxy holds the key (issue 20).

The worker gets what the scheduler gives it for `<provider>/<model>` (`Catalog.endpoint`: the
provider's URL from configs/providers.yaml and its own model name, with the placeholder key)
and nothing else in its environment. mitmdump runs in a mount namespace of its own whose
/etc/hosts sends api.deepseek.com, api.anthropic.com and openrouter.ai to a TLS stand-in (a
certificate for those names from a throwaway CA that mitmdump trusts upstream); the stand-in
must receive the real key of that provider, the spool must price the call from
configs/prices.yaml under that provider, and the key must appear nowhere the worker can see.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "workers"))
from worker_harness import (
    MeteringProxy,
    StandInCloud,
    proxy_to_providers,
    throwaway_certificate,
)

from contracts.config import load_prices
from contracts.credentials import MachineIdentity, mint, proxy_url
from contracts.providers import PLACEHOLDER_KEY
from contracts.records import FlowRecord
from contracts.settings import PROJECT_ROOT
from orchestrator.catalog import Catalog

NAMES = ("api.deepseek.com", "api.anthropic.com", "openrouter.ai")
KEYS = {
    "deepseek": "sk-deepseek-real-key-0123456789",
    "anthropic": "sk-ant-real-key-9876543210",
    "openrouter": "sk-or-real-key-5555555555",
}

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a private /etc/hosts for mitmdump needs root and unshare",
)

WORKER = """
import json, os, httpx
wire, model = os.environ["WIRE"], os.environ["AUTOVIBE_MODEL"]
if wire == "anthropic":
    url = os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages"
    headers = {"x-api-key": os.environ["ANTHROPIC_API_KEY"], "anthropic-version": "2023-06-01"}
    body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
else:
    url = os.environ["OPENAI_BASE_URL"] + "/chat/completions"
    headers = {"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]}
    body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
with httpx.Client(timeout=30) as client:  # HTTPS_PROXY and SSL_CERT_FILE from the environment
    response = client.post(url, json=body, headers=headers)
print(json.dumps({"url": url, "status": response.status_code, "body": response.text}))
"""


@dataclass(frozen=True)
class Stack:
    proxy: MeteringProxy
    cloud: StandInCloud
    catalog: Catalog


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    address = f"127.77.{os.getpid() % 250}.1"  # on lo already: 127.0.0.0/8 is local
    folder = tmp_path_factory.mktemp("throwaway-ca")
    ca, server_pem = throwaway_certificate(folder, address, NAMES)
    cloud = StandInCloud(address, cert=server_pem, port=443)
    try:
        with proxy_to_providers(
            tmp_path_factory.mktemp("cloud-keys"), address, NAMES, ca, KEYS
        ) as proxy:
            yield Stack(proxy, cloud, Catalog.load(proxy.settings))
    finally:
        cloud.stop()


def worker_env(stack: Stack, assignment: str, model: str, wire: str) -> dict[str, str]:
    """What the scheduler hands a worker for `model` (see `Scheduler._spec`), and PATH."""
    settings = stack.proxy.settings
    identity = MachineIdentity(
        project="p1", trial="t1", assignment=assignment, machine="m1", expires=time.time() + 600
    )
    proxy = proxy_url(settings.host, settings.proxy_port, "m1", mint(stack.proxy.key, identity))
    endpoint, upstream = stack.catalog.endpoint(model)
    return {
        "PATH": os.environ["PATH"],
        "HTTPS_PROXY": proxy,
        "SSL_CERT_FILE": str(stack.proxy.root.ca_cert),
        "OPENAI_BASE_URL": endpoint,
        "OPENAI_API_KEY": PLACEHOLDER_KEY,
        "ANTHROPIC_BASE_URL": endpoint.removesuffix("/v1"),
        "ANTHROPIC_API_KEY": PLACEHOLDER_KEY,  # as claude-code's adapter sets it
        "AUTOVIBE_MODEL": upstream,
        "WIRE": wire,
    }


def spooled(stack: Stack, assignment: str) -> list[FlowRecord]:
    deadline = time.monotonic() + 5
    while not (records := stack.proxy.spooled(assignment)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return list(records)


CASES = [
    # model, wire, host, path the stand-in sees, the usage it reports (in, out)
    ("deepseek/deepseek-chat", "openai", "api.deepseek.com", "/v1/chat/completions", (11, 7)),
    ("openrouter/qwen/qwen3-coder", "openai", "openrouter.ai", "/api/v1/chat/completions", (11, 7)),
    ("anthropic/claude-sonnet-4-5", "anthropic", "api.anthropic.com", "/v1/messages", (13, 5)),
]


@pytest.mark.parametrize(("model", "wire", "host", "path", "usage"), CASES)
def test_the_provider_gets_the_real_key_the_worker_only_the_placeholder(
    stack: Stack, model: str, wire: str, host: str, path: str, usage: tuple[int, int]
) -> None:
    provider, _, upstream = model.partition("/")
    assignment = f"a-{provider}"
    env = worker_env(stack, assignment, model, wire)
    assert not any(secret in value for value in env.values() for secret in KEYS.values())
    seen = len(stack.cloud.seen)
    done = subprocess.run(
        [sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["url"].startswith(f"https://{host}/"), answer
    assert answer["status"] == 200, answer
    [call] = stack.cloud.seen[seen:]
    assert (call["host"], call["path"]) == (host, path)
    assert json.loads(call["body"])["model"] == upstream
    if wire == "anthropic":
        assert (call["x-api-key"], call["authorization"]) == (KEYS[provider], "")
    else:
        assert call["authorization"] == f"Bearer {KEYS[provider]}"
    assert not any(secret in done.stdout + done.stderr for secret in KEYS.values())

    [record] = spooled(stack, assignment)
    assert (record.provider, record.model, record.host) == (provider, upstream, host)
    price = load_prices(PROJECT_ROOT / "configs").price(provider, upstream)
    assert price is not None
    prompt, completion = usage
    expected = (price.input_per_mtok * prompt + price.output_per_mtok * completion) / 1_000_000
    assert record.cost_usd == expected
    assert Decimal(0) < expected
    assert not any(secret in record.model_dump_json() for secret in KEYS.values())
