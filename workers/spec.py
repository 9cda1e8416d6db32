"""What the orchestrator hands a worker: one assignment, self-contained, as JSON on disk."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from contracts.dataroot import read_untrusted
from contracts.settings import SANDBOX_HOST_UID

if TYPE_CHECKING:  # a runner reads its spec without the trial config's models (~0.15 s)
    from contracts.config import Task


class SandboxSpec(BaseModel):
    """How the agent is confined (bubblewrap, `workers.sandbox`); the proxy is its only way out."""

    proxy_host: str
    """Where the metering proxy listens on the worker's host; the bridge connects there."""
    proxy_port: int
    """Proxy port; inside the sandbox the same port on 127.0.0.1 leads to the proxy."""
    memory_mb: int
    """Address-space limit of every process in the sandbox (RLIMIT_AS)."""
    cpus: float
    """CPU share; enforced as a CPU-time limit of cpus x timeout_s per process (RLIMIT_CPU)."""
    processes: int = 512
    """Most processes (and threads) alive in the sandbox at once: a pids cgroup, RLIMIT_NPROC."""
    tmp_mb: int = 1024
    """Size of the sandbox's private /tmp (a tmpfs, in memory)."""
    workspace_mb: int = 4096
    """Most the workspace and output folder may hold together: the runner kills the agent past
    it; no single file may grow beyond it (RLIMIT_FSIZE)."""
    hidden: list[Path] = Field(default_factory=list)
    """Host folders replaced by an empty one inside (the data root: secrets, other runs)."""
    read_only: list[Path] = Field(default_factory=list)
    """Paths shown read-only again after hiding (the proxy's CA certificate)."""
    network: Literal["proxy", "transparent"] = "proxy"
    """`proxy`: the proxy bridged onto the sandbox's loopback; `transparent`: the sandbox runs in
    a network namespace whose TCP is redirected to the proxy's transparent listener."""
    transparent_port: int | None = None
    """The proxy's transparent listener (`--mode transparent@PORT`); needed for `transparent`."""
    dns_port: int | None = None
    """The proxy's DNS listener (`--mode dns@PORT`) for `transparent` workers; None: no names."""
    rootfs: Path | None = None
    """A task environment's root (`workers.environments`), shown read-only in place of the
    host's system folders; set by the runner once it is built. None: the host's."""
    host_uid: int = Field(default=SANDBOX_HOST_UID, gt=0)
    """Host uid and gid bubblewrap runs as when the runner is root (`workers.sandbox_user`):
    the sandbox's uid maps to it. From the server's settings, never from a trial."""


class AssignmentSpec(BaseModel):
    assignment: str
    project: str
    trial: str
    machine: str
    task_id: str
    repo: Path
    prompt: str
    """Full prompt, budget preamble first."""
    test_command: str
    fail_to_pass: list[str]
    pass_to_pass: list[str]
    test_patch: str | None = None
    """Applied after the agent, before the tests (SWE-bench's `test_patch`); never shown to it."""
    parser: str | None = None
    """How the test output is read (`workers.grading.read_statuses`); None: pytest's summary;
    `harbor`: the verifier's reward, `test_patch` then creating its /tests folder."""
    environment: list[str] | None = None
    """Debian packages of the task's environment (`workers.environments`); None: the host's
    system folders."""
    setup: list[str] | None = None
    """The task's setup commands (`workers.setups`): run once over `repo`, whose result the
    workspace is copied from; None: `repo` as it is."""
    setup_env: dict[str, str] | None = None
    """The setup commands' way out (`orchestrator.setup_access`): the proxy variables, with a
    credential of machine `setup` that allows the operator's registries, and the proxy's CA
    certificate. None: the setup runs with no network."""
    workdir: str | None = None
    """Where the workspace also appears inside the sandboxes, and where the agent and the tests
    start (a Harbor task's `/app`); None: at its own path only."""
    timeout_s: int
    agent: str
    agent_command: list[str] = Field(default_factory=list)
    """argv of the `command` agent (the task's `agent_command`), checked at submission."""
    model: str
    endpoint: str
    env: dict[str, str]
    """Worker environment: proxy with machine credential, CA bundle, model endpoint."""
    artifacts: Path
    """The assignment's folder under worker-artifacts/<project>/<trial>/<assignment>/: the
    runner's control files and logs, which the sandbox cannot see, and its `workspace/` and
    `output/`, the only parts the agent sees."""
    data_root: Path | None = None
    """The data root agents are installed under (`<data>/agents/<name>/`); None: $AUTOVIBE_DATA."""
    sandbox: SandboxSpec | None = None
    """Run the agent sandboxed; None runs it as a plain subprocess."""

    @property
    def workspace(self) -> Path:
        return self.artifacts / "workspace"

    @property
    def output(self) -> Path:
        """The agent's output folder (transcripts): with the workspace, all it may write."""
        return self.artifacts / "output"

    @property
    def result_path(self) -> Path:
        return self.artifacts / "result.json"

    @property
    def lock_path(self) -> Path:
        return self.artifacts / "runner.lock"


SPEC_LIMIT = 4 * 1024 * 1024
"""Most bytes read of a spec.json (a task's prompt and test patch are its large parts)."""


def read_spec(artifacts: Path) -> AssignmentSpec:
    """The spec.json of an assignment folder, which runners on other machines (Nomad, VMs)
    write into too: never through a symlink, at most `SPEC_LIMIT` bytes, validated; `OSError`
    or `ValueError` (pydantic's) with the reason."""
    raw = read_untrusted(artifacts / "spec.json", artifacts, SPEC_LIMIT)
    return AssignmentSpec.model_validate_json(raw)


def task_fields(task: Task) -> dict[str, Any]:
    """The fields of an assignment's spec taken from its task as they are: how it is tested
    and graded, where it runs, how long it may take (the scheduler and `tasks validate` build
    their specs on them)."""
    return {
        "task_id": task.id,
        "test_command": task.test_command,
        "fail_to_pass": task.fail_to_pass,
        "pass_to_pass": task.pass_to_pass,
        "test_patch": task.test_patch,
        "parser": task.parser,
        "workdir": task.workdir,
        "environment": (task.environment.packages or None) if task.environment else None,
        "setup": (task.environment.setup or None) if task.environment else None,
        "timeout_s": task.timeout_s,
    }
