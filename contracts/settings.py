"""Process-wide settings: where the data root is and which ports the services listen on."""

from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent

SEPARATED = {
    "task_roots": os.pathsep,
    "egress_allow": ",",
    "egress_tcp_allow": ",",
    "webhook_allow": ",",
    "repo_allow": ",",
    "nomad_node_pools": ",",
    "nomad_datacenters": ",",
}
"""List settings written as one separated string in the environment (like PATH), not JSON."""
SANDBOX_HOST_UID = 99999
"""Default host uid (and gid) of sandboxed agents and tests when the platform runs as root."""


class Settings(BaseSettings):
    """Read from `AUTOVIBE_*` environment variables; defaults run everything on one machine."""

    model_config = SettingsConfigDict(env_prefix="AUTOVIBE_", extra="ignore")

    data: Path = Field(default=Path("var"), description="Data root (`$AUTOVIBE_DATA`).")
    """Data root; every file the platform writes lives below it."""
    configs: Path = PROJECT_ROOT / "configs"
    """Folder holding models.yaml, prices.yaml and the trial schema."""
    host: str = "127.0.0.1"
    """Address every embedded service binds to."""
    api_port: int = 8400
    """Control API (FastAPI)."""
    proxy_port: int = 8080
    """Metering proxy (mitmdump)."""
    proxy_metrics_port: int = 0
    """Port of the proxy's Prometheus endpoint (`autovibe_metrics_port`); 0 serves none."""
    proxy_transparent_port: int = 0
    """Port of the proxy's transparent listener for `sandbox.network: transparent`; 0 = none."""
    proxy_dns_port: int = 0
    """Port of the proxy's DNS listener (mitmproxy `dns` mode) that resolves names for workers in
    transparent mode (`workers.netns` sends their port-53 traffic there); 0 = none."""
    model_port: int = 8500
    """CPU model server (llama.cpp)."""
    model_server: str = "llamacpp"
    """The CPU model server `autovibe up` starts when `model_replicas` is 0: `llamacpp` (the
    tiny GGUF on llama.cpp) or `deterministic` (`serving.deterministic`: scripted answers in
    OpenAI's wire format, no model; for tests where the model's words do not matter)."""
    model_replicas: int = 0
    """Ray Serve replicas of the CPU model server (`serving.rayserve_cpu`); 0 = bare llama.cpp."""
    local_queue_wait_s: float | None = Field(default=None, ge=0)
    """Seconds a call to the local model plane may be in flight before the plane counts as
    saturated and a request for `auto` goes to the trial's cloud model, when the trial allows
    one (the proxy's `autovibe_local_queue_wait_s`); unset: `auto` never leaves a busy plane."""
    local_health_s: float | None = Field(default=None, ge=0)
    """Seconds what the proxy saw of the local model plane (a call's outcome, a probe of
    `/v1/models`) holds before a request for `auto` with a cloud model to fall back on probes it
    again (`autovibe_local_health_s`); 0: probe for each such request; unset: the proxy's
    default (2 s)."""
    model_restarts: int = Field(default=3, ge=0)
    """Times the scheduler restarts a model server of `autovibe up` that died, per API process;
    each restart is logged and shown on the active trials' event streams."""
    state_url: str | None = None
    """SQLAlchemy URL of the state DB; SQLite in the data root when unset."""
    budget_store: str = "sqlite"
    """Budget counter store shared by orchestrator and proxy: `sqlite` (data root) or `redis`."""
    budget_redis_url: str | None = None
    """redis://host:port/db when `budget_store` is `redis`."""
    traffic_store: str = "sqlite"
    """Where the indexer (`python -m traffic.indexer`) keeps the spool searchable: `sqlite` (data
    root) or `elasticsearch`."""
    elasticsearch_url: str | None = None
    """http[s]://[user:password@]host:port of Elasticsearch, for `traffic_store` `elasticsearch`."""
    index_body_max: int | None = None
    """Bytes of each body kept in the traffic store; None: the store's default
    (`traffic.sqlite_store.DEFAULT_BODY_MAX`)."""
    index_interval_s: float = 1.0
    """Seconds between the indexer's catch-ups; the store trails the spool by about this much."""
    index_nice: int = 10
    """Added to `python -m traffic.indexer`'s nice value: indexing is batch work behind the spool,
    so on a busy machine it takes the CPU the proxy and the agents leave (its lag grows under
    load and is caught up after); 0 keeps it at the proxy's priority."""
    intake_config: Path | None = None
    """YAML file of the intake channels (`contracts.intake.IntakeConfig`: GitHub issue queue, …);
    none configured when unset."""
    cors_origins: list[str] = []
    """Origins a browser may call the control API from (exact origins; `*` is refused)."""
    rate_limit_machine: int = 10
    """Control-API requests per minute per `machine` token."""
    rate_limit_viewer: int = 300
    """Control-API requests per minute per `viewer` token."""
    rate_limit_operator: int = 300
    """Control-API requests per minute per `operator` token."""
    rate_limit_admin: int = 1200
    """Control-API requests per minute per `admin` token."""

    # -- what a trial may ask for: the server decides, a trial file only chooses among it ------
    task_roots: Annotated[list[Path], NoDecode] = []
    """Folders a trial's `tasks[].repo` must lie in (symlinks resolved), os.pathsep-separated;
    empty: the repository's `examples/` and `<data root>/tasks`."""
    sandbox_uid: int = Field(default=SANDBOX_HOST_UID, gt=0)
    """Host uid and gid that sandboxed agents and tests run as when the worker runs as root
    (`$AUTOVIBE_SANDBOX_UID`); pick one no account and no file on the host uses."""
    allow_unsandboxed: bool = False
    """Whether a trial may ask for `sandbox.kind: none` (its agent then runs as a plain
    subprocess of this host); off by default."""
    egress_allow: Annotated[list[str], NoDecode] = []
    """Hosts a worker may reach through the proxy besides the model plane and the providers
    (comma-separated `host`, `host:port`, `*.suffix[:port]`, `address` or `CIDR[:port]`; no port:
    any port), e.g. a package registry for agents that install dependencies. The proxy host's
    own service ports stay unreachable whatever is listed."""
    egress_tcp_allow: Annotated[list[str], NoDecode] = []
    """`host:port` a worker may reach with raw TCP (not HTTP or TLS); none by default."""
    webhook_allow: Annotated[list[str], NoDecode] = []
    """Host names or CIDRs (comma-separated) a budget webhook may reach although they are
    loopback, link-local, private or this host's own; every other such address is refused."""
    repo_allow: Annotated[list[str], NoDecode] = []
    """Host names or CIDRs (comma-separated) a task's git URL may name although they are
    loopback, link-local, private or this host's own (a company's git server); every other
    such address is refused at submission."""
    nomad_address: str | None = None
    """Nomad HTTP API of the `nomad` driver (`NOMAD_ADDR` when unset)."""
    nomad_namespace: str | None = None
    """Namespace of the worker jobs (`NOMAD_NAMESPACE`, else `default`)."""
    nomad_region: str | None = None
    """Region of the worker jobs (`NOMAD_REGION`, else `global`)."""
    nomad_token_env: str = "NOMAD_TOKEN"
    """Environment variable of the orchestrator that holds the Nomad ACL token."""
    nomad_jobs: dict[str, str] = {}
    """Parameterized job ID per agent (JSON); `autovibe-worker-<agent>` when not listed."""
    nomad_python: str = "python3"
    """Interpreter on the Nomad clients that has autovibe installed (runs `workers.runner`)."""
    nomad_node_pools: Annotated[list[str], NoDecode] = ["default"]
    """Node pools a trial may name (comma-separated); the first is used when it names none."""
    nomad_datacenters: Annotated[list[str], NoDecode] = ["*"]
    """Datacenters the worker jobs run in (comma-separated); a trial may name a subset of
    them, or any datacenter when `*` is listed."""

    @field_validator(*SEPARATED, mode="before")
    @classmethod
    def _split(cls, value: Any, info: Any) -> Any:
        if isinstance(value, str):
            return [
                part.strip() for part in value.split(SEPARATED[info.field_name]) if part.strip()
            ]
        return value

    @property
    def allowed_task_roots(self) -> list[Path]:
        """The task roots, resolved (symlinks followed), defaults filled in."""
        roots = self.task_roots or [PROJECT_ROOT / "examples", self.data / "tasks"]
        return [Path(r).resolve() for r in roots]

    @property
    def private_task_folders(self) -> list[Path]:
        """Folders under the data root's `tasks/` no trial may name as its repo: the git
        mirrors and the trees exported from them (`contracts.dataroot`). Not `tasks/sources/`:
        its repositories hold an imported task's workspace files and nothing more, and its
        trials name them."""
        tasks = self.data / "tasks"
        return [(tasks / "mirrors").resolve(), (tasks / "trees").resolve()]

    @property
    def rate_limits(self) -> dict[str, int]:
        """Requests per minute by token scope."""
        return {
            "machine": self.rate_limit_machine,
            "viewer": self.rate_limit_viewer,
            "operator": self.rate_limit_operator,
            "admin": self.rate_limit_admin,
        }

    def as_env(self) -> dict[str, str]:
        """These settings as AUTOVIBE_* variables, for the processes a stack starts."""
        env = {
            # Lists and maps travel as JSON, the form pydantic-settings reads them back in,
            # except the few written like PATH.
            f"AUTOVIBE_{k.upper()}": SEPARATED[k].join(map(str, v))
            if k in SEPARATED
            else json.dumps(v)
            if isinstance(v, list | dict)
            else str(v)
            for k, v in self.model_dump(mode="json").items()
            if v is not None
        }
        env["AUTOVIBE_DATA"] = str(self.data.resolve())
        return env

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    @property
    def model_url(self) -> str:
        return f"http://{self.host}:{self.model_port}/v1"

    @property
    def proxy_url(self) -> str:
        return f"http://{self.host}:{self.proxy_port}"


FREE_PORTS = range(20000, 30000)
"""Where `free_port` picks: below the kernel's ephemeral range (32768-60999 unless the host's
net.ipv4.ip_local_port_range says otherwise), from which every bind to port 0 and every
outgoing connection draw, so no such socket takes a picked port before its server binds it (seen
in the suite: a stand-in bound to port 0 got the API's port); below Ray Serve's direct-ingress
ports (30000-31000)."""

_handed_out: set[int] = set()
"""The ports this process's `free_port` returned: never twice (a stack's three are distinct)."""


def ephemeral_ports() -> range:
    """The kernel's ephemeral port range (net.ipv4.ip_local_port_range)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now and not handed out before, for stacks started beside
    another (tests, bench); from FREE_PORTS unless the host's ephemeral range covers them."""
    ephemeral = ephemeral_ports()
    quiet = FREE_PORTS.stop <= ephemeral.start or FREE_PORTS.start >= ephemeral.stop
    for candidate in random.sample(FREE_PORTS, 64) if quiet else []:
        if candidate in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, candidate))
            except OSError:
                continue
        _handed_out.add(candidate)
        return candidate
    with socket.socket() as sock:  # the kernel's choice
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
