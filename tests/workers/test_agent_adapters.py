"""Agent adapters: installs into the data root, command lines, output parsing, and real runs.

Command construction and parsing are checked for every adapter on fixed sample outputs.
mini-swe-agent is installed and run for real, sandboxed, against the real llama.cpp server
through the real metering proxy; so is claude-code, against the server's Anthropic Messages
API (`/v1/messages`). cursor-cli cannot be installed here: it is covered by command
construction and parsing only.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from agents_harness import agent_run, installed, run_sandboxed
from typer.testing import CliRunner
from worker_harness import EXAMPLES, MeteringProxy, ModelServer

from contracts.dataroot import DataRoot
from workers import workspace
from workers.agents import AGENTS, get_agent, install
from workers.agents.aider import AiderAgent, AiderConfig, chat_usage
from workers.agents.claude_code import COMPACT_SYSTEM as CLAUDE_COMPACT_SYSTEM
from workers.agents.claude_code import ClaudeCodeAgent, ClaudeConfig
from workers.agents.cursor_cli import CursorCliAgent
from workers.agents.headless import TRANSCRIPT
from workers.agents.mini_swe_agent import COMPACT_SYSTEM, MiniConfig, MiniSweAgent
from workers.agents.qwen_code import QwenCodeAgent, QwenConfig
from workers.agents_cli import app

ENDPOINT = "http://127.0.0.1:8500/v1"


def env_of(argv: list[str]) -> dict[str, str]:
    """The `env K=V …` assignments of an adapter's argv."""
    start = argv.index("env") + 1
    pairs = []
    for arg in argv[start:]:
        if "=" not in arg or arg.startswith("/"):
            break
        pairs.append(arg.split("=", 1))
    return dict(pairs)


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def write_lines(path: Path, events: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


# -- registry and installs ---------------------------------------------------------------------


def test_every_adapter_is_registered_and_loads(tmp_path: Path) -> None:
    assert set(AGENTS) == {
        "builtin",
        "mini-swe-agent",
        "aider",
        "claude-code",
        "qwen-code",
        "cursor-cli",
        "command",
    }
    for name in AGENTS:
        agent = get_agent(name, tmp_path)
        assert agent.name == name
        assert agent.version()  # "unknown" until installed, never empty
    assert get_agent("aider", tmp_path).read_only_paths(tmp_path) == [tmp_path / "agents/aider"]
    assert get_agent("builtin").read_only_paths(tmp_path) == []


def test_an_agent_not_installed_is_refused_with_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(install.CURSOR_ENV, str(tmp_path / "no-such-cursor-agent"))
    for name in ("mini-swe-agent", "aider", "claude-code", "qwen-code"):
        assert not install.is_installed(name, tmp_path)
        assert f"autovibe agents install {name}" in install.install_hint(name)
    assert not install.is_installed("cursor-cli", tmp_path)
    assert install.CURSOR_ENV in install.install_hint("cursor-cli")
    assert install.is_installed("builtin", tmp_path)
    # A folder without installed.json (an install that failed half way) is not installed.
    (tmp_path / "agents" / "aider" / "venv" / "bin").mkdir(parents=True)
    assert not install.is_installed("aider", tmp_path)
    with pytest.raises(install.InstallError, match="installable: aider"):
        install.install("nonesuch", tmp_path)
    with pytest.raises(install.InstallError, match="ships with autovibe"):
        install.install("builtin", tmp_path)


def test_cursor_cli_is_installed_when_its_binary_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = tmp_path / "cursor-agent"
    binary.write_text("#!/bin/sh\necho 2026.11.01-abc\n")
    binary.chmod(0o755)
    monkeypatch.setenv(install.CURSOR_ENV, str(binary))
    assert install.is_installed("cursor-cli", tmp_path)
    assert install.installed_versions(tmp_path) == {"cursor-cli": "2026.11.01-abc"}
    assert CursorCliAgent(tmp_path).version() == "2026.11.01-abc"


@pytest.mark.slow
def test_install_pypi_and_npm_agents_into_the_data_root_and_list_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOVIBE_DATA", str(tmp_path))
    monkeypatch.setenv(install.CURSOR_ENV, str(tmp_path / "no-such-cursor-agent"))
    mini = installed("mini-swe-agent", tmp_path)
    qwen = installed("qwen-code", tmp_path)

    assert mini.path == tmp_path.resolve() / "agents" / "mini-swe-agent"
    assert (mini.path / "venv" / "bin" / "mini").exists()
    assert mini.version[0].isdigit() and mini.registry == "pypi"
    assert (qwen.path / "node_modules" / ".bin" / "qwen").exists()
    assert qwen.version[0].isdigit() and qwen.registry == "npm"
    recorded = json.loads((mini.path / "installed.json").read_text())
    assert recorded["package"] == "mini-swe-agent" and recorded["version"] == mini.version
    assert install.installed_versions(tmp_path) == {
        "mini-swe-agent": mini.version,
        "qwen-code": qwen.version,
    }
    assert MiniSweAgent(tmp_path).version() == mini.version

    result = CliRunner().invoke(app, ["ls"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert mini.version in lines["mini-swe-agent"] and "installed" in lines["mini-swe-agent"]
    assert "autovibe agents install aider" in lines["aider"]
    assert "bundled" in lines["builtin"]
    failed = CliRunner().invoke(app, ["install", "nonesuch"])
    assert failed.exit_code == 1


# -- command construction ----------------------------------------------------------------------


def test_mini_swe_agent_command(tmp_path: Path) -> None:
    run = agent_run(tmp_path / "ws", tmp_path / "art", endpoint=ENDPOINT, timeout_s=100)
    argv = MiniSweAgent(tmp_path, MiniConfig(step_limit=7)).command(run)
    env = env_of(argv)
    assert env["HOME"] == str(run.artifacts / "home")
    assert env["MSWEA_CONFIGURED"] == "true" and env["MSWEA_COST_TRACKING"] == "ignore_errors"
    program = argv[len(env) + 1]
    assert program == str(tmp_path.resolve() / "agents/mini-swe-agent/venv/bin/mini")
    configs = [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]
    assert configs[0] == "mini_textbased.yaml"
    assert "agent.step_limit=7" in configs
    assert "agent.wall_time_limit_seconds=90" in configs
    assert f"model.model_kwargs.api_base={ENDPOINT}" in configs
    assert "model.cost_tracking=ignore_errors" in configs
    assert option(argv, "--model") == "openai/tiny"
    assert option(argv, "--task") == run.prompt
    assert option(argv, "--agent-class") == "default"
    assert option(argv, "--cost-limit") == "0"
    assert option(argv, "--output") == str(run.artifacts / "trajectory.json")
    assert {"--yolo", "--exit-immediately"} <= set(argv)


def test_aider_command(tmp_path: Path) -> None:
    run = agent_run(tmp_path / "ws", tmp_path / "art", endpoint=ENDPOINT)
    argv = AiderAgent(tmp_path).command(run)
    assert env_of(argv)["HOME"] == str(run.artifacts / "home")
    assert option(argv, "--model") == "openai/tiny"
    assert option(argv, "--openai-api-base") == ENDPOINT
    assert option(argv, "--message-file") == str(run.artifacts / "prompt.txt")
    assert option(argv, "--chat-history-file") == str(run.artifacts / "aider.chat.history.md")
    flags = {"--yes-always", "--no-git", "--no-auto-commits", "--no-check-update"}
    assert flags | {"--no-analytics"} <= set(argv)


def test_headless_agents_write_stdout_to_the_transcript(tmp_path: Path) -> None:
    run = agent_run(tmp_path / "ws", tmp_path / "art", endpoint=ENDPOINT)
    claude = ClaudeCodeAgent(tmp_path).command(run)
    assert claude[:5] == [
        "sh",
        "-c",
        'out="$1"; shift; exec "$@" > "$out"',
        "sh",
        str(run.artifacts / TRANSCRIPT),
    ]
    env = env_of(claude)
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:8500"  # the client adds /v1/messages
    assert env["IS_SANDBOX"] == "1" and env["DISABLE_AUTOUPDATER"] == "1"
    assert option(claude, "-p") == run.prompt
    assert option(claude, "--output-format") == "stream-json" and "--verbose" in claude
    assert option(claude, "--max-turns") == "20"
    assert "--dangerously-skip-permissions" in claude

    qwen = QwenCodeAgent(tmp_path).command(run)
    env = env_of(qwen)
    assert (env["OPENAI_BASE_URL"], env["OPENAI_MODEL"]) == (ENDPOINT, "tiny")
    assert option(qwen, "-p") == run.prompt
    assert option(qwen, "--auth-type") == "openai"
    assert option(qwen, "--openai-base-url") == ENDPOINT
    assert "--yolo" in qwen and option(qwen, "--max-session-turns") == "20"
    assert qwen[len(env) + 6].endswith("agents/qwen-code/node_modules/.bin/qwen")


def test_cursor_cli_command_uses_the_configured_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(install.CURSOR_ENV, "/opt/cursor/cursor-agent")
    run = agent_run(tmp_path / "ws", tmp_path / "art", endpoint=ENDPOINT)
    argv = CursorCliAgent(tmp_path).command(run)
    assert "/opt/cursor/cursor-agent" in argv
    assert option(argv, "-p") == run.prompt
    assert option(argv, "--output-format") == "stream-json"
    assert "--force" in argv and option(argv, "--model") == "tiny"
    assert CursorCliAgent(tmp_path).read_only_paths(tmp_path) == []


# -- output parsing ----------------------------------------------------------------------------

CLAUDE_STREAM: list[dict[str, object]] = [
    {"type": "system", "subtype": "init", "session_id": "s1", "model": "tiny", "tools": ["Bash"]},
    {
        "type": "assistant",
        "message": {
            "id": "msg_1",
            "role": "assistant",
            "content": [{"type": "text", "text": "Looking."}],
            "usage": {"input_tokens": 100, "cache_read_input_tokens": 20, "output_tokens": 8},
        },
        "session_id": "s1",
    },
    {  # the same response's second content block: not another call
        "type": "assistant",
        "message": {
            "id": "msg_1",
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "Bash", "input": {}}],
            "usage": {"input_tokens": 100, "cache_read_input_tokens": 20, "output_tokens": 8},
        },
        "session_id": "s1",
    },
    {"type": "user", "message": {"role": "user", "content": [{"type": "tool_result"}]}},
    {
        "type": "assistant",
        "message": {"id": "msg_2", "usage": {"input_tokens": 150, "output_tokens": 5}},
    },
    {
        "type": "result",
        "subtype": "success",
        "is_error": False,
        "num_turns": 2,
        "result": "Done.",
        "total_cost_usd": 0.0,
        "usage": {"input_tokens": 250, "cache_read_input_tokens": 20, "output_tokens": 13},
    },
]


def test_claude_and_qwen_stream_json_is_parsed(tmp_path: Path) -> None:
    for agent in (ClaudeCodeAgent(tmp_path), QwenCodeAgent(tmp_path)):
        run = agent_run(tmp_path / "ws", tmp_path / agent.name, endpoint=ENDPOINT)
        write_lines(run.artifacts / TRANSCRIPT, CLAUDE_STREAM)
        outcome = agent.collect(run, 0, timed_out=False)
        assert outcome.exit_cause == "finished"
        assert outcome.transcript == run.artifacts / TRANSCRIPT
        assert (outcome.usage.calls, outcome.usage.prompt_tokens) == (2, 270)
        assert outcome.usage.completion_tokens == 13
        assert outcome.detail == "success after 2 turns"
        assert agent.collect(run, None, timed_out=True).exit_cause == "timeout"


def test_a_402_in_the_result_is_budget_exhausted(tmp_path: Path) -> None:
    run = agent_run(tmp_path / "ws", tmp_path / "art", endpoint=ENDPOINT)
    refused = 'API Error: 402 {"error":"budget_exhausted","scope":"project:p1","left":"0.0001"}'
    write_lines(
        run.artifacts / TRANSCRIPT,
        [
            {"type": "system", "subtype": "init"},
            {"type": "result", "subtype": "success", "is_error": True, "result": refused},
        ],
    )
    outcome = ClaudeCodeAgent(tmp_path).collect(run, 1, timed_out=False)
    assert outcome.exit_cause == "budget_exhausted"
    assert "402" in outcome.detail
    assert outcome.usage.calls == 0


QWEN_UNREACHABLE: list[
    dict[str, object]
] = [  # qwen-code 0.15 with nothing listening at its base URL
    {"type": "system", "subtype": "init", "model": "tiny"},
    {
        "type": "assistant",
        "message": {
            "id": "d8b1da87",
            "type": "message",
            "role": "assistant",
            "model": "tiny",
            "content": [
                {"type": "text", "text": "[API Error: Connection error. (cause: fetch failed)]"}
            ],
            "usage": {"input_tokens": 0, "output_tokens": 0},
        },
    },
    {
        "type": "result",
        "subtype": "success",
        "is_error": False,
        "num_turns": 1,
        "result": "[API Error: Connection error. (cause: fetch failed)]",
        "usage": {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0},
    },
]


def test_qwen_api_errors_reported_as_success_are_crashes(tmp_path: Path) -> None:
    run = agent_run(tmp_path / "ws", tmp_path / "art", endpoint=ENDPOINT)
    write_lines(run.artifacts / TRANSCRIPT, QWEN_UNREACHABLE)
    outcome = QwenCodeAgent(tmp_path).collect(run, 0, timed_out=False)
    assert outcome.exit_cause == "crashed"
    assert "Connection error" in outcome.detail
    assert outcome.usage.calls == 0


def test_a_killed_headless_agent_leaves_a_partial_transcript(tmp_path: Path) -> None:
    run = agent_run(tmp_path / "ws", tmp_path / "art", endpoint=ENDPOINT)
    lines = [json.dumps(e) for e in CLAUDE_STREAM[:2]]
    (run.artifacts / TRANSCRIPT).write_text("\n".join(lines) + '\n{"type": "assis')
    outcome = CursorCliAgent(tmp_path).collect(run, None, timed_out=True)
    assert outcome.exit_cause == "timeout"
    assert outcome.usage.calls == 1 and outcome.usage.prompt_tokens == 120
    assert "no result event" in outcome.detail
    missing = agent_run(tmp_path / "ws", tmp_path / "none", endpoint=ENDPOINT)
    assert CursorCliAgent(tmp_path).collect(missing, 1, False).exit_cause == "crashed"


def test_mini_swe_agent_trajectory_is_parsed(tmp_path: Path) -> None:
    run = agent_run(tmp_path / "ws", tmp_path / "art", endpoint=ENDPOINT)

    def reply(n: int) -> dict[str, object]:
        usage = {"prompt_tokens": 100 * n, "completion_tokens": n, "total_tokens": 101 * n}
        return {
            "role": "assistant",
            "content": "```mswea_bash_command\nls\n```",
            "extra": {"actions": [{"command": "ls"}], "response": {"usage": usage}, "cost": 0},
        }

    trajectory = {
        "info": {
            "model_stats": {"instance_cost": 0.0, "api_calls": 2},
            "mini_version": "2.4.6",
            "exit_status": "LimitsExceeded",
            "submission": "",
        },
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "task"},
            reply(1),
            {"role": "user", "content": "<returncode>0</returncode>"},
            reply(2),
            {"role": "exit", "content": "LimitsExceeded", "extra": {"exit_status": "x"}},
        ],
        "trajectory_format": "mini-swe-agent-1.1",
    }
    (run.artifacts / "trajectory.json").write_text(json.dumps(trajectory))
    agent = MiniSweAgent(tmp_path)
    outcome = agent.collect(run, 0, timed_out=False)
    assert outcome.exit_cause == "finished"
    assert (outcome.usage.calls, outcome.usage.prompt_tokens, outcome.usage.completion_tokens) == (
        2,
        300,
        3,
    )
    assert outcome.detail == "exit status LimitsExceeded after 2 model calls"

    trajectory["info"]["exit_status"] = "TimeExceeded"  # type: ignore[index]
    (run.artifacts / "trajectory.json").write_text(json.dumps(trajectory))
    assert agent.collect(run, 0, timed_out=False).exit_cause == "timeout"

    refused = "litellm.APIError: OpenAIException - Error code: 402 - {'error': 'no_budget'}"
    trajectory["info"]["exit_status"] = "APIError"  # type: ignore[index]
    trajectory["messages"][-1] = {  # type: ignore[index]
        "role": "exit",
        "content": refused,
        "extra": {"exit_status": "APIError", "exception_str": refused},
    }
    (run.artifacts / "trajectory.json").write_text(json.dumps(trajectory))
    outcome = agent.collect(run, 1, timed_out=False)
    assert outcome.exit_cause == "budget_exhausted" and "402" in outcome.detail
    (run.artifacts / "trajectory.json").unlink()
    assert "no trajectory.json" in agent.collect(run, 1, False).detail


