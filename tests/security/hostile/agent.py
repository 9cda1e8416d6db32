"""A hostile agent, run by the `command` adapter: `agent.py ATTACK [ARG…]`.

Each attack tries one way out of the sandbox and prints what it saw as one JSON line (the
runner keeps it in agent.log) and appends it to the transcript in $AUTOVIBE_OUTPUT.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def attempt(action: object) -> str:
    """'ok' or the error the attempt met."""
    try:
        action() if callable(action) else None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror}"
    return "ok"


def read(path: str) -> str:
    def go() -> None:
        p = Path(path)
        if p.is_dir():
            list(p.iterdir())
        else:
            p.read_bytes()

    return attempt(go)


def write(path: str) -> str:
    return attempt(lambda: Path(path).write_text('{"grade": {"status": "resolved"}}'))


def env(*secrets: str) -> dict[str, object]:
    text = "\n".join(f"{k}={v}" for k, v in os.environ.items())
    return {"names": sorted(os.environ), "leaked": [s for s in secrets if s in text]}


def files(*paths: str) -> dict[str, object]:
    return {path: read(path) for path in paths}


def control(*paths: str) -> dict[str, object]:
    return {path: write(path) for path in paths}


def symlink(target: str, *host_paths: str) -> dict[str, object]:
    out = Path(os.environ["AUTOVIBE_OUTPUT"]) / "transcript.jsonl"
    out.unlink(missing_ok=True)
    os.symlink(target, out)
    seen: dict[str, object] = {"planted": str(out)}
    for path in host_paths:
        seen[path] = attempt(lambda p=path: os.symlink(target, p))
    return seen


def kill(pid: str) -> dict[str, object]:
    return {"kill": attempt(lambda: os.kill(int(pid), signal.SIGKILL)), "uid": os.getuid()}


def identity(*paths: str) -> dict[str, object]:
    """Who the agent is inside and on the host; a file of its own; what it may read."""
    Path("mine.txt").write_text("the agent's\n")
    seen: dict[str, object] = {"uid": os.getuid(), "gid": os.getgid()}
    return seen | {path: read(path) for path in paths}


def forkbomb(fill_mb: str = "") -> dict[str, object]:
    """Fork until refused; the children sleep. With `fill_mb`, then fill the workspace with that
    many MiB and wait, children and all, for the runner to kill the sandbox."""
    children, error = 0, ""
    while children < 10_000:
        try:
            pid = os.fork()
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc.strerror}"
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children += 1
    if fill_mb:
        report({"children": children, "error": error, "filled": filled(".", fill_mb)})
        time.sleep(60)
    return {"children": children, "error": error}


def filled(folder: str, total_mb: str) -> dict[str, object]:
    """Write up to `total_mb` MiB of zeros under `folder`, in files of 8 MiB."""
    chunk = b"\0" * (1024 * 1024)
    written, error = 0, ""
    try:
        for i in range(int(total_mb)):
            with open(Path(folder) / f"fill-{i // 8}", "ab") as fh:
                fh.write(chunk)
            written += 1
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc.strerror}"
    return {"written_mb": written, "error": error}


def fill(folder: str, total_mb: str) -> dict[str, object]:
    report(filled(folder, total_mb))
    time.sleep(30)  # the runner's watchdog ends it, or the timeout
    return {}


def peek(path: str) -> str:
    """What the file holds (its start), or the error reading it met."""
    try:
        return Path(path).read_text(errors="replace")[:200]
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror}"


def listing(folder: Path) -> object:
    try:
        return sorted(os.listdir(folder))
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror}"


def forge(folder: Path) -> dict[str, str]:
    """A well-formed result and report that say the task is resolved, written into `folder`."""
    assignment = os.environ.get("AUTOVIBE_ASSIGNMENT", "")
    docs = {
        "result.json": {
            "assignment": assignment,
            "agent": {"exit_cause": "finished", "exit_code": 0},
            "grade": {"status": "resolved"},
        },
        "report.json": {"assignment": assignment, "resolved": True, "status": "resolved"},
    }
    return {
        str(folder / name): attempt(lambda p=folder / name, d=doc: p.write_text(json.dumps(d)))
        for name, doc in docs.items()
    }


def link(folder: Path, target: str, *names: str) -> dict[str, str]:
    """Each of `names` in `folder` replaced by a symlink to the host file `target`."""

    def plant(path: Path) -> None:
        if os.path.lexists(path):
            path.unlink()
        os.symlink(target, path)

    return {str(folder / n): attempt(lambda p=folder / n: plant(p)) for n in names}


def allow_cloud(*tops: Path) -> dict[str, object]:
    """Every routing.json found under `tops` rewritten, and one planted in each, allowing the
    cloud."""
    policy = json.dumps(
        {"pair": "tiny", "routing": {"allow_cloud": True, "cloud_model": "openai/gpt-4o-mini"}}
    )
    found = [
        str(Path(parent) / "routing.json")
        for top in tops
        for parent, _dirs, names in os.walk(top)
        if "routing.json" in names
    ]
    planted = [str(top / "routing.json") for top in tops]
    return {
        "found": found,
        "written": {p: attempt(lambda p=p: Path(p).write_text(policy)) for p in found + planted},
    }


def call(url: str, body: dict[str, object]) -> dict[str, object]:
    """POST `body` to `url` through the proxy of the environment: the status and answer."""
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return {"status": answer.status, "body": answer.read(2000).decode(errors="replace")}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read(2000).decode(errors="replace")}
    except OSError as exc:
        return {"status": None, "error": str(exc)}


def limits() -> dict[str, object]:
    """The limits this process runs under, as the kernel has them."""
    tmp = os.statvfs("/tmp")
    return {
        "processes": resource.getrlimit(resource.RLIMIT_NPROC)[0],
        "address_space": resource.getrlimit(resource.RLIMIT_AS)[0],
        "file_size": resource.getrlimit(resource.RLIMIT_FSIZE)[0],
        "tmp_bytes": tmp.f_blocks * tmp.f_frsize,
    }


def memory(total_mb: str) -> str:
    try:
        bytearray(int(total_mb) * 1024 * 1024)
    except MemoryError:
        return "MemoryError"
    return "ok"


def trial(sleeper: str, target: str, memory_mb: str, tmp_mb: str, *paths: str) -> dict[str, object]:
    """Every attack in one run, as a trial's agent (`test_hostile_trial`): forge a result and a
    report wherever it can write, replace its files by links to host file `target`, read its
    control files and `paths`, signal host process `sleeper`, allow itself the cloud, call the
    cloud through the proxy; then meet its limits (memory, /tmp, processes) and report all it
    saw. Last it fills its output folder past the workspace limit, until the runner kills it."""
    here, out = Path.cwd(), Path(os.environ["AUTOVIBE_OUTPUT"])
    artifacts = here.parent
    endpoint = os.environ["AUTOVIBE_MODEL_ENDPOINT"]
    seen: dict[str, object] = {"uid": os.getuid(), "environ": dict(os.environ)}
    read = [str(artifacts / n) for n in ("spec.json", "routing.json", "runner.env")]
    seen["read"] = {p: peek(p) for p in [*read, *paths]}
    seen["listed"] = {str(f): listing(f) for f in (artifacts, *artifacts.parents[:2])}
    seen["forged"] = {
        k: v for f in (here, out, Path("/tmp"), *here.parents) for k, v in forge(f).items()
    }
    seen["linked"] = link(out, target, "prompt.txt", "agent.log", "tests.log", "patch.diff") | link(
        artifacts, target, "agent.log", "tests.log", "runner.log"
    )
    seen["signal"] = kill(sleeper)
    seen["routing"] = allow_cloud(artifacts.parents[1], here, out, Path("/tmp"))
    question = {"model": "auto", "input": "Say hello from the cloud."}
    seen["cloud"] = {
        "auto": call(f"{endpoint}/responses", question),
        "provider": call(
            "http://api.openai.com/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]},
        ),
    }
    seen["limits"] = limits()
    seen["memory"] = memory(str(2 * int(memory_mb)))
    seen["tmp"] = filled("/tmp", str(2 * int(tmp_mb)))
    seen["processes"] = forkbomb()  # last but one: its children hold the processes left
    report(seen)
    fill(str(out), "32")
    return {}


def report(seen: dict[str, object]) -> None:
    line = json.dumps(seen)
    print(line, flush=True)
    out = os.environ.get("AUTOVIBE_OUTPUT")
    if out and not (Path(out) / "transcript.jsonl").is_symlink():
        with open(Path(out) / "transcript.jsonl", "a") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    attack, *args = sys.argv[1:]
    seen = globals()[attack](*args)
    if seen:
        report(seen)
