"""No secret on a command line, no credential in a file others can read (issue 17, finding 8).

Real: mitmdump started as the stack starts it (`mitmdump_argv`, the settings in its
environment) against a redis-server that requires a password, and the local driver starting a
runner in a tmux session with a secret in the orchestrator's environment and a machine
credential in the spec. While they start and run, a watcher reads every /proc/*/cmdline over
and over; afterwards every file under the data root that holds a secret must be 0600 and the
data root 0700.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from common.processes import cmdline, descendants, pids, stop
from contracts.dataroot import DataRoot
from contracts.settings import PROJECT_ROOT, Settings, free_port
from proxy.launch import mitmdump_argv, wait_ready
from workers import operator
from workers.local import LocalDriver
from workers.spec import AssignmentSpec, SandboxSpec

REDIS_PASSWORD = "redis-pw-7f3a9c"
ES_PASSWORD = "elastic-pw-51be0d"
ORCHESTRATOR_SECRET = "vault-secret-id-0c4e2a"
MACHINE_CREDENTIAL = "machine-cred-9d81f7"


class CommandLineWatch:
    """Reads every process's command line until stopped; `seen` holds those with a secret."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = secrets
        self.seen: set[str] = set()
        self.lines: set[str] = set()
        """Every command line read, for secrets known only afterwards (a minted credential)."""
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CommandLineWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in pids():
                try:
                    line = cmdline(pid)
                except OSError:
                    continue  # ended while read
                self.lines.add(line)
                if any(secret in line for secret in self.secrets):
                    self.seen.add(line)
            self.rounds += 1


def readable_by_others(root: Path, secrets: list[str]) -> list[str]:
    """Files under `root` that hold a secret and that anyone but their owner may read."""
    exposed = []
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        mode = path.stat().st_mode
        if mode & 0o077 and any(s.encode() in path.read_bytes() for s in secrets):
            exposed.append(f"{path.relative_to(root)} {stat.filemode(mode)}")
    return exposed


@pytest.fixture
def redis_with_password() -> Iterator[int]:
    """redis-server requiring REDIS_PASSWORD, configured on stdin (`redis-server -`): its own
    command line holds no password either."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (apt-get install redis-server)"
    port = free_port()
    config = f"port {port}\nbind 127.0.0.1\nsave ''\nappendonly no\nrequirepass {REDIS_PASSWORD}\n"
    process = subprocess.Popen(
        [binary, "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdin is not None
    process.stdin.write(config.encode())
    process.stdin.close()
    try:
        wait_ready("127.0.0.1", port, timeout=10, process=process)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.slow
def test_the_proxy_reads_its_store_passwords_from_its_environment(
    tmp_path: Path, redis_with_password: int
) -> None:
    settings = Settings(
        data=tmp_path / "data",
        configs=PROJECT_ROOT / "configs",
        host="127.0.0.1",
        proxy_port=free_port(),
        budget_store="redis",
        budget_redis_url=f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_with_password}/0",
        elasticsearch_url=f"http://elastic:{ES_PASSWORD}@127.0.0.1:9",
    )
    root = DataRoot.at(settings.data)
    DataRoot.ensure(root.root)
    secrets = [REDIS_PASSWORD, ES_PASSWORD]
    argv = mitmdump_argv(settings)
    assert not [arg for arg in argv if any(s in arg for s in secrets)]
    with CommandLineWatch(secrets) as watch, (root.root / "mitmdump.log").open("wb") as log:
        # As `autovibe up` starts it: the settings in the environment.
        proxy = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **settings.as_env()}
        )
        try:
            wait_ready(settings.host, settings.proxy_port, timeout=60, process=proxy)
            environ = Path(f"/proc/{proxy.pid}/environ").read_bytes()
            assert REDIS_PASSWORD.encode() in environ  # the way it travels now
            # The budget addon opened the store with the password: the proxy meters into it.
            counters = _redis_keys(redis_with_password)
            assert counters is not None
        finally:
            stop(proxy)
    assert watch.rounds > 0
    assert watch.seen == set()
    assert readable_by_others(root.root, secrets) == []
    assert stat.S_IMODE(root.root.stat().st_mode) == 0o700


def _redis_keys(port: int) -> bytes | None:
    """The answer to an authenticated PING: the password works, so the proxy could use it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"AUTH {REDIS_PASSWORD}\r\nPING\r\n".encode())
        time.sleep(0.2)
        answer = sock.recv(100)
    assert answer == b"+OK\r\n+PONG\r\n", answer
    return answer