AIDER_HISTORY = """
# aider chat started at 2026-11-21 07:00:00

> /usr/bin/aider --model openai/tiny --message-file prompt.txt

#### Implement `add` in mathkit/basic.py so that tests/test_basic.py passes.

mathkit/basic.py
```python
def add(a, b):
    return a + b
```

> Tokens: 1.2k sent, 45 received.
> Applied edit to mathkit/basic.py

> Tokens: 2.5k sent, 1.1k cache write, 7 received. Cost: $0.00 message, $0.00 session.
"""


def test_aider_chat_history_is_parsed(tmp_path: Path) -> None:
    usage = chat_usage(AIDER_HISTORY)
    assert (usage.calls, usage.prompt_tokens, usage.completion_tokens) == (2, 3700, 52)
    run = agent_run(tmp_path / "ws", tmp_path / "art", endpoint=ENDPOINT)
    (run.artifacts / "aider.chat.history.md").write_text(AIDER_HISTORY)
    agent = AiderAgent(tmp_path)
    outcome = agent.collect(run, 0, timed_out=False)
    assert outcome.exit_cause == "finished" and outcome.usage.calls == 2
    (run.artifacts / "agent.log").write_text(
        "litellm.APIError: APIError: OpenAIException - Error code: 402 - {'error': 'no_budget'}"
    )
    assert agent.collect(run, 0, timed_out=False).exit_cause == "budget_exhausted"


