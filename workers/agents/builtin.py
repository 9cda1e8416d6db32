"""The built-in agent: fill in stub functions, one at a time, with a base or a chat model.

It finds every function whose body is `raise NotImplementedError` (after an optional
docstring), asks the model to complete the module's source from that function's docstring
on, writes the completion in as the body, and keeps it when the function's tests pass
(`pytest -k <name>`), retrying a few times with a hotter temperature and another seed. It asks
`/completions` (a base model's API: the local pairs); an endpoint that answers it has no
completions for the model (OpenAI's 404 for a chat model) is asked `/chat/completions` from
then on, with instructions to answer with the body alone (code fences are dropped).

Run as `python -m workers.agents.builtin`; it leaves `transcript.jsonl` (one JSON line per
model call, edit and test run) and `agent-summary.json` in the artifacts folder. Exit codes:
0 done (whether or not the tests pass), 2 model unreachable (no connection, a 5xx from the
proxy or the model server, or the credential refused), 3 budget exhausted (the proxy
answered 402).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import textwrap
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ValidationError

from contracts.dataroot import atomic_write
from workers.agents.base import (
    AgentOutcome,
    AgentRun,
    AgentUsage,
    ExitCause,
    read_jsonl,
    read_output,
)

TRANSCRIPT = "transcript.jsonl"
SUMMARY = "agent-summary.json"
PROMPT = "prompt.txt"

EXIT_UNREACHABLE = 2
EXIT_BUDGET = 3


@dataclass(frozen=True)
class BuiltinConfig:
    """Knobs of the built-in agent; the defaults suit a small base model on a CPU."""

    max_tokens: int = 128
    """Completion length per call; a function body rarely needs more."""
    temperatures: tuple[float, ...] = (0.0, 0.7, 1.0)
    """One attempt per entry: greedy first, then hotter samples."""
    seed: int = 0
    """Seed of the first attempt; attempt i uses seed + i."""
    stop: tuple[str, ...] = ("\ndef ", "\nclass ", "\n\n\n", "\nif __name__")
    """Where a function body surely ended."""
    task_lines: int = 3
    """Last lines of the task prompt put at the top of the completion prompt, as comments."""
    max_prompt_chars: int = 5000
    """Module source kept before the stub (its end); ~4 chars a token leaves room in 2k context."""
    request_timeout_s: float = 300.0
    test_timeout_s: float = 60.0
    """A generated body may loop forever; its test run is cut off after this long."""


# -- the adapter ------------------------------------------------------------------------------


class BuiltinAgent:
    """Adapter for the built-in agent: runs this module as a program and reads its files."""

    name = "builtin"

    def __init__(self, root: Path | None = None, config: BuiltinConfig | None = None) -> None:
        self.config = config or BuiltinConfig()  # runs from our own code: no install, no root

    def version(self) -> str:
        try:
            return package_version("autovibe")
        except PackageNotFoundError:
            return "unknown"

    def read_only_paths(self, root: Path) -> list[Path]:
        return []  # runs from the platform's own interpreter and code

    def command(self, run: AgentRun) -> list[str]:
        return [
            sys.executable,
            "-m",
            "workers.agents.builtin",
            "--workspace",
            str(run.workspace),
            "--endpoint",
            run.endpoint,
            "--model",
            run.model,
            "--artifacts",
            str(run.artifacts),
            "--max-tokens",
            str(self.config.max_tokens),
            "--seed",
            # Per assignment, so repeated assignments of a task sample differently, reproducibly.
            str(self.config.seed + zlib.crc32(run.artifacts.name.encode()) % 100_000),
        ]

    def collect(self, run: AgentRun, exit_code: int | None, timed_out: bool) -> AgentOutcome:
        transcript = run.artifacts / TRANSCRIPT
        # Usage comes from the transcript, written call by call, so a killed run still counts.
        usage = AgentUsage()
        for line in read_jsonl(transcript):
            if line.get("type") != "llm_call":
                continue
            usage.calls += 1
            reported = line.get("usage")
            if isinstance(reported, dict):
                usage.prompt_tokens += int(reported.get("prompt_tokens") or 0)
                usage.completion_tokens += int(reported.get("completion_tokens") or 0)
        cause: ExitCause
        if timed_out:
            cause = "timeout"
        elif exit_code == EXIT_BUDGET:
            cause = "budget_exhausted"
        elif exit_code == EXIT_UNREACHABLE:
            cause = "model_unreachable"
        elif exit_code != 0:
            cause = "crashed"
        else:
            cause = "finished"
        return AgentOutcome(
            exit_cause=cause,
            exit_code=exit_code,
            transcript=transcript,
            usage=usage,
            version=self.version(),
            detail=_summary_detail(run.artifacts / SUMMARY),
        )


class Summary(BaseModel):
    """What the host reads of `agent-summary.json`, which the agent (untrusted) writes."""

    functions: dict[str, str] = {}
    detail: str = ""


def _summary_detail(path: Path) -> str:
    text = read_output(path)
    if not text:
        return f"no {SUMMARY}: the agent ended before writing it"
    try:
        summary = Summary.model_validate_json(text)
    except ValidationError:
        return f"{SUMMARY} is not a valid summary"
    functions = summary.functions
    passed = sorted(f for f, status in functions.items() if status == "passed")
    text = f"{len(passed)}/{len(functions)} stub functions pass their tests"
    if passed:
        text += f" ({', '.join(passed)})"
    if summary.detail:
        text += f"; {summary.detail}"
    return text


# -- the program ------------------------------------------------------------------------------


class BudgetExhausted(Exception):
    """The proxy refused the call with 402; nothing more may be spent."""


class EndpointUnreachable(Exception):
    """The model endpoint (or the proxy in front of it) is unreachable, failed the call (5xx) or
    refused the credential: the model plane's failure, not the agent's."""


@dataclass(frozen=True)
class Stub:
    """A function left to write: `raise NotImplementedError` after an optional docstring."""

    path: Path
    """Relative to the workspace."""
    qualname: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.path.as_posix()}::{self.qualname}"


def find_stubs(workspace: Path) -> list[Stub]:
    """Every stub function in the workspace's non-test Python files, in file order."""
    stubs = []
    for path in _source_files(workspace):
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for qualname, node in _functions(tree):
            if _stub_raise(node) is not None:
                stubs.append(Stub(path.relative_to(workspace), qualname, node.name))
    return stubs


