"""Real git servers on 127.0.0.1 for the tests of task repositories named by URL: `git daemon`
(git://) and `git http-backend` behind a small WSGI server (smart HTTP), both serving the bare
repositories under one folder, and a repository with a known bug and its fix."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from contracts.settings import free_port

CALC_BUG = "def add(a, b):\n    return a - b\n"
CALC_FIX = "def add(a, b):\n    return a + b\n"
TEST = "from calc import add\n\n\ndef test_add():\n    assert add(2, 2) == 4\n"
_GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **_GIT_ENV}
    argv = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(argv, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def instance_from_history(
    work: Path, base: dict[str, str], fix: dict[str, str], source: str, **fields: Any
) -> dict[str, Any]:
    """A SWE-bench instance (`fields` added) from a repository made at `work`: the `base` files
    committed, then the `fix` files; its `patch` is the fix's diff of `source`, its
    `test_patch` that of `tests`."""
    commits: list[str] = []
    for files, message in ((base, "base"), (fix, "fix")):
        for name, text in files.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_text(text)
        if not commits:
            git(work, "init", "-q", "--initial-branch=main")
        git(work, "add", "-A")
        git(work, "commit", "-qm", message)
        commits.append(git(work, "rev-parse", "HEAD").strip())
    first, last = commits
    return {
        "base_commit": first,
        "patch": git(work, "diff", first, last, "--", source),
        "test_patch": git(work, "diff", first, last, "--", "tests"),
        **fields,
    }


@dataclass(frozen=True)
class BugAndFix:
    served: Path
    """The folder the servers export; the bare repository is `calc.git` in it."""
    work: Path
    """A clone to make more commits in and push."""
    bug: str
    """The base commit: add() subtracts; tests/test_calc.py fails."""
    fix: str
    """The commit after it on main that fixes add()."""

    def push_commit(self, message: str) -> str:
        (self.work / "NEWS").write_text(message + "\n")
        git(self.work, "add", "NEWS")
        git(self.work, "commit", "-qm", message)
        git(self.work, "push", "-q", "origin", "main")
        return git(self.work, "rev-parse", "HEAD").strip()


def bug_and_fix(base: Path) -> BugAndFix:
    work = base / "work"
    (work / "tests").mkdir(parents=True)
    git(work, "init", "-q", "--initial-branch=main")
    (work / "calc.py").write_text(CALC_BUG)
    (work / "tests" / "test_calc.py").write_text(TEST)
    git(work, "add", "-A")
    git(work, "commit", "-qm", "add() is wrong")
    bug = git(work, "rev-parse", "HEAD").strip()
    git(work, "tag", "v1")
    (work / "calc.py").write_text(CALC_FIX)
    git(work, "commit", "-qam", "fix add()")
    fix = git(work, "rev-parse", "HEAD").strip()
    served = base / "served"
    served.mkdir()
    git(base, "clone", "-q", "--bare", str(work), str(served / "calc.git"))
    git(work, "remote", "add", "origin", str(served / "calc.git"))
    git(work, "fetch", "-q", "origin")
    return BugAndFix(served, work, bug, fix)


@contextmanager
def git_daemon(served: Path) -> Iterator[str]:
    """`git daemon` exporting `served`; yields its base URL (`git://127.0.0.1:PORT`)."""
    port = free_port()
    proc = subprocess.Popen(
        ["git", "daemon", "--reuseaddr", "--export-all", "--listen=127.0.0.1",
         f"--port={port}", f"--base-path={served}", "--informative-errors", str(served)],
        env={**os.environ, **_GIT_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_listening(port, proc)
        yield f"git://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def git_http(served: Path) -> Iterator[str]:
    """`git http-backend` (CGI) behind a WSGI server exporting `served`; yields its base URL
    (`http://127.0.0.1:PORT`)."""
    app = _HttpBackend(served)
    server = make_server("127.0.0.1", 0, app, WSGIServer, _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def hanging_http() -> Iterator[tuple[str, threading.Event]]:
    """A server on 127.0.0.1 that accepts connections and never answers: yields its base URL
    (`http://127.0.0.1:PORT`) and an event set once a client has connected and then closed."""
    listener = socket.create_server(("127.0.0.1", 0))
    closed = threading.Event()

    def hold() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                while conn.recv(65536):  # read the request, answer nothing, until EOF
                    pass
            closed.set()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", closed
    finally:
        listener.close()


class _HttpBackend:
    def __init__(self, served: Path) -> None:
        self.served = served

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        cgi_env = {
            **_GIT_ENV,
            "PATH": os.environ["PATH"],
            "GIT_PROJECT_ROOT": str(self.served),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": environ["REQUEST_METHOD"],
            "PATH_INFO": environ.get("PATH_INFO", ""),
            "QUERY_STRING": environ.get("QUERY_STRING", ""),
            "CONTENT_TYPE": environ.get("CONTENT_TYPE", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": "127.0.0.1",
            "GIT_PROTOCOL": environ.get("HTTP_GIT_PROTOCOL", ""),
        }
        out = subprocess.run(
            ["git", "http-backend"], input=body, env=cgi_env, capture_output=True, check=False
        ).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = "200 OK", []
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = value.strip()
            elif name:
                headers.append((name, value.strip()))
        start_response(status, headers)
        return [payload]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"git daemon exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"git daemon never listened on {port}")