# -- real run ----------------------------------------------------------------------------------


@pytest.mark.model
def test_mini_swe_agent_runs_sandboxed_against_the_real_model_through_the_proxy(
    tmp_path: Path, llama_proxy: MeteringProxy, model_server: ModelServer
) -> None:
    root = DataRoot.at(tmp_path / "data")
    found = installed("mini-swe-agent", root.root)
    # Short prompts and few steps: the tiny model on a shared CPU takes seconds per call.
    agent = MiniSweAgent(root.root, MiniConfig(step_limit=2, max_tokens=48, compact=True))
    artifacts = root.assignment_dir("p1", "t1", "a-mini")
    workspace.prepare(EXAMPLES / "mathkit", artifacts / "workspace")
    run = agent_run(artifacts / "workspace", artifacts, endpoint=model_server.url, timeout_s=120)
    outcome, log_text = run_sandboxed(agent, run, llama_proxy, root)
    assert outcome.exit_cause in ("finished", "timeout"), (outcome, log_text)
    assert outcome.version == found.version
    calls = [r for r in llama_proxy.spooled("a-mini") if r.path == "/v1/chat/completions"]
    assert calls, f"no model call metered for a-mini: {log_text}"
    assert outcome.transcript.exists(), log_text
    trajectory = json.loads(outcome.transcript.read_text())
    assert trajectory["info"]["mini_version"] == found.version
    assert trajectory["messages"][0]["content"] == COMPACT_SYSTEM
    assert outcome.usage.calls >= 1
    assert [r.status for r in calls[: outcome.usage.calls]] == [200] * outcome.usage.calls