def _source_files(workspace: Path) -> Iterator[Path]:
    for path in sorted(workspace.rglob("*.py")):
        parts = path.relative_to(workspace).parts
        if any(p.startswith(".") or p in ("tests", "test", "__pycache__", "venv") for p in parts):
            continue
        if path.name.startswith("test_") or path.name.endswith("_test.py"):
            continue
        if path.name == "conftest.py":
            continue
        yield path


Function = ast.FunctionDef | ast.AsyncFunctionDef


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, Function]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")


def _stub_raise(node: Function) -> ast.Raise | None:
    """The `raise NotImplementedError` that is the function's whole body, if it is one."""
    body = node.body
    if body and _is_docstring(body[0]):
        body = body[1:]
    if len(body) != 1 or not isinstance(body[0], ast.Raise):
        return None
    exc = body[0].exc
    if isinstance(exc, ast.Call):
        exc = exc.func
    if isinstance(exc, ast.Name) and exc.id == "NotImplementedError":
        return body[0]
    return None


def _is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def _locate(source: str, qualname: str) -> tuple[Function, ast.Raise] | None:
    """The stub's function node and its raise statement in the current source."""
    for name, node in _functions(ast.parse(source)):
        if name == qualname:
            stub = _stub_raise(node)
            # A one-line stub (`def f(): raise NotImplementedError`) has no body line to replace.
            if stub is not None and stub.lineno > node.lineno:
                return node, stub
    return None


