"""A hostile task: the task's own conftest.py attacks the host while its tests grade an agent.

Tasks come from untrusted sources (GitHub issues, other people's benchmarks), and grading runs
the task's test surface as the task has it. The real runner (`workers.runner.run`, a secret
in its environment, bubblewrap, the grading sandbox) grades a task whose tests/conftest.py, at
collection, tries to read a host file and the data root's secrets, write on the host,
reach a server listening on the host's loopback, and reports what it saw in the workspace.
Grading runs in a fresh sandbox without network as an unprivileged host user, so each attempt
fails and the tests still run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import textwrap
import uuid
from pathlib import Path

import pytest

from contracts.dataroot import DataRoot
from contracts.settings import PROJECT_ROOT, SANDBOX_HOST_UID, free_port
from tests.security.spec_harness import plain_spec
from workers import runner, sandbox
from workers.spec import SandboxSpec

SECRET = "orchestrator-secret-" + uuid.uuid4().hex[:8]
ATTACK = """
import json, os, pathlib, socket

seen = {{"uid": os.getuid(), "env": dict(os.environ), "read": [], "connected": []}}
for path in ({secret!r}, {admin!r}, "/etc/shadow", "/root/.bashrc"):
    try:
        seen["read"].append(pathlib.Path(path).read_text())
    except OSError:
        pass
for marker in {markers!r}:
    try:
        pathlib.Path(marker).write_text("escaped")  # the private /tmp takes what is under /tmp
    except OSError:
        pass
for host in ("127.0.0.1", {host_ip!r}):
    try:
        socket.create_connection((host, {port}), timeout=0.5).close()
        seen["connected"].append(host)
    except OSError:
        pass
pathlib.Path("PROBE.json").write_text(json.dumps(seen))
"""


def host_address() -> str:
    """This host's address on its default route (reachable from any network namespace that
    has a route out), or loopback when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def test_a_tasks_conftest_reaches_nothing_of_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox.require_tools()
    root = DataRoot.at(tmp_path / "data")
    DataRoot.ensure(root.secrets)
    admin = root.secrets / "admin-token"
    admin.write_text("vault-admin-" + uuid.uuid4().hex)
    secret = tmp_path / "host-secret.txt"
    secret.write_text(SECRET)
    # Host folders the test can write: one under /tmp, one outside it.
    outside = Path("/var/tmp") / f"autovibe-hostile-task-{uuid.uuid4().hex[:8]}"
    outside.mkdir()
    markers = [tmp_path / "host-marker", outside / "host-marker"]
    listener = socket.create_server(("0.0.0.0", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    repo = tmp_path / "task"
    shutil.copytree(PROJECT_ROOT / "examples" / "mathkit", repo)
    attack = ATTACK.format(
        secret=str(secret),
        admin=str(admin),
        markers=[str(m) for m in markers],
        host_ip=host_address(),
        port=port,
    )
    (repo / "tests" / "conftest.py").write_text(textwrap.dedent(attack))
    artifacts = DataRoot.ensure(root.assignment_dir("p1", "t1", "a-task"))
    spec = plain_spec(
        "a-task",
        artifacts,
        repo,
        task_id="hostile-task",
        prompt="do nothing",
        fail_to_pass=["tests/test_basic.py::test_add"],
        pass_to_pass=["tests/test_basic.py::test_subtract"],
        agent="command",
        agent_command=["true"],
        data_root=root.root,
        sandbox=SandboxSpec(
            proxy_host="127.0.0.1",
            proxy_port=free_port(),
            memory_mb=1024,
            cpus=1.0,
            hidden=[root.root],
        ),
    )
    monkeypatch.setenv("AUTOVIBE_TEST_SECRET", SECRET)  # in the runner's own environment
    try:
        runner.run(spec)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing from the sandbox ever connected
    finally:
        listener.close()
        written = [m for m in markers if m.exists()]
        shutil.rmtree(outside)
    probe = spec.workspace / "PROBE.json"
    tests_log = (artifacts / "tests.log").read_text(errors="replace")
    assert probe.exists(), tests_log  # the task's conftest did run, in the grading sandbox
    seen = json.loads(probe.read_text())
    assert seen["read"] == [] and seen["connected"] == []
    assert written == []
    assert SECRET not in json.dumps(seen["env"]) and not any(
        k.startswith("AUTOVIBE_") for k in seen["env"]
    )
    assert seen["uid"] != 0
    owner = probe.stat().st_uid  # on the host, what the tests wrote is the sandbox user's
    assert owner == (SANDBOX_HOST_UID if os.geteuid() == 0 else os.geteuid())
    # The tests still graded the (empty) attempt for real: test_subtract passes, add fails.
    report = json.loads((artifacts / "report.json").read_text())
    assert report["tests_status"]["PASS_TO_PASS"]["success"] == [
        "tests/test_basic.py::test_subtract"
    ], tests_log
