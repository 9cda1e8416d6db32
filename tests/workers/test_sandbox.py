"""The agent sandbox, for real: bubblewrap, socat, the metering proxy and the model server.

Every test runs a probe agent (a Python snippet, given as the prompt) through the runner's
`run_agent`, exactly as an assignment's agent runs, and reads what it printed.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from worker_harness import PROXY_VARS, MeteringProxy, ModelServer

from common.processes import cmdline, descendants, pids, runs
from contracts.settings import PROJECT_ROOT, free_port
from workers import grading, sandbox, sandbox_init
from workers.agents import AGENTS
from workers.agents.base import AgentOutcome
from workers.runner import run_agent
from workers.spec import AssignmentSpec, SandboxSpec


@pytest.fixture(autouse=True)
def probe_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    # A missing tool must fail these tests, naming the Debian package, never skip them.
    sandbox.require_tools()
    monkeypatch.setitem(AGENTS, "probe", "worker_harness:ScriptAgent")
    for var in PROXY_VARS:  # only what the spec sets reaches the agent
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)


Probe = Callable[..., tuple[AgentOutcome, dict[str, Any], str]]


@pytest.fixture
def probe(tmp_path: Path) -> Probe:
    """probe(code, proxy_port=, env=, timeout_s=, memory_mb=, hidden=) -> outcome, JSON, log.

    `code` is run sandboxed; the last JSON object it printed (one line) is returned parsed.
    """

    def run(
        code: str,
        *,
        proxy_port: int | None = None,
        env: dict[str, str] | None = None,
        timeout_s: int = 60,
        memory_mb: int = 1024,
        hidden: list[Path] | None = None,
        assignment: str = "a-sandbox",
    ) -> tuple[AgentOutcome, dict[str, Any], str]:
        artifacts = tmp_path / "artifacts"
        (artifacts / "workspace").mkdir(parents=True)
        spec = AssignmentSpec(
            assignment=assignment,
            project="p1",
            trial="t1",
            machine="m1",
            task_id="probe",
            repo=tmp_path,
            prompt=textwrap.dedent(code),
            test_command="true",
            fail_to_pass=["x"],
            pass_to_pass=[],
            timeout_s=timeout_s,
            agent="probe",
            model="tiny",
            endpoint="http://127.0.0.1:1/v1",
            env=env or {},
            artifacts=artifacts,
            sandbox=SandboxSpec(
                proxy_host="127.0.0.1",
                proxy_port=proxy_port or free_port(),
                memory_mb=memory_mb,
                cpus=1.0,
                hidden=hidden or [],
            ),
        )
        outcome = run_agent(spec)
        log = (artifacts / "agent.log").read_text()
        printed: dict[str, Any] = {}
        for line in log.splitlines():
            if line.startswith("{"):
                printed = json.loads(line)
        return outcome, printed, log

    return run


def test_only_the_proxy_is_reachable_and_it_meters_the_call(
    probe: Probe, metering_proxy: MeteringProxy, deterministic_model: ModelServer
) -> None:
    proxy = metering_proxy.url_for("a-sandbox-net")
    model_port = deterministic_model.settings.model_port
    outcome, seen, log = probe(
        f"""
        import json, socket, httpx
        seen = {{}}
        for name, address in [("model", ("127.0.0.1", {model_port})), ("host", ("1.1.1.1", 80))]:
            try:
                socket.create_connection(address, timeout=3).close()
                seen[name] = "connected"
            except OSError as exc:
                seen[name] = type(exc).__name__
        body = {{"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 4}}
        reply = httpx.post("{deterministic_model.url}/completions", json=body, timeout=120)
        seen["proxied"] = reply.status_code
        print(json.dumps(seen))
        """,
        proxy_port=metering_proxy.settings.proxy_port,
        env={"HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": "", "no_proxy": ""},
        assignment="a-sandbox-net",
    )

    assert outcome.exit_cause == "finished", log
    assert seen["model"] == "ConnectionRefusedError"  # the sandbox's own, empty loopback
    assert seen["host"] == "OSError"  # no route at all: ENETUNREACH
    assert seen["proxied"] == 200
    records = metering_proxy.spooled("a-sandbox-net")
    assert len(records) == 1
    assert records[0].usage is not None and records[0].usage.completion_tokens > 0


def test_the_host_is_read_only_and_the_workspace_writable(probe: Probe, tmp_path: Path) -> None:
    secret_root = tmp_path / "data-root"
    (secret_root / "vault-secrets").mkdir(parents=True)
    (secret_root / "vault-secrets" / "key").write_text("s3cret")
    outcome, seen, log = probe(
        f"""
        import json, os
        seen = {{}}
        for name, path in [("project", "{PROJECT_ROOT}/sandbox-probe"), ("etc", "/etc/probe"),
                           ("workspace", "written.txt"), ("tmp", "/tmp/probe")]:
            try:
                with open(path, "w") as fh:
                    fh.write("x")
                seen[name] = "written"
            except OSError as exc:
                seen[name] = exc.strerror
        seen["secrets"] = os.path.exists("{secret_root}/vault-secrets/key")
        print(json.dumps(seen))
        """,
        hidden=[secret_root],
    )

    assert outcome.exit_cause == "finished", log
    assert seen == {
        "project": "Read-only file system",
        "etc": "Read-only file system",
        "workspace": "written",
        "tmp": "written",
        "secrets": False,
    }
    assert (tmp_path / "artifacts" / "workspace" / "written.txt").read_text() == "x"
    assert not (PROJECT_ROOT / "sandbox-probe").exists()
    assert not Path("/tmp/probe").exists()  # its /tmp was its own


def test_the_agent_has_its_own_pid_namespace(probe: Probe) -> None:
    outcome, seen, log = probe(
        """
        import json, os
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        commands = [open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace") for p in pids]
        print(json.dumps({"me": os.getpid(), "pids": pids, "commands": commands}))
        """
    )

    assert outcome.exit_cause == "finished", log
    assert seen["me"] == 2  # after bubblewrap's init
    # That init, the agent, the loopback end of the proxy bridge: nothing of the host.
    assert seen["pids"] == [1, 2, 3]
    this_test = Path("/proc/self/cmdline").read_bytes().decode(errors="replace")
    assert this_test not in seen["commands"]


def test_a_process_allocating_more_than_memory_mb_dies(probe: Probe) -> None:
    outcome, seen, log = probe(
        """
        import json
        small = bytearray(64 * 2**20)
        print(json.dumps({"small": len(small)}), flush=True)
        big = bytearray(512 * 2**20)
        print(json.dumps({"big": len(big)}))
        """,
        memory_mb=256,
    )

    assert outcome.exit_cause == "crashed"
    assert seen == {"small": 64 * 2**20}  # the last line it got to print
    assert "MemoryError" in log


def test_the_limits_are_hard_and_cannot_be_raised(probe: Probe) -> None:
    outcome, seen, log = probe(
        """
        import json, resource
        seen = {}
        for name in ("AS", "CPU", "NPROC", "FSIZE"):
            which = getattr(resource, "RLIMIT_" + name)
            seen[name] = resource.getrlimit(which)
            try:
                resource.setrlimit(which, (seen[name][0], resource.RLIM_INFINITY))
                seen[name + "_raised"] = True
            except (ValueError, OSError):
                seen[name + "_raised"] = False
        print(json.dumps(seen))
        """,
        memory_mb=512,
        timeout_s=30,
    )

    assert outcome.exit_cause == "finished", log
    box = SandboxSpec(proxy_host="127.0.0.1", proxy_port=1, memory_mb=512, cpus=1.0)
    expected = {
        "AS": 512 * 2**20,
        "CPU": sandbox.cpu_seconds(box, 30),
        "NPROC": box.processes,
        "FSIZE": box.workspace_mb * 2**20,
    }
    assert {k: seen[k] for k in expected} == {k: [v, v] for k, v in expected.items()}
    assert not any(seen[k + "_raised"] for k in expected), seen


def test_a_bridge_that_cannot_listen_ends_the_sandbox_before_the_agent(probe: Probe) -> None:
    # Port 80 inside: binding it needs a capability the sandbox does not have.
    outcome, _, log = probe("print('never runs')", proxy_port=80)

    assert outcome.exit_code == sandbox_init.EXIT_NO_BRIDGE, log
    assert "sandbox proxy bridge on 127.0.0.1:80 did not start" in log
    assert "never runs" not in log


def test_a_timeout_kills_the_whole_sandbox_and_the_bridge(
    probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = f"sandbox-escapee-{uuid.uuid4().hex}"
    port = free_port()
    # This run's temporary folders (the bridge's among them) in a folder of its own: the shared
    # /tmp also holds the bridges of sandboxes the other xdist worker starts meanwhile.
    own_tmp = Path(tempfile.mkdtemp(prefix="avtmp-"))  # short: the bridge's socket is inside
    monkeypatch.setattr(tempfile, "tempdir", str(own_tmp))
    started = time.monotonic()
    outcome, _, log = probe(
        f"""
        import subprocess, sys, time
        # A child in a session of its own is out of reach of the runner's process-group kill.
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "{marker}"],
                         start_new_session=True)
        print("started", flush=True)
        time.sleep(300)
        """,
        proxy_port=port,
        timeout_s=2,
    )

    assert outcome.exit_cause == "timeout", log
    assert "started" in log
    assert time.monotonic() - started < 15
    leftovers = [
        cmd
        for cmd in _command_lines()
        if marker in cmd or f"TCP-LISTEN:{port}," in cmd or f"TCP:127.0.0.1:{port}" in cmd
    ]
    assert leftovers == []
    assert list(own_tmp.glob("autovibe-bridge-*")) == []
    shutil.rmtree(own_tmp)


def test_without_bubblewrap_the_run_fails_naming_the_package(
    probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap socat"):
        probe("print('never runs')")


SLEEPERS = "for i in $(seq 100); do sleep 300 & done; echo ready; wait"
"""A sandbox's command that leaves 100 processes behind it, as a fork bomb's children."""


def _offline_spec(tmp_path: Path, processes: int = 512) -> AssignmentSpec:
    artifacts = tmp_path / "artifacts"
    (artifacts / "workspace").mkdir(parents=True)
    return AssignmentSpec(
        assignment=f"a-end-{uuid.uuid4().hex[:6]}", project="p1", trial="t1", machine="m1",
        task_id="end", repo=tmp_path, prompt="", test_command="true", fail_to_pass=["x"],
        pass_to_pass=[], timeout_s=60, agent="probe", model="tiny",
        endpoint="http://127.0.0.1:1/v1", env={}, artifacts=artifacts,
        sandbox=SandboxSpec(
            proxy_host="127.0.0.1", proxy_port=1, memory_mb=1024, cpus=1.0, processes=processes
        ),
    )  # fmt: skip


@pytest.mark.parametrize("cgroup", [True, False], ids=["pids-cgroup", "no-cgroup"])
def test_ending_a_sandbox_returns_once_none_of_its_processes_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cgroup: bool
) -> None:
    if not cgroup:  # as for a user who is not root: no pids hierarchy to write
        monkeypatch.setattr(sandbox, "PIDS_CGROUPS", ())
    elif sandbox._pids_hierarchy() is None:
        pytest.skip("no writable pids hierarchy here")
    spec = _offline_spec(tmp_path)
    with sandbox.confine_offline(spec, ["/bin/sh", "-c", SLEEPERS], {}) as confined:
        assert (confined.limit.folder is not None) == cgroup
        proc = subprocess.Popen(
            confined.argv,
            env=confined.env,
            pass_fds=confined.pass_fds,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        inside = descendants(proc.pid)
        ended = sandbox.end(proc, confined)
        running = [pid for pid in inside if runs(pid)]
        assert confined.started()
        assert confined.limit.members() == []
    assert len(inside) > 100
    assert ended == sandbox.Ended(killed=ended.killed, left=0) and ended.killed > 100
    assert running == []  # when `end` returned, not some time later
    proc.stdout.close()


def test_the_grading_sandbox_has_a_pids_cgroup_of_its_own(tmp_path: Path) -> None:
    if sandbox._pids_hierarchy() is None:
        pytest.skip("no writable pids hierarchy here")
    spec = _offline_spec(tmp_path)
    with (
        sandbox.confine(spec, ["true"], {}) as agent,
        sandbox.confine_offline(spec, ["true"], {}) as tests,
    ):
        assert agent.limit.folder is not None and tests.limit.folder is not None
        assert agent.limit.folder != tests.limit.folder
        assert (tests.limit.folder / "pids.current").read_text().strip() == "0"
    assert not agent.limit.folder.exists() and not tests.limit.folder.exists()


def test_cgroup_kill_empties_a_cgroup_v2(tmp_path: Path) -> None:
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    unified = [Path(line.split()[1]) for line in mounts if line.split()[2] == "cgroup2"]
    if not unified or not os.access(unified[0], os.W_OK):
        pytest.skip("no writable cgroup v2 hierarchy here")
    folder = unified[0] / f"autovibe-test-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        limit = sandbox.ProcessLimit(folder)
        proc = subprocess.Popen(
            [*limit.prefix, "/bin/sh", "-c", "sleep 300 & sleep 300 & echo ready; wait"],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        assert len(limit.members()) == 3
        killed, left = limit.kill(time.monotonic() + 5)
        assert len(killed) == 3 and left == [] and limit.members() == []
        assert proc.wait() == -signal.SIGKILL
        proc.stdout.close()
    finally:
        folder.rmdir()


def test_a_sandbox_that_cannot_start_is_said_so(tmp_path: Path) -> None:
    if sandbox._pids_hierarchy() is None:
        pytest.skip("no pids cgroup to fill")
    # One process allowed: bubblewrap cannot make the sandbox's namespaces.
    spec = _offline_spec(tmp_path, processes=1)
    confine = functools.partial(sandbox.confine_offline, spec)
    log = tmp_path / "tests.log"
    with pytest.raises(sandbox.SandboxFailed, match="Creating new namespace failed"):
        grading.run_logged(spec.workspace, "echo ran", timeout_s=30, log=log, confine=confine)
    assert "ran" not in log.read_text()


def _command_lines() -> list[str]:
    return [cmdline(pid) for pid in pids()]
