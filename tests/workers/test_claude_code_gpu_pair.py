"""claude-code on a GPU pair: the real adapter, sandboxed, through the real metering proxy, to
the GPU model plane as the rendered Serve config lays it out (Ray's OpenAI app, here its
stand-in `ray_openai_stand_in`, with `serving.messages_front` at `/v1/messages` on the same
port), naming the pair `7b`. No GPU is needed: the stand-in answers the OpenAI app's wire format
with a scripted answer, and the front translates it to Anthropic's as it would vLLM's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from agents_harness import agent_run, installed, run_sandboxed
from worker_harness import EXAMPLES, MeteringProxy, ModelServer, metering_proxy_to

from contracts.config import load_prices
from contracts.dataroot import DataRoot
from contracts.settings import PROJECT_ROOT, Settings
from tests.serving.ray_openai_stand_in import RayOpenAIStandIn, serve
from workers import workspace
from workers.agents.claude_code import ClaudeCodeAgent
from workers.agents.headless import TRANSCRIPT

pytestmark = pytest.mark.slow
ANSWER = "The add function should return a + b."
STAND_IN = RayOpenAIStandIn(answers={"7b": ANSWER}, max_model_len=32768)


@pytest.fixture(scope="module")
def gpu_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    with serve(STAND_IN) as url:
        port = int(urlsplit(url).port or 0)
        settings = Settings(
            data=tmp_path_factory.mktemp("gpu-plane"),
            configs=PROJECT_ROOT / "configs",
            model_port=port,
        )
        yield ModelServer(settings)


@pytest.fixture(scope="module")
def gpu_proxy(
    tmp_path_factory: pytest.TempPathFactory, gpu_plane: ModelServer
) -> Iterator[MeteringProxy]:
    yield from metering_proxy_to(tmp_path_factory, gpu_plane)


def test_claude_code_runs_on_a_gpu_pair_through_the_messages_front_metered_at_its_price(
    tmp_path: Path, gpu_proxy: MeteringProxy, gpu_plane: ModelServer
) -> None:
    root = DataRoot.at(tmp_path / "data")
    found = installed("claude-code", root.root)
    agent = ClaudeCodeAgent(root.root)  # the full prompt: a GPU pair's context holds it
    artifacts = root.assignment_dir("p1", "t1", "a-claude-7b")
    workspace.prepare(EXAMPLES / "mathkit", artifacts / "workspace")
    run = agent_run(
        artifacts / "workspace", artifacts, endpoint=gpu_plane.url, timeout_s=300, model="7b"
    )

    outcome, log_text = run_sandboxed(agent, run, gpu_proxy, root)

    assert outcome.exit_cause == "finished", (outcome, log_text)
    assert outcome.version == found.version
    events = [json.loads(line) for line in (artifacts / TRANSCRIPT).read_text().splitlines()]
    assert events[0]["type"] == "system" and events[0]["model"] == "7b", events[0]
    assert events[-1]["type"] == "result" and events[-1]["result"] == ANSWER, events[-1]
    # The front asked Ray's OpenAI app for the pair by its name, as vLLM serves it.
    chats = [body for path, body in STAND_IN.seen if path == "/v1/chat/completions"]
    assert chats and {body["model"] for body in chats} == {"7b"}

    calls = [r for r in gpu_proxy.spooled("a-claude-7b") if urlsplit(r.path).path == "/v1/messages"]
    assert len(calls) == len(chats), (calls, log_text)
    prices = load_prices(PROJECT_ROOT / "configs")
    for call in calls:
        assert (call.status, call.provider, call.model) == (200, "local", "7b"), call
        usage = call.usage
        assert usage is not None and not usage.estimated and usage.prompt_tokens > 0, call
        # The GPU pair's hourly price, apportioned by tokens (configs/prices.yaml `local.7b`).
        price = prices.cost_usd("local", "7b", usage.prompt_tokens, usage.completion_tokens)
        assert price is not None and price > 0 and call.cost_usd == price
    assert outcome.usage.calls == len(calls)
