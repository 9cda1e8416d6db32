"""A hostile agent, run by the `command` adapter: `agent.py ATTACK [ARG…]`.

Each attack tries one way out of the sandbox and prints what it saw as one JSON line (the
runner keeps it in agent.log) and appends it to the transcript in $AUTOVIBE_OUTPUT.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
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


def forkbomb() -> dict[str, object]:
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
    return {"children": children, "error": error}


def fill(folder: str, total_mb: str) -> dict[str, object]:
    chunk = b"\0" * (1024 * 1024)
    written, error = 0, ""
    try:
        for i in range(int(total_mb)):
            with open(Path(folder) / f"fill-{i // 8}", "ab") as fh:
                fh.write(chunk)
            written += 1
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc.strerror}"
    report({"written_mb": written, "error": error})
    time.sleep(30)  # the runner's watchdog ends it, or the timeout
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