def completion_prompt(
    source: str, raise_stmt: ast.Raise, task: str, path: Path, config: BuiltinConfig
) -> str:
    """Comment lines with the task's end, then the module up to the stub's docstring."""
    task_lines = [line.strip() for line in task.splitlines() if line.strip()]
    tail = task_lines[-config.task_lines :] if config.task_lines else []
    header = [f"# {line}" for line in tail] + [f"# File: {path.as_posix()}"]
    before = source.splitlines(keepends=True)[: raise_stmt.lineno - 1]
    # A long module keeps its end: the stub's signature and docstring matter most.
    while len(before) > 1 and sum(map(len, before)) > config.max_prompt_chars:
        before.pop(0)
    return "\n".join(header) + "\n\n" + "".join(before)


def splice_body(source: str, raise_stmt: ast.Raise, completion: str) -> str | None:
    """`source` with the stub's raise replaced by the completion, or None if nothing compiles.

    The completion is cut where it leaves the function, re-indented to the body's
    indentation, and shortened from the end until the module compiles (a completion cut off
    by `max_tokens` usually ends mid-statement).
    """
    indent = raise_stmt.col_offset
    body: list[str] = []
    floor = indent
    for line in completion.expandtabs(4).splitlines():
        if not line.strip():
            if body:
                body.append("")
            continue
        depth = len(line) - len(line.lstrip())
        if not body:
            # A model that ignores indentation writes the body flush left: follow it.
            floor = min(indent, depth)
        elif depth < floor:
            break
        body.append(line.rstrip())
    lines = source.splitlines(keepends=True)
    head = "".join(lines[: raise_stmt.lineno - 1])
    tail = "".join(lines[raise_stmt.end_lineno or raise_stmt.lineno :])
    while body:
        block = textwrap.indent(textwrap.dedent("\n".join(body)).strip("\n"), " " * indent)
        candidate = head + block + "\n" + tail
        try:
            tree = ast.parse(candidate)
        except SyntaxError:
            body.pop()
            continue
        # A body that is still a stub (or does nothing) is no answer.
        if not block.strip() or block.strip() in ("pass", "...") or _still_stub(tree, raise_stmt):
            return None
        return candidate
    return None


def _still_stub(tree: ast.AST, raise_stmt: ast.Raise) -> bool:
    for _, node in _functions(tree):
        stub = _stub_raise(node)
        if stub is not None and stub.lineno == raise_stmt.lineno:
            return True
    return False