@pytest.mark.model
def test_qwen_code_runs_sandboxed_against_the_real_model_through_the_proxy(
    tmp_path: Path, llama_proxy: MeteringProxy, model_server: ModelServer
) -> None:
    root = DataRoot.at(tmp_path / "data")
    found = installed("qwen-code", root.root)
    # Compact: qwen-code's own prompt and tools (~8k tokens) overflow the tiny model's 2k.
    agent = QwenCodeAgent(root.root, QwenConfig(max_turns=2, max_tokens=48, compact=True))
    artifacts = root.assignment_dir("p1", "t1", "a-qwen")
    workspace.prepare(EXAMPLES / "mathkit", artifacts / "workspace")
    run = agent_run(artifacts / "workspace", artifacts, endpoint=model_server.url, timeout_s=120)

    outcome, log_text = run_sandboxed(agent, run, llama_proxy, root)

    events = [json.loads(line) for line in (artifacts / TRANSCRIPT).read_text().splitlines()]
    assert events, f"empty {TRANSCRIPT}: {log_text}"
    assert events[0]["type"] == "system" and events[0]["qwen_code_version"] == found.version
    assert events[-1]["type"] == "result", log_text  # it ended on its own
    assert outcome.version == found.version
    calls = [r for r in llama_proxy.spooled("a-qwen") if r.path == "/v1/chat/completions"]
    assert calls and all(r.status == 200 for r in calls), log_text
    # The base model's noise is an answer (finished) or, when it is empty three times over,
    # qwen-code's "[API Error: … empty response text]" (crashed); never a refused call.
    assert outcome.exit_cause == "finished" or "empty response" in outcome.detail, outcome
    settings = json.loads((artifacts / "home" / ".qwen" / "settings.json").read_text())
    assert settings["privacy"]["usageStatisticsEnabled"] is False