@pytest.fixture
def own_tmux(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A tmux server of this test's own (TMUX_TMPDIR)."""
    assert shutil.which("tmux"), "tmux not found: install the Debian package tmux"
    short = Path(tempfile.mkdtemp(prefix="tmx"))  # the socket path must stay under 108 bytes
    monkeypatch.setenv("TMUX_TMPDIR", str(short))
    monkeypatch.delenv("TMUX", raising=False)
    yield short
    subprocess.run(operator.tmux("kill-server"), capture_output=True)
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A model endpoint that accepts and never answers: the agent waits, the runner lives."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        yield f"http://127.0.0.1:{silent.getsockname()[1]}/v1"


def test_the_local_driver_passes_secrets_only_through_files_only_its_user_reads(
    tmp_path: Path,
    own_tmux: Path,
    silent_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AUTOVIBE_PROBE_SECRET", ORCHESTRATOR_SECRET)
    root = DataRoot.at(tmp_path / "data")
    DataRoot.ensure(root.root)  # as Platform.from_settings makes it
    artifacts = root.assignment_dir("demo", "t1", "t1-001")
    DataRoot.ensure(artifacts)
    proxy = f"http://m1:{MACHINE_CREDENTIAL}@127.0.0.1:9"
    spec = AssignmentSpec(
        assignment="t1-001",
        project="demo",
        trial="t1",
        machine="m1",
        task_id="mathkit",
        repo=PROJECT_ROOT / "examples" / "mathkit",
        prompt="fill in the stubs",
        test_command="true",
        fail_to_pass=[],
        pass_to_pass=[],
        timeout_s=120,
        agent="builtin",
        model="tiny",
        endpoint=silent_endpoint,
        env={"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy},
        artifacts=artifacts,
        data_root=root.root,
        # Sandboxed, as a trial's agents are: bubblewrap's and the bridge's argv are watched too.
        sandbox=SandboxSpec(
            proxy_host="127.0.0.1",
            proxy_port=free_port(),
            memory_mb=2048,
            cpus=1.0,
            hidden=[root.root],
        ),
    )
    secrets = [ORCHESTRATOR_SECRET, MACHINE_CREDENTIAL]
    driver = LocalDriver()
    assert driver.tmux
    with CommandLineWatch(secrets) as watch:
        driver.launch(spec)
        try:
            pid = int(spec.lock_path.read_text())
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert f"AUTOVIBE_PROBE_SECRET={ORCHESTRATOR_SECRET}".encode() in environ
            deadline = time.monotonic() + 30  # the runner prepares the workspace, starts the agent
            while not _agent_started(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _agent_started(pid), (artifacts / "runner.log").read_text(errors="replace")
            assert not (artifacts / "runner.env").exists()  # read once, then deleted
            exposed = readable_by_others(root.root, secrets)
        finally:
            driver.cancel(spec)
    assert watch.rounds > 0
    assert watch.seen == set()
    assert exposed == []
    # Nothing the agent can read holds the orchestrator's secret.
    for folder in (spec.workspace, spec.output):
        held = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
        assert not [p for p in held if ORCHESTRATOR_SECRET.encode() in p.read_bytes()]
    assert stat.S_IMODE((artifacts / "spec.json").stat().st_mode) == 0o600
    for folder in (root.root, artifacts.parent, artifacts):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def _agent_started(runner: int) -> bool:
    """Whether bubblewrap runs under the runner (its agent started in the sandbox)."""
    return any(
        os.path.basename(cmdline(pid).split(" ", 1)[0]) == "bwrap" for pid in descendants(runner)
    )


def test_the_compose_redis_takes_its_password_on_stdin(tmp_path: Path) -> None:
    """docker-compose.yml's redis command, run as written (the secret file and the port
    swapped for this host's): the password is required and is on no command line."""
    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
    script = compose["services"]["redis"]["command"][-1].replace("$$", "$")
    secret = tmp_path / "redis_password"
    secret.write_text(REDIS_PASSWORD + "\n")
    port = free_port()
    script = script.replace("/run/secrets/redis_password", str(secret)).replace(
        "appendonly yes", f"appendonly no\\nport {port}\\nbind 127.0.0.1\\ndir {tmp_path}"
    )
    with CommandLineWatch([REDIS_PASSWORD]) as watch:
        server = subprocess.Popen(["sh", "-c", script], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", port)) == 0:
                        break
                assert time.monotonic() < deadline, "redis did not start"
                time.sleep(0.05)
            ask = ["redis-cli", "-p", str(port), "ping"]
            refused = subprocess.run(ask, capture_output=True, text=True, check=False)
            allowed = subprocess.run(
                ask,
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, "REDISCLI_AUTH": REDIS_PASSWORD},
            )
        finally:
            stop(server)
    assert "NOAUTH" in refused.stdout + refused.stderr
    assert allowed.stdout.strip() == "PONG"
    assert watch.rounds > 0 and not watch.seen, watch.seen
