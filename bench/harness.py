"""What the harness itself costs per assignment, beside a peer and the floor, and how the
scheduler holds up with a fleet.

Overhead: N small tasks (one generated repo of a few hundred files with a ~1 s pytest suite;
N = 20), a scripted agent that makes one LLM call and applies a fixed edit, on 1, 2 and 4
machines. Three systems, taking turns within each repeat:

- `autovibe`: the real stack (`autovibe up` with the deterministic model server, the metering
  proxy, the API and its scheduler, the local driver, bubblewrap for the agent and again for
  the tests); the agent is the `command` adapter running AGENT_SCRIPT, whose one call goes
  through the proxy. Per assignment: from the scheduler marking it running to its ending being
  collected and posted, phases from the runner's `phases` timestamps.
- `inspect_ai`: Inspect AI with its `local` sandbox (a temporary folder, no isolation) and
  `mockllm/model`, the same repo, edit and test command (`bench/inspect_task.py`), in its own
  venv made once with uv under `$XDG_CACHE_HOME/autovibe/bench-inspect`, never a project
  dependency. Per sample: from its setup starting the copy to its completion.
- `floor`: copy the repo and run its tests once, nothing else.

Overhead = wall per assignment minus the agent's own time (the scripted agent's clock, from
before its call to after its edit). Fleet scale (`bench.fleet`): 1,000 queued assignments on
200 simulated machines.

    python -m bench.harness [--quick] [--no-inspect] [--no-fleet]
    python -m bench.harness --machines 1 --tasks 8 --systems autovibe --print-only

The second form measures one cell (for an A/B of a change) and prints its rows and phase
table without writing bench/results or docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bench import fleet
from bench.report import publish, table
from contracts.dataroot import DataRoot
from contracts.settings import Settings, free_port
from orchestrator import stack
from orchestrator.client import Client
from orchestrator.state import Assignment, Store, state_url
from workers.grading import test_env

ROOT = Path(__file__).resolve().parent.parent
INSPECT_VERSION = "0.3.285"
"""Pinned; installed only in the bench's own cached venv, never in the project's."""
MODULES = 300
TEST_SLEEP_S = 0.7
"""One test sleeps, so that the suite takes about a second (pytest's own start is the rest)."""
TEST_COMMAND = "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python -m pytest -q"
"""Plugin autoload off: the suite is the repo's, not the plugins this Python happens to have."""
FAIL_TO_PASS = "tests/test_core.py::test_add"
PASS_TO_PASS = ["tests/test_core.py::test_sub", "tests/test_modules.py::test_modules"]
EDIT_PATH, EDIT_OLD, EDIT_NEW = "calc/core.py", "return a - b  # add", "return a + b  # add"

AGENT_SCRIPT = f"""
import json, os, time, urllib.request
start = time.time()
prompt = open(os.environ["AUTOVIBE_PROMPT_FILE"]).read()
body = {{"model": os.environ["AUTOVIBE_MODEL"], "max_tokens": 16,
        "messages": [{{"role": "user", "content": prompt}}]}}
request = urllib.request.Request(
    os.environ["AUTOVIBE_MODEL_ENDPOINT"] + "/chat/completions", data=json.dumps(body).encode(),
    headers={{"Content-Type": "application/json",
             "Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]}})
urllib.request.urlopen(request, timeout=60).read()
text = open({EDIT_PATH!r}).read()
open({EDIT_PATH!r}, "w").write(text.replace({EDIT_OLD!r}, {EDIT_NEW!r}))
with open(os.path.join(os.environ["AUTOVIBE_OUTPUT"], "bench-agent.json"), "w") as out:
    json.dump({{"start": start, "end": time.time()}}, out)
"""
"""The scripted agent: one chat completion through the proxy (urllib reads HTTP_PROXY), then
the fixed edit; it times itself, since the agent's own time is what the overhead leaves out."""

PHASES = ("launch", "workspace", "sandbox", "agent", "patch", "grading", "report", "collection")


def make_repo(folder: Path, modules: int = MODULES) -> None:
    """A package of `modules` one-function modules, a bug in `calc.core.add`, and a pytest
    suite of about a second that imports every module."""
    (folder / "calc").mkdir(parents=True)
    (folder / "tests").mkdir()
    (folder / "data").mkdir()
    (folder / "conftest.py").write_text("")  # pytest puts the repo root on sys.path
    (folder / "README.md").write_text("# calc\n\nA generated repo for `python -m bench.harness`.\n")
    (folder / "calc" / "__init__.py").write_text("")
    for i in range(modules):
        (folder / "calc" / f"m{i:03d}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    for i in range(modules // 6):
        (folder / "data" / f"d{i:03d}.json").write_text(json.dumps({"i": i}) + "\n")
    (folder / "calc" / "core.py").write_text(
        f"def add(a, b):\n    {EDIT_OLD}\n\n\ndef sub(a, b):\n    return a - b\n"
    )
    (folder / "tests" / "test_core.py").write_text(
        "from calc.core import add, sub\n\n\n"
        "def test_add():\n    assert add(2, 3) == 5\n\n\n"
        "def test_sub():\n    assert sub(2, 3) == -1\n"
    )
    (folder / "tests" / "test_modules.py").write_text(
        "import importlib\nimport time\n\n\n"
        "def test_modules():\n"
        f"    for i in range({modules}):\n"
        '        module = importlib.import_module(f"calc.m{i:03d}")\n'
        '        assert getattr(module, f"f{i}")(1) == 1 + i\n'
        f"    time.sleep({TEST_SLEEP_S})\n"
    )


def _quantile(values: list[float], q: int) -> float:
    """The q-th percentile (q in 1..99), inclusive method; the value itself when alone."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# -- the floor ---------------------------------------------------------------------------------


def floor_run(repo: Path, work: Path, n: int, machines: int) -> dict[str, Any]:
    """Copy the repo and run its tests, `machines` at a time; nothing else."""
    home = tempfile.mkdtemp(prefix="home-", dir=work)
    env = test_env(home)
    argv = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items())]

    def one(i: int) -> dict[str, float]:
        start = time.time()
        workspace = work / f"floor-{machines}-{i}"
        shutil.copytree(repo, workspace, symlinks=True)
        subprocess.run(
            [*argv, "/bin/sh", "-c", TEST_COMMAND],
            cwd=workspace,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        end = time.time()
        shutil.rmtree(workspace)
        return {"wall": end - start, "agent": 0.0}

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=machines) as pool:
        records = list(pool.map(one, range(n)))
    return {"wall_s": time.perf_counter() - started, "records": records}


# -- autovibe ------------------------------------------------------------------------------------


def _epoch(moment: dt.datetime | None) -> float:
    assert moment is not None
    return moment.replace(tzinfo=dt.UTC).timestamp()


def autovibe_run(settings: Settings, repo: Path, n: int, machines: int) -> dict[str, Any]:
    """One trial of `n` assignments on `machines` machines through the control API."""
    tasks = [
        {
            "id": f"t{i:02d}",
            "repo": str(repo),
            "prompt": "Make calc.core.add add.",
            "test_command": TEST_COMMAND,
            "fail_to_pass": [FAIL_TO_PASS],
            "pass_to_pass": PASS_TO_PASS,
            "timeout_s": 300,
            "agent_command": ["python3", "-c", AGENT_SCRIPT],
        }
        for i in range(n)
    ]
    config = {
        "name": f"harness-{machines}-{time.time_ns()}",
        "project": "bench",
        "budget": {"amount": 100, "currency": "CAD", "period": "once"},
        "machines": {"count": machines, "daily_allowance": 100},
        "agents": ["command"],
        "model_pairs": ["tiny"],
        "tasks": tasks,
        # The judge is an LLM call of its own, and the peer has none: left out of both.
        "confidence": {"enabled": False},
    }
    client = Client(settings)
    started = time.perf_counter()
    trial_id = client.submit(config)["id"]
    for _ in client.events(trial_id):
        pass
    wall = time.perf_counter() - started
    root = DataRoot.at(settings.data)
    records = []
    store = Store(state_url(settings))
    with store.session() as s:
        rows = list(s.scalars(select(Assignment).where(Assignment.trial_id == trial_id)))
        for a in rows:
            ending = a.ending
            if a.status != "resolved" or ending.started is None or ending.finished is None:
                raise RuntimeError(f"{a.id} ended {a.state}/{a.status}: {ending.to_json()}")
            agent_file = root.assignment_dir("bench", trial_id, a.id) / "output/bench-agent.json"
            agent = json.loads(agent_file.read_text())
            ph = ending.phases
            launched, collected = _epoch(a.started_at), _epoch(a.finished_at)
            phases = {
                "launch": ending.started - launched,
                "workspace": ph["workspace"] - ending.started,
                "sandbox": (agent["start"] - ph["workspace"]) + (ph["agent_end"] - agent["end"]),
                "agent": agent["end"] - agent["start"],
                "patch": ph["patch"] - ph["agent_end"],
                "grading": ph["graded"] - ph["patch"],
                "report": ending.finished - ph["graded"],
                "collection": collected - ending.finished,
            }
            records.append(
                {"wall": collected - launched, "agent": phases["agent"], "phases": phases}
            )
    store.engine.dispose()
    return {"wall_s": wall, "records": records}


# -- Inspect AI ---------------------------------------------------------------------------------


def inspect_home() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "autovibe" / "bench-inspect"


def inspect_python() -> tuple[Path | None, str]:
    """The Python of the bench's own Inspect venv, made once; (None, why) when it cannot be."""
    home = inspect_home()
    python, stamp = home / "bin" / "python", home / "installed"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == INSPECT_VERSION:
        return python, ""
    uv = shutil.which("uv")
    if uv is None:
        return None, "uv is not installed, so the bench cannot make Inspect AI's venv"
    print(f"installing inspect-ai=={INSPECT_VERSION} into {home} (once)", file=sys.stderr)
    shutil.rmtree(home, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT")}
    try:
        for argv in (
            [uv, "venv", "--quiet", "--python", sys.executable, str(home)],
            [uv, "pip", "install", "--quiet", "--python", str(python),
             f"inspect-ai=={INSPECT_VERSION}"],
        ):  # fmt: skip
            subprocess.run(argv, check=True, env=env, timeout=1800, capture_output=True)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return None, f"installing inspect-ai=={INSPECT_VERSION} failed: {exc} {detail[-300:]!r}"
    stamp.write_text(INSPECT_VERSION + "\n")
    return python, ""


def inspect_run(python: Path, repo: Path, work: Path, n: int, machines: int) -> dict[str, Any]:
    """The same `n` assignments as Inspect AI samples, `machines` at a time."""
    spec = {
        "repo": str(repo),
        "samples": n,
        "machines": machines,
        "log_dir": str(work / f"inspect-logs-{machines}-{time.time_ns()}"),
        "test_command": TEST_COMMAND,
        # The test command sees what autovibe's grading gives it: `python` is this Python.
        "test_env": test_env(tempfile.mkdtemp(prefix="home-", dir=work)),
        "edit_path": EDIT_PATH,
        "edit_old": EDIT_OLD,
        "edit_new": EDIT_NEW,
        "fail_to_pass": FAIL_TO_PASS,
    }
    spec_path, out_path = work / "inspect-spec.json", work / "inspect-out.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["INSPECT_LOG_LEVEL"] = "warning"
    subprocess.run(
        [str(python), str(ROOT / "bench" / "inspect_task.py"), str(spec_path), str(out_path)],
        check=True,
        env=env,
        cwd=work,
        timeout=1800,
    )
    out = json.loads(out_path.read_text())
    records = []
    for sample in out["samples"]:
        if not sample["resolved"]:
            raise RuntimeError(f"inspect sample not resolved: {sample}")
        agent = sample["agent_end"] - sample["agent_start"]
        records.append({"wall": sample["completed"] - sample["admitted"], "agent": agent})
    return {"wall_s": out["wall_s"], "records": records}


# -- figures ----------------------------------------------------------------------------------


def summarize(run: dict[str, Any], n: int) -> dict[str, float]:
    overheads = [r["wall"] - r["agent"] for r in run["records"]]
    return {
        "assignments_per_min": 60 * n / run["wall_s"],
        "overhead_p50_s": statistics.median(overheads),
        "overhead_p90_s": _quantile(overheads, 90),
        "agent_p50_s": statistics.median(r["agent"] for r in run["records"]),
    }


def median_cells(cells: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(c[k] for c in cells) for k in cells[0]}


def overhead_rows(
    runs: dict[tuple[str, int], list[dict[str, Any]]], n: int, machines: tuple[int, ...]
) -> list[dict[str, Any]]:
    """One row per system and machine count: medians over repeats; a ratio is the median of
    the per-repeat ratios of p50 overheads."""
    rows = []
    for m in machines:
        per_repeat = {s: [summarize(r, n) for r in runs[(s, m)]] for s, m2 in runs if m2 == m}
        for system, cells in per_repeat.items():
            row: dict[str, Any] = {"system": system, "machines": m, "repeats": len(cells)}
            row.update({k: round(v, 3) for k, v in median_cells(cells).items()})
            for base in ("floor", "inspect_ai"):
                if base in per_repeat and base != system:
                    ratios = [
                        c["overhead_p50_s"] / b["overhead_p50_s"]
                        for c, b in zip(cells, per_repeat[base], strict=False)
                    ]
                    row[f"vs_{base}"] = round(statistics.median(ratios), 2)
            rows.append(row)
    return rows


def phase_rows(runs: dict[tuple[str, int], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """autovibe's overhead by phase: the median over all its assignments at each machine count."""
    rows = []
    for (system, m), repeats in sorted(runs.items()):
        if system != "autovibe":
            continue
        records = [r for run in repeats for r in run["records"]]
        row: dict[str, Any] = {"machines": m, "assignments": len(records)}
        for phase in PHASES:
            row[f"{phase}_p50_s"] = round(statistics.median(r["phases"][phase] for r in records), 3)
        row["wall_p50_s"] = round(statistics.median(r["wall"] for r in records), 3)
        rows.append(row)
    return rows


SYSTEMS = ("autovibe", "floor", "inspect_ai")


def measure_overhead(
    work: Path,
    n: int,
    machines: tuple[int, ...],
    repeats: int,
    systems: tuple[str, ...] = SYSTEMS,
) -> tuple[dict[tuple[str, int], list[dict[str, Any]]], str, list[float]]:
    """Every system of `systems` at every machine count, `repeats` times, systems taking turns
    (their order rotating) within each repeat; (runs by (system, machines), why Inspect is
    missing, the load average before each cell)."""
    python, why_not = (None, "not asked for (--no-inspect)")
    if "inspect_ai" in systems:
        python, why_not = inspect_python()
    data = work / "data"
    settings = Settings(
        data=data,
        configs=ROOT / "configs",
        api_port=free_port(),
        proxy_port=free_port(),
        model_port=free_port(),
        model_server="deterministic",
    )
    repo = data / "tasks" / "calc"  # under the server's task roots
    make_repo(repo)
    taking = [s for s in systems if s != "inspect_ai" or python is not None]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    loads: list[float] = []
    stack.up(settings)
    try:
        for repeat in range(repeats):
            for m in machines:
                shift = (repeat + m) % len(taking)
                for system in taking[shift:] + taking[:shift]:
                    print(f"repeat {repeat + 1}/{repeats}: {system}, {m} machines", file=sys.stderr)
                    loads.append(round(os.getloadavg()[0], 2))
                    if system == "autovibe":
                        run = autovibe_run(settings, repo, n, m)
                    elif system == "floor":
                        run = floor_run(repo, work, n, m)
                    else:
                        assert python is not None
                        run = inspect_run(python, repo, work, n, m)
                    runs.setdefault((system, m), []).append(run)
    finally:
        stack.down(settings)
    return runs, "" if python is not None else why_not, loads


def goals(rows: list[dict[str, Any]], fleet_rows: list[dict[str, Any]]) -> str:
    """The issue's goals, met or missed, from the figures of this run."""
    lines = []
    for row in (r for r in rows if r["system"] == "autovibe"):
        floor, peer = row.get("vs_floor"), row.get("vs_inspect_ai")
        verdicts = []
        if floor is not None:
            met = "met" if floor <= 1.5 else "missed"
            verdicts.append(f"{floor}x the floor ({met}, goal 1.5x)")
        if peer is not None:
            met = "met" if peer < 1 else "missed"
            verdicts.append(f"{peer}x Inspect AI's ({met}, goal < 1x)")
        lines.append(f"- {row['machines']} machine(s): overhead " + "; ".join(verdicts))
    for row in (r for r in fleet_rows if r["state_db"] == "sqlite"):
        met = "met" if row["tick_p99_ms"] < 100 else "missed"
        lines.append(
            f"- fleet on SQLite, {row['assignments']} queued / {row['machines']} running: tick "
            f"p99 {row['tick_p99_ms']} ms ({met}, goal < 100 ms)"
        )
    return "\n".join(lines)


WHERE_THE_TIME_GOES = """Where the time goes. Per assignment, over the floor (phase table): `launch`
(the tick's starts run side by side on a kept pool of threads, each writing the spec, the
credential and the routing policy whole with an fsync; then two tmux clients and the runner's
Python, whose imports, pydantic and the contracts' models above all, are most of it), `sandbox`
(the bridge's socat on the host; as root, `workers.sandbox_user` run as `python -I -S` with the
standard library alone; bubblewrap; inside, prlimit and a few lines of sh that start the socat
on the sandbox's loopback, no interpreter before the agent's own, whose start the scripted
agent's clock does not cover), `workspace` (the copy, a file created per file of the task, and
the baseline, whose blobs go into one pack, so that the agent's .git is a copy of a few files),
and `collection` (the runner ends without the interpreter's teardown once result.json is
written, the scheduler hears it through a pidfd and collects at once; then usage and VM time
posted to the ledger). The grading step is about the floor itself: the test run in its own
offline sandbox, started the same way as the agent's (no interpreter before the tests).
What would close the gap further: a runner that is already running (a pre-started worker per
machine taking specs, instead of tmux and a fresh Python per assignment, about 0.15-0.2 s), no
fsync for files the runner reads at once and that need no durability (spec.json, runner.env),
and a workspace that is not copied file by file (an overlay over the task's tree: this ext4 has
no reflinks, and a hardlink would let the agent, who owns its workspace, write into the task).
Below Inspect AI looks out of reach with two sandboxes: Inspect runs everything in one process
with no isolation (its `local` sandbox is a temporary folder), so its overhead is about the
floor, which autovibe's grading step alone costs.
Since `make setup` compiles the environment's bytecode (13610f6), no process of any of the
three compiles what it imports (the venv had almost no .pyc files and PYTHONDONTWRITEBYTECODE
kept every process from writing them): at 1 machine the floor went from 1.22 to 0.98 s,
Inspect AI's overhead from 1.31 to 1.04 s and autovibe's from 1.65 to 1.43 s. autovibe's own
phases (launch, sandbox, workspace: ~0.45 s) did not shrink with it, so they are a larger
multiple of the smaller floor (1.35/1.45/1.34x before, 1.47/1.51/1.52x now).

The tick: starts run on the pool (their fsyncs overlap and the journal commits them together),
the revocation list is read incrementally, and a trial's endings and starts are recorded in one
write transaction per tick (one commit, was two; the spend is posted before it, runners launched
after it; a tick that fails before its commit records nothing and the next collects the same
endings, posting them once). `_collect` reads id, attempts and machine of the running rows only
(the free machines follow from them), `_maybe_finish` counts assignments by state instead of
reading all of them, a trial's config is read once, and `GET /v1/trials/{id}` selects the
columns it lists and parses each stored ending in one step. In a cProfile run (1,000
assignments, 200 machines, SQLite, a loaded machine) the time in ticks went from 12.7 s to 5.5 s
per run (73.6 s before the tick pool). Most of what the slowest ticks still wait for is their
launches' files reaching the disk (the routing policy and the spec, each with an fsync)."""


def notes_for(
    n: int,
    repeats: int,
    load: list[float],
    inspect_missing: str,
    rows: list[dict[str, Any]],
    phases: list[dict[str, Any]],
    fleet_rows: list[dict[str, Any]],
) -> str:
    return f"""
{n} tasks of one generated repo ({MODULES} modules and {MODULES // 6} data files, a pytest
suite of ~1 s that imports every module), a scripted agent making one LLM call and a fixed
edit; `machines` assignments at a time. Each cell ran {repeats} time(s), the systems taking
turns within a repeat; figures are medians over repeats, `vs_*` the median of the per-repeat
ratios of `overhead_p50_s`. Overhead = wall per assignment minus the agent's own time
(`agent_p50_s`, the scripted agent's clock around its call and edit). The test command is
`{TEST_COMMAND}` in all three (plugin autoload off, so the suite is the repo's, not that of
the plugins installed beside pytest). The machine is shared: its 1-minute load average,
read before each cell, went from {load[0]} to {load[1]}.

- `autovibe`: the stack as `autovibe up` starts it (deterministic model server, metering proxy,
  API with its scheduler ticking every 0.5 s, local driver in tmux); the `command` agent in
  bubblewrap, its call through the proxy; the tests in a second, offline bubblewrap sandbox.
  Wall = the scheduler marking the assignment running to its ending collected and its spend
  posted. The confidence judge is off (an LLM call the peer does not make).
- `inspect_ai`: Inspect AI {INSPECT_VERSION}, `local` sandbox (a temporary folder, no
  isolation), `mockllm/model` (its answer carries its usage: without one mockllm counts tokens
  with tiktoken, whose table is downloaded, and there is no network here), the same repo copied
  in the sample's setup, the same edit, the same test command, environment and interpreter in
  the scorer; `max_samples` = `max_sandboxes` = machines. Wall = the setup starting the copy
  to the sample's completion.
  {("Not measured in this run: " + inspect_missing) if inspect_missing else ""}
- `floor`: copy the repo and run its tests once (its overhead is its wall).

Goals (issue 22):

{goals(rows, fleet_rows)}

autovibe's overhead by phase (medians over every assignment, seconds): `launch` = the tick
marking it running to the runner's first line (spec, credential, tmux, the runner's Python
start and imports); `workspace` = copy and git baseline; `sandbox` = the agent's bubblewrap
(bridge, `workers.sandbox_user`, prlimit and sh, the agent's own Python start) up to the
agent's first line plus its teardown;
`agent` = the scripted agent; `patch` = the diff and the tests restored; `grading` = the
offline sandbox and the test run; `report` = redaction and report.json; `collection` = the
runner's end to the ending recorded (the next tick, usage and VM time posted to the ledger).

{table(phases)}

{fleet.notes(fleet_rows)}

{WHERE_THE_TIME_GOES}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="4 tasks, 1 and 2 machines, once")
    parser.add_argument("--no-inspect", action="store_true", help="leave out Inspect AI")
    parser.add_argument("--no-fleet", action="store_true", help="leave out the fleet scale")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--machines", help="machine counts measured, e.g. 1 or 1,2 (1,2,4)")
    parser.add_argument("--tasks", type=int, default=None, help="assignments per cell (20)")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"systems measured ({','.join(SYSTEMS)})"
    )
    parser.add_argument(
        "--print-only",
        action="store_true",
        help="print the rows and phase table; write neither bench/results nor the docs",
    )
    parser.add_argument(
        "--notes-only",
        action="store_true",
        help="measure nothing: write the section again from bench/results/harness.json",
    )
    args = parser.parse_args()
    if args.notes_only:
        saved = json.loads((ROOT / "bench" / "results" / "harness.json").read_text())
        rows, phases, fleet_rows = saved["rows"], saved["phases"], saved["fleet"]
        n, repeats, inspect_missing = saved["tasks"], saved["repeats"], saved["inspect_missing"]
        command, load = saved["command"], saved["load_1min"]
    else:
        machines: tuple[int, ...] = (1, 2) if args.quick else (1, 2, 4)
        n = args.tasks or (4 if args.quick else 20)
        if args.machines:
            machines = tuple(int(m) for m in args.machines.split(","))
        repeats = args.repeats or (1 if args.quick else 3)
        systems = tuple(s for s in args.systems.split(",") if s)
        unknown = set(systems) - set(SYSTEMS)
        if unknown:
            parser.error(f"--systems: unknown {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
        if args.no_inspect:
            systems = tuple(s for s in systems if s != "inspect_ai")
        with tempfile.TemporaryDirectory(prefix="autovibe-bench-harness-") as tmp:
            runs, inspect_missing, loads = measure_overhead(
                Path(tmp), n, machines, repeats, systems
            )
        load = [min(loads), max(loads)]
        rows = overhead_rows(runs, n, machines)
        phases = phase_rows(runs)
        if args.print_only:
            print(table(rows) + "\n\n" + table(phases))
            return
        fleet_rows = [] if args.no_fleet else fleet.measure(quick=args.quick)
        command = "python -m bench.harness" + (" --quick" if args.quick else "")
    extra = {
        "tasks": n,
        "repeats": repeats,
        "inspect_missing": inspect_missing,
        "load_1min": load,
        "phases": phases,
        "fleet": fleet_rows,
    }
    notes = notes_for(n, repeats, load, inspect_missing, rows, phases, fleet_rows)
    publish("harness", command, rows, notes, extra=extra)
    for row in rows + phases + fleet_rows:
        print(row)


if __name__ == "__main__":
    main()