@pytest.mark.model
def test_aider_runs_sandboxed_against_the_real_model_through_the_proxy(
    tmp_path: Path, llama_proxy: MeteringProxy, model_server: ModelServer
) -> None:
    root = DataRoot.at(tmp_path / "data")
    found = installed("aider", root.root)
    # A base model rambles on: 32 tokens per reply keeps the call short on a shared CPU.
    agent = AiderAgent(root.root, AiderConfig(max_tokens=32))
    artifacts = root.assignment_dir("p1", "t1", "a-aider")
    workspace.prepare(EXAMPLES / "mathkit", artifacts / "workspace")
    run = agent_run(artifacts / "workspace", artifacts, endpoint=model_server.url, timeout_s=120)

    outcome, log_text = run_sandboxed(agent, run, llama_proxy, root)

    assert outcome.exit_cause == "finished", (outcome, log_text)
    assert outcome.version == found.version
    calls = [r for r in llama_proxy.spooled("a-aider") if r.path == "/v1/chat/completions"]
    assert calls and all(r.status == 200 for r in calls), log_text
    history = (artifacts / "aider.chat.history.md").read_text()
    assert run.prompt in history, history
    assert outcome.usage.calls >= 1, history


def test_claude_code_command_options(tmp_path: Path) -> None:
    run = agent_run(tmp_path / "ws", tmp_path / "art", endpoint=ENDPOINT)
    config = ClaudeConfig(max_turns=3, max_output_tokens=48, compact=True)
    argv = ClaudeCodeAgent(tmp_path, config).command(run)
    env = env_of(argv)
    assert env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == "48"
    models = [v for k, v in env.items() if k.startswith("ANTHROPIC_") and k.endswith("_MODEL")]
    assert len(models) == 5 and set(models) == {"tiny"}  # nothing the proxy cannot price
    assert option(argv, "--system-prompt") == CLAUDE_COMPACT_SYSTEM
    assert "--disable-slash-commands" in argv and option(argv, "--max-turns") == "3"
    plain = ClaudeCodeAgent(tmp_path).command(run)
    assert "CLAUDE_CODE_MAX_OUTPUT_TOKENS" not in env_of(plain)
    assert "--system-prompt" not in plain and "--disable-slash-commands" not in plain