@dataclass
class Session:
    """One run of the program: where it writes and what it has used so far."""

    workspace: Path
    artifacts: Path
    endpoint: str
    model: str
    task: str
    config: BuiltinConfig
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    functions: dict[str, str] = field(default_factory=dict)
    api: str = "auto"
    """`auto`: `/completions` until the endpoint says it has none for the model, then `chat`."""

    def record(self, entry: dict[str, Any]) -> None:
        entry = {"ts": round(time.time(), 3), **entry}
        with (self.artifacts / TRANSCRIPT).open("a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def write_summary(self, state: str, detail: str = "") -> None:
        summary = {
            "agent": BuiltinAgent.name,
            "model": self.model,
            "state": state,
            "detail": detail,
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "functions": self.functions,
        }
        # Replaced whole, so a kill mid-write leaves the previous summary, not half of one.
        atomic_write(self.artifacts / SUMMARY, json.dumps(summary, indent=2) + "\n")

    def complete(self, client: httpx.Client, prompt: str, temperature: float, seed: int) -> str:
        """One completion: `/completions` (a base model's API), or, once the endpoint has
        answered that it has none for this model (404, or 400 naming chat: a cloud chat model),
        `/chat/completions` for this and every later call. Every call, failed or not, gets a
        transcript line."""
        if self.api != "chat":
            answered = self._call(client, "completions", prompt, temperature, seed)
            if answered is not None:
                return answered
            self.api = "chat"
            self.record({"type": "api", "api": "chat", "reason": "no /completions for the model"})
        completion = self._call(client, "chat", prompt, temperature, seed)
        return completion or ""

    def _call(
        self, client: httpx.Client, api: str, prompt: str, temperature: float, seed: int
    ) -> str | None:
        """The completion text; None when `/completions` is not offered for the model."""
        path = "chat/completions" if api == "chat" else "completions"
        url = f"{self.endpoint.rstrip('/')}/{path}"
        request: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.config.max_tokens,
            "temperature": temperature,
            "stop": list(self.config.stop),
            "seed": seed,
        }
        if api == "chat":
            request["messages"] = [
                {"role": "system", "content": CHAT_INSTRUCTION},
                {"role": "user", "content": prompt},
            ]
        else:
            request["prompt"] = prompt
        entry: dict[str, Any] = {
            "type": "llm_call",
            "url": url,
            "model": self.model,
            "temperature": temperature,
            "seed": seed,
            "prompt_chars": len(prompt),
        }
        started = time.monotonic()
        try:
            response = client.post(url, json=request)
        except httpx.TransportError as exc:
            self.record({"type": "error", "url": url, "error": f"{type(exc).__name__}: {exc}"})
            raise EndpointUnreachable(f"{url}: {type(exc).__name__}: {exc}") from exc
        entry["elapsed_ms"] = round((time.monotonic() - started) * 1000)
        entry["status"] = response.status_code
        body = _json_or_none(response)
        usage = body.get("usage") if isinstance(body, dict) else None
        choices = body.get("choices") if isinstance(body, dict) else None
        completion = ""
        if response.is_success and isinstance(choices, list) and choices:
            completion = _choice_text(choices[0], api)
        entry.update(
            response_id=body.get("id") if isinstance(body, dict) else None,
            usage=usage,
            completion=completion,
        )
        if not response.is_success:
            entry["error"] = response.text[:2000]
        self.record(entry)
        self.calls += 1
        if isinstance(usage, dict):
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)
        if api == "completions" and self.api == "auto" and _no_completions(response):
            return None
        if response.status_code == 402:
            raise BudgetExhausted(response.text[:500])
        if response.status_code in (401, 403, 407):
            # The credential was refused: every further call would be refused too.
            raise EndpointUnreachable(f"{url} refused the call ({response.status_code})")
        if response.status_code >= 500:
            # The proxy's 502 when the model server is gone, or the server's own failure:
            # going on would score the outage as the agent's unsolved task.
            raise EndpointUnreachable(
                f"{url} failed the call ({response.status_code}): {response.text[:300]}"
            )
        return completion

    def run_tests(self, stub: Stub, attempt: int) -> bool:
        """Run the stub's tests (`pytest -k <name>`); no tests selected counts as a pass. They
        run on the platform's interpreter, so without its own libraries' pytest plugins, as
        grading runs them there (`PLATFORM_PLUGINS_OFF`: seconds per run)."""
        # Here, not at the top: workers.grading brings workers.sandbox (~55 ms), which the
        # agent's start does not need.
        from workers.grading import PLATFORM_PLUGINS_OFF

        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        argv += [*PLATFORM_PLUGINS_OFF.split(), "-k", stub.name]
        started = time.monotonic()
        try:
            proc = subprocess.run(
                argv,
                cwd=self.workspace,
                capture_output=True,
                text=True,
                timeout=self.config.test_timeout_s,
                check=False,
            )
            exit_code: int | None = proc.returncode
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            exit_code = None
            partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout
            output = f"timed out after {self.config.test_timeout_s}s\n{partial or ''}"
        # pytest exits 5 when -k selects nothing: there is nothing to check against.
        passed = exit_code in (0, 5)
        self.record(
            {
                "type": "test_run",
                "function": stub.key,
                "attempt": attempt,
                "command": argv[1:],
                "exit_code": exit_code,
                "passed": passed,
                "elapsed_ms": round((time.monotonic() - started) * 1000),
                "output_tail": output[-2000:],
            }
        )
        return passed

    def solve(self, client: httpx.Client, stub: Stub) -> bool:
        """Try each temperature in turn until the stub's tests pass; keep the last body written."""
        path = self.workspace / stub.path
        # Each attempt starts from the stub, not from the previous attempt's body.
        source = path.read_text()
        for attempt, temperature in enumerate(self.config.temperatures):
            located = _locate(source, stub.qualname)
            if located is None:
                self.record(
                    {
                        "type": "edit",
                        "function": stub.key,
                        "ok": False,
                        "reason": "not a replaceable stub",
                    }
                )
                return False
            _, raise_stmt = located
            prompt = completion_prompt(source, raise_stmt, self.task, stub.path, self.config)
            completion = self.complete(client, prompt, temperature, self.config.seed + attempt)
            new_source = splice_body(source, raise_stmt, completion)
            if new_source is None:
                self.record(
                    {
                        "type": "edit",
                        "function": stub.key,
                        "attempt": attempt,
                        "ok": False,
                        "reason": "completion does not compile to a body",
                    }
                )
                continue
            path.write_text(new_source)
            self.record(
                {
                    "type": "edit",
                    "function": stub.key,
                    "attempt": attempt,
                    "ok": True,
                    "file": stub.path.as_posix(),
                    "lines": [raise_stmt.lineno, raise_stmt.end_lineno],
                }
            )
            if self.run_tests(stub, attempt):
                return True
        return False


