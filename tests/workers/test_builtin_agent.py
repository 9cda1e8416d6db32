"""The built-in agent against the real tiny model, and through the metering proxy against the
deterministic model (what is metered there does not depend on the model's words).

Whether a 270M base model solves a task is not asserted; that the agent asked it, wrote
compiling code where the stubs were, and accounted for every call is.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from worker_harness import MeteringProxy, ModelServer, direct_env

from workers.agents import get_agent
from workers.agents.base import AgentRun, read_jsonl
from workers.agents.builtin import BuiltinAgent, BuiltinConfig, Session, Stub

PROMPT = "Implement `add` and `is_even` in mathkit/basic.py so that tests/test_basic.py passes."


def start_run(ws: Path, endpoint: str, model: str = "tiny") -> AgentRun:
    run = AgentRun(
        workspace=ws,
        prompt=PROMPT,
        endpoint=endpoint,
        model=model,
        artifacts=ws.parent / "artifacts",
        timeout_s=600,
    )
    run.artifacts.mkdir()
    # What the runner does before it calls command().
    (run.artifacts / "prompt.txt").write_text(run.prompt)
    return run


def execute(agent: BuiltinAgent, run: AgentRun, env: dict[str, str]) -> int:
    proc = subprocess.run(
        agent.command(run), cwd=run.workspace, env=env, capture_output=True, text=True, timeout=600
    )
    (run.artifacts / "agent.log").write_text(proc.stdout + proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode


def llm_calls(run: AgentRun) -> list[dict[str, Any]]:
    return [e for e in read_jsonl(run.artifacts / "transcript.jsonl") if e["type"] == "llm_call"]


def function_bodies(path: Path) -> dict[str, list[ast.stmt]]:
    tree = ast.parse(path.read_text())  # raises if the agent left code that does not compile
    return {node.name: node.body for node in tree.body if isinstance(node, ast.FunctionDef)}


def is_stub(body: list[ast.stmt]) -> bool:
    last = body[-1]
    return isinstance(last, ast.Raise) and "NotImplementedError" in ast.unparse(last)


def test_registry_knows_the_builtin_agent() -> None:
    agent = get_agent("builtin")
    assert isinstance(agent, BuiltinAgent)
    assert agent.version() not in ("", "unknown")


@pytest.mark.model
def test_agent_fills_the_stubs_with_the_real_model(
    model_server: ModelServer, prepared: Callable[[str], Path]
) -> None:
    ws = prepared("mathkit")
    agent = BuiltinAgent()
    run = start_run(ws, model_server.url)

    exit_code = execute(agent, run, direct_env())

    assert exit_code == 0
    calls = llm_calls(run)
    assert calls, "the agent made no model call"
    for call in calls:
        assert call["status"] == 200
        assert call["url"] == f"{model_server.url}/completions"
        assert call["model"] == "tiny"
        assert str(call["response_id"]).startswith("cmpl")
        assert call["usage"]["prompt_tokens"] > 0
        assert call["prompt_chars"] > 0
    summary = json.loads((run.artifacts / "agent-summary.json").read_text())
    assert summary["state"] == "finished"
    assert summary["calls"] == len(calls)
    assert summary["prompt_tokens"] == sum(c["usage"]["prompt_tokens"] for c in calls)
    assert summary["completion_tokens"] == sum(c["usage"]["completion_tokens"] for c in calls)
    assert set(summary["functions"]) == {"mathkit/basic.py::add", "mathkit/basic.py::is_even"}
    assert set(summary["functions"].values()) <= {"passed", "failed"}

    bodies = function_bodies(ws / "mathkit" / "basic.py")
    assert not is_stub(bodies["add"]) or not is_stub(bodies["is_even"])
    # Functions that were already implemented are untouched.
    assert ast.unparse(bodies["multiply"][-1]) == "return a * b"
    kinds = {e["type"] for e in read_jsonl(run.artifacts / "transcript.jsonl")}
    assert {"start", "llm_call", "edit", "test_run", "finish"} <= kinds

    outcome = agent.collect(run, exit_code, timed_out=False)
    assert outcome.exit_cause == "finished"
    assert outcome.usage.calls == len(calls)
    assert outcome.usage.prompt_tokens == summary["prompt_tokens"]
    assert outcome.usage.completion_tokens == summary["completion_tokens"]
    assert "stub functions pass their tests" in outcome.detail
    # The same files read as a timeout or a 402 when the runner says so.
    assert agent.collect(run, None, timed_out=True).exit_cause == "timeout"
    assert agent.collect(run, 3, timed_out=False).exit_cause == "budget_exhausted"
    assert agent.collect(run, 1, timed_out=False).exit_cause == "crashed"


def test_calls_through_the_proxy_are_metered_under_the_same_response_ids(
    metering_proxy: MeteringProxy,
    deterministic_model: ModelServer,
    prepared: Callable[[str], Path],
) -> None:
    ws = prepared("mathkit")
    run = start_run(ws, deterministic_model.url)

    exit_code = execute(BuiltinAgent(), run, direct_env(HTTP_PROXY=metering_proxy.url_for("a-1")))

    assert exit_code == 0
    calls = llm_calls(run)
    assert calls
    records = metering_proxy.spooled("a-1")
    assert [c["response_id"] for c in calls] == [r.response_id for r in records]
    assert [c["usage"]["prompt_tokens"] for c in calls] == [
        r.usage.prompt_tokens if r.usage else None for r in records
    ]


def test_a_402_from_the_proxy_stops_the_agent_with_exit_3(
    metering_proxy: MeteringProxy,
    deterministic_model: ModelServer,
    prepared: Callable[[str], Path],
) -> None:
    ws = prepared("mathkit")
    # The proxy refuses a model it has no price for with 402, before the model server sees it.
    run = start_run(ws, deterministic_model.url, model="unpriced-model")
    agent = BuiltinAgent()

    exit_code = execute(agent, run, direct_env(HTTP_PROXY=metering_proxy.url_for("a-402")))

    assert exit_code == 3
    calls = llm_calls(run)
    assert [c["status"] for c in calls] == [402]
    summary = json.loads((run.artifacts / "agent-summary.json").read_text())
    assert summary["state"] == "budget_exhausted"
    assert "unknown_price" in summary["detail"]
    assert agent.collect(run, exit_code, timed_out=False).exit_cause == "budget_exhausted"
    assert "raise NotImplementedError" in (ws / "mathkit" / "basic.py").read_text()


def test_an_unreachable_endpoint_is_recorded_and_exits_2(
    prepared: Callable[[str], Path],
) -> None:
    ws = prepared("mathkit")
    # Port 9 (discard) on loopback: nothing listens there.
    run = start_run(ws, "http://127.0.0.1:9/v1")
    agent = BuiltinAgent()

    exit_code = execute(agent, run, direct_env())

    assert exit_code == 2
    transcript = read_jsonl(run.artifacts / "transcript.jsonl")
    assert [e["type"] for e in transcript] == ["start", "error"]
    assert "ConnectError" in str(transcript[-1]["error"])
    summary = json.loads((run.artifacts / "agent-summary.json").read_text())
    assert (summary["state"], summary["calls"]) == ("unreachable", 0)
    assert agent.collect(run, exit_code, timed_out=False).exit_cause == "model_unreachable"


def test_the_stubs_tests_run_without_the_platforms_own_pytest_plugins(tmp_path: Path) -> None:
    """The agent checks a body with the platform's interpreter, as grading does a task with no
    environment: the pytest plugins of the platform's own libraries (deepeval's took seconds
    per run) are not loaded."""
    ws = tmp_path / "workspace"
    (ws / "tests").mkdir(parents=True)
    (ws / "tests" / "test_plugins.py").write_text(
        "def test_plugins(pytestconfig):\n"
        "    assert not pytestconfig.pluginmanager.has_plugin('deepeval')\n"
        "    assert not pytestconfig.pluginmanager.has_plugin('schemathesis')\n"
    )
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    session = Session(ws, artifacts, "http://127.0.0.1:9/v1", "tiny", "", BuiltinConfig())
    assert session.run_tests(Stub(Path("plugins.py"), "plugins", "plugins"), attempt=0)


class _ChatOnlyModel(BaseHTTPRequestHandler):
    """OpenAI's API for a chat model, as documented: `/v1/completions` answers 404 with its
    `invalid_request_error`, `/v1/chat/completions` a `chat.completion` whose content is the
    body of the function the prompt ends in, fenced as chat models write code."""

    BODIES: ClassVar[dict[str, str]] = {
        "add": "    return a + b",
        "is_even": "    return n % 2 == 0",
    }
    seen: ClassVar[list[tuple[str, dict[str, Any]]]] = []
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, doc))
        if self.path != "/v1/chat/completions":
            message = (
                "This is a chat model and not supported in the v1/completions endpoint. "
                "Did you mean to use v1/chat/completions?"
            )
            error = {"message": message, "type": "invalid_request_error", "param": "model",
                     "code": None}  # fmt: skip
            return self._json(404, {"error": error})
        prompt = doc["messages"][-1]["content"]
        name = re.findall(r"^def (\w+)\(", prompt, re.MULTILINE)[-1]
        content = f"```python\n{self.BODIES[name]}\n```"
        self._json(200, {
            "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion",
            "created": 1741569952, "model": doc["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content,
                                                  "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 80, "completion_tokens": 9, "total_tokens": 89},
        })  # fmt: skip

    def _json(self, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.slow  # the agent runs pytest after each answer: ~8 s
def test_a_chat_model_is_asked_in_chat_once_it_has_no_completions(
    prepared: Callable[[str], Path],
) -> None:
    """A cloud chat model (OpenAI's `gpt-4.1-mini`) has no `/completions`: after its 404 the
    agent asks `/chat/completions`, drops the fences, and the stubs' tests pass."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatOnlyModel)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ws = prepared("mathkit")
        run = start_run(ws, f"http://127.0.0.1:{server.server_address[1]}/v1", "gpt-4.1-mini")
        exit_code = execute(BuiltinAgent(), run, direct_env())
    finally:
        server.shutdown()
        server.server_close()
    assert exit_code == 0
    paths = [path for path, _ in _ChatOnlyModel.seen]
    assert paths == ["/v1/completions", "/v1/chat/completions", "/v1/chat/completions"], paths
    chat = _ChatOnlyModel.seen[1][1]
    assert chat["model"] == "gpt-4.1-mini" and chat["messages"][0]["role"] == "system"
    summary = json.loads((run.artifacts / "agent-summary.json").read_text())
    assert summary["functions"] == {"mathkit/basic.py::add": "passed",
                                    "mathkit/basic.py::is_even": "passed"}, summary  # fmt: skip
    assert summary["calls"] == 3 and summary["completion_tokens"] == 18
    bodies = function_bodies(ws / "mathkit" / "basic.py")
    assert ast.unparse(bodies["add"][-1]) == "return a + b"
