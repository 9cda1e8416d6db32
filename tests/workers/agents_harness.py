"""What the agent adapter tests share: real installs into a data root, an AgentRun, and a
sandboxed run through the metering proxy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from worker_harness import MeteringProxy, direct_env

from contracts.dataroot import DataRoot
from workers import runner, sandbox
from workers.agents import install
from workers.agents.base import Agent, AgentOutcome, AgentRun
from workers.spec import SandboxSpec


def installed(name: str, root: Path) -> install.Installed:
    """Install `name` into `root` for real (fast on a warm uv/npm cache); FAIL if it cannot."""
    try:
        return install.install(name, root)
    except install.InstallError as exc:
        pytest.fail(f"installing {name} failed (CI reaches PyPI and npm):\n{exc}", pytrace=False)


def agent_run(
    workspace: Path, artifacts: Path, *, endpoint: str, timeout_s: int = 600, model: str = "tiny"
) -> AgentRun:
    """An AgentRun with its artifacts folder ready, as the runner leaves it before `command()`."""
    run = AgentRun(
        workspace=workspace,
        prompt="Implement `add` in mathkit/basic.py so that tests/test_basic.py passes.",
        endpoint=endpoint,
        model=model,
        artifacts=artifacts,
        timeout_s=timeout_s,
        log=artifacts / "agent.log",
    )
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "prompt.txt").write_text(run.prompt)
    return run


def run_sandboxed(
    agent: Agent, run: AgentRun, proxy: MeteringProxy, root: DataRoot
) -> tuple[AgentOutcome, str]:
    """Run `agent` as `workers.runner.run_agent` runs a sandboxed spec: bubblewrap, the data
    root hidden, the metering proxy the only way out, a machine credential for the assignment
    named by the artifacts folder. Returns the outcome and the end of agent.log."""
    settings = proxy.settings
    box = SandboxSpec(
        proxy_host=settings.host,
        proxy_port=settings.proxy_port,
        memory_mb=4096,
        cpus=1.0,
        hidden=[root.root],  # as the scheduler hides it, the install folder shown again below
        read_only=[proxy.root.ca_cert, *agent.read_only_paths(root.root)],
    )
    credential = proxy.url_for(run.artifacts.name)
    ca = str(proxy.root.ca_cert)
    env = direct_env(
        HTTP_PROXY=credential,
        HTTPS_PROXY=credential,
        OPENAI_API_KEY="autovibe-machine-credential",
        SSL_CERT_FILE=ca,  # the CA bundle under each of the names the scheduler gives it
        REQUESTS_CA_BUNDLE=ca,
        NODE_EXTRA_CA_CERTS=ca,
    )
    log_path = run.artifacts / "agent.log"
    with sandbox.ProxyBridge(box) as bridge, log_path.open("wb") as log:
        argv = sandbox.bwrap_argv(
            box,
            agent.command(run),
            writable=[run.workspace, run.artifacts],
            workspace=run.workspace,
            socket=bridge.socket,
            timeout_s=run.timeout_s,
        )
        proc = subprocess.Popen(
            argv, cwd=run.workspace, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        timed_out = False
        try:
            proc.wait(timeout=run.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            runner.kill_group(proc.pid, proc)
    outcome = agent.collect(run, None if timed_out else proc.wait(), timed_out)
    return outcome, log_path.read_text(errors="replace")[-3000:]