CHAT_INSTRUCTION = (
    "You complete Python source code. The user sends a module that ends inside a function "
    "whose body is missing. Reply with that function's body only, indented as it must be in "
    "the module, with no explanation and no code fences."
)
"""A chat model's instructions: answer what a base model would continue the prompt with."""
_FENCE = re.compile(r"^\s*```[\w+-]*\s*$")


def _choice_text(choice: Any, api: str) -> str:
    """The text of a choice: `text` (completions) or `message.content` (chat), code fences
    a chat model put around its answer dropped."""
    if not isinstance(choice, dict):
        return ""
    if api != "chat":
        return str(choice.get("text") or "")
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        return ""
    return "\n".join(line for line in content.splitlines() if not _FENCE.match(line))


def _no_completions(response: httpx.Response) -> bool:
    """Whether the endpoint says it has no `/completions` for the model: 404 (OpenAI's answer
    for a chat model, or a server without the route), or a 400 that names chat."""
    if response.status_code == 404:
        return True
    return response.status_code == 400 and "chat" in response.text.lower()


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def run(session: Session) -> int:
    """Fill in every stub; the exit code tells the adapter how it ended."""
    stubs = find_stubs(session.workspace)
    session.record(
        {"type": "start", "workspace": str(session.workspace), "stubs": [s.key for s in stubs]}
    )
    session.write_summary("running")
    # trust_env: HTTP(S)_PROXY carries the machine credential for the metering proxy.
    with httpx.Client(trust_env=True, timeout=session.config.request_timeout_s) as client:
        for stub in stubs:
            try:
                solved = session.solve(client, stub)
            except BudgetExhausted as exc:
                session.functions[stub.key] = "failed"
                session.write_summary("budget_exhausted", f"proxy answered 402: {exc}")
                return EXIT_BUDGET
            except EndpointUnreachable as exc:
                session.functions[stub.key] = "failed"
                session.write_summary("unreachable", str(exc))
                return EXIT_UNREACHABLE
            session.functions[stub.key] = "passed" if solved else "failed"
            session.write_summary("running")
    session.record({"type": "finish", "functions": session.functions})
    session.write_summary("finished", "" if stubs else "no stub functions found")
    return 0


def main(argv: list[str] | None = None) -> int:
    defaults = BuiltinConfig()
    parser = argparse.ArgumentParser(prog="python -m workers.agents.builtin", description=__doc__)
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--endpoint", required=True, help="OpenAI-compatible base URL (…/v1)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--prompt-file", type=Path, help=f"default: <artifacts>/{PROMPT}")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    prompt_file = args.prompt_file or args.artifacts / PROMPT
    task = prompt_file.read_text() if prompt_file.exists() else ""
    session = Session(
        workspace=args.workspace.resolve(),
        artifacts=args.artifacts,
        endpoint=args.endpoint,
        model=args.model,
        task=task,
        config=BuiltinConfig(max_tokens=args.max_tokens, seed=args.seed),
    )
    return run(session)


if __name__ == "__main__":
    sys.exit(main())