@pytest.mark.model
def test_claude_code_runs_sandboxed_against_the_real_model_through_the_proxy(
    tmp_path: Path, llama_proxy: MeteringProxy, model_server: ModelServer
) -> None:
    root = DataRoot.at(tmp_path / "data")
    found = installed("claude-code", root.root)
    # Compact (~0.6k prompt tokens; the full prompt is ~2.9k, over the tiny model's context)
    # and 16 tokens a reply: on a busy shared CPU a call can take tens of seconds.
    config = ClaudeConfig(max_turns=2, max_output_tokens=16, compact=True)
    agent = ClaudeCodeAgent(root.root, config)
    artifacts = root.assignment_dir("p1", "t1", "a-claude")
    workspace.prepare(EXAMPLES / "mathkit", artifacts / "workspace")
    run = agent_run(artifacts / "workspace", artifacts, endpoint=model_server.url, timeout_s=300)

    outcome, log_text = run_sandboxed(agent, run, llama_proxy, root)

    events = [json.loads(line) for line in (artifacts / TRANSCRIPT).read_text().splitlines()]
    assert events, f"empty {TRANSCRIPT}: {log_text}"
    assert events[0]["type"] == "system" and events[0]["claude_code_version"] == found.version
    assert outcome.version == found.version
    # The tiny model's noise solves nothing; the run must end (or time out) as an agent run,
    # never on the infrastructure: every call reached the model and was metered from its usage.
    if outcome.exit_cause != "timeout":
        assert events[-1]["type"] == "result", log_text
    calls = [r for r in llama_proxy.spooled("a-claude") if urlsplit(r.path).path == "/v1/messages"]
    assert calls, f"no model call metered for a-claude: {log_text}"
    answered = [r for r in calls if r.error is None]
    assert answered and all(r.status == 200 for r in calls), (calls, log_text)
    assert all(r.usage and not r.usage.estimated and r.usage.prompt_tokens > 0 for r in answered)
    assert sum(r.usage.completion_tokens for r in answered if r.usage) > 0, answered
    assert outcome.usage.calls >= 1, outcome


