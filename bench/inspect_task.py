"""The harness benchmark's task as Inspect AI runs it: run by the Python of the bench's own
Inspect venv (`bench.harness.inspect_python`), never imported by the project.

Each sample is one assignment: the `local` sandbox (a temporary folder, no isolation) gets a
copy of the repo in its `setup`, the solver makes one `mockllm/model` call and applies the same
scripted edit as autovibe's agent, the scorer runs the same test command with the same
environment and interpreter and reads pytest's `-rA` summary for the fail-to-pass test.

    <inspect venv>/bin/python bench/inspect_task.py SPEC.json OUT.json

SPEC: repo, samples, machines, log_dir, test_command, test_env, edit_path, edit_old, edit_new,
fail_to_pass. OUT: wall_s and one record per sample (admitted, agent_start, agent_end,
completed, resolved), epoch seconds.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from inspect_ai import Task, eval
from inspect_ai.dataset import Sample
from inspect_ai.model import ModelOutput, ModelUsage, get_model
from inspect_ai.scorer import (
    CORRECT,
    INCORRECT,
    Score,
    Target,
    accuracy,
    scorer,
)
from inspect_ai.solver import Generate, TaskState, solver
from inspect_ai.util import sandbox, store

ADMITTED = ".bench-admitted"
"""Written by the sample's setup before the copy: when the sample's sandbox was handed over."""


def answer(*_args: Any) -> ModelOutput:
    """mockllm's answer with its usage: without one it counts tokens with tiktoken, whose
    table is downloaded on first use (no network here); autovibe's model server counts too."""
    output = ModelOutput.from_content(model="mockllm", content="Change `a - b` to `a + b`.")
    output.usage = ModelUsage(input_tokens=40, output_tokens=8, total_tokens=48)
    return output


def build(spec: dict[str, Any]) -> Task:
    @solver
    def scripted_agent() -> Any:
        async def solve(state: TaskState, generate: Generate) -> TaskState:
            start = time.time()
            state = await generate(state)
            text = await sandbox().read_file(spec["edit_path"])
            await sandbox().write_file(
                spec["edit_path"], text.replace(spec["edit_old"], spec["edit_new"])
            )
            store().set("agent", [start, time.time()])
            return state

        return solve

    @scorer(metrics=[accuracy()])
    def tests_pass() -> Any:
        async def score(state: TaskState, target: Target) -> Score:
            env = [f"{k}={v}" for k, v in spec["test_env"].items()]
            result = await sandbox().exec(
                ["/usr/bin/env", "-i", *env, "/bin/sh", "-c", spec["test_command"]], timeout=300
            )
            resolved = f"PASSED {spec['fail_to_pass']}" in result.stdout
            agent_start, agent_end = store().get("agent")
            admitted = float((await sandbox().read_file(ADMITTED)).strip())
            return Score(
                value=CORRECT if resolved else INCORRECT,
                metadata={"admitted": admitted, "agent_start": agent_start, "agent_end": agent_end},
            )

        return score

    setup = f"date +%s.%N > {ADMITTED} && cp -a {spec['repo']}/. ."
    samples = [
        Sample(id=i, input="Make calc.core.add add.", target="resolved", setup=setup)
        for i in range(spec["samples"])
    ]
    return Task(dataset=samples, solver=scripted_agent(), scorer=tests_pass(), sandbox="local")


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    task = build(spec)
    started = time.time()
    [log] = eval(
        task,
        model=get_model("mockllm/model", custom_outputs=answer),
        max_samples=spec["machines"],
        max_sandboxes=spec["machines"],
        log_dir=spec["log_dir"],
        display="none",
    )
    wall = time.time() - started
    if log.status != "success":
        raise SystemExit(f"inspect eval ended {log.status}: {log.error}")
    samples = []
    for sample in log.samples:
        [score] = sample.scores.values()
        completed = dt.datetime.fromisoformat(sample.completed_at).timestamp()
        samples.append({**score.metadata, "completed": completed, "resolved": score.value == "C"})
    Path(out_path).write_text(json.dumps({"wall_s": wall, "samples": samples}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