def test_aider_and_qwen_code_send_nothing_but_model_calls(tmp_path: Path) -> None:
    run = agent_run(tmp_path / "ws", tmp_path / "art", endpoint=ENDPOINT)
    aider = AiderAgent(tmp_path, AiderConfig(max_tokens=32)).command(run)
    assert env_of(aider)["BROWSER"] == "true" and env_of(aider)["AIDER_ANALYTICS"] == "false"
    metadata = json.loads(Path(option(aider, "--model-metadata-file")).read_text())
    assert set(metadata) == {"openai/tiny"}  # known: no price list fetched from GitHub
    settings = json.loads(Path(option(aider, "--model-settings-file")).read_text())
    assert settings == [{"name": "openai/tiny", "extra_params": {"max_tokens": 32}}]

    qwen = QwenCodeAgent(tmp_path, QwenConfig(max_tokens=48, compact=True)).command(run)
    env = env_of(qwen)
    assert env["NODE_OPTIONS"] == "--disable-wasm-trap-handler"  # Node under RLIMIT_AS
    assert env["QWEN_CODE_MAX_OUTPUT_TOKENS"] == "48"
    home_settings = json.loads((run.artifacts / "home/.qwen/settings.json").read_text())
    assert home_settings["privacy"]["usageStatisticsEnabled"] is False
    assert home_settings["telemetry"]["enabled"] is False
    core = [qwen[i + 1] for i, a in enumerate(qwen) if a == "--core-tools"]
    assert core == ["read_file", "edit", "run_shell_command"] and "--bare" not in qwen
