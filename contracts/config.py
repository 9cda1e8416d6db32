"""The trial config and the model/price catalogues, as Pydantic models.

A trial file is YAML; `load_trial` reports a bad one as `file:line: field.path: message`, naming
the allowed values. Which agents and model pairs exist is not known here: callers pass them in
the validation context (`{"agents": [...], "models": ModelChoices, ...}`), so the lists come
from the planes that own them.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import re
import shutil
import urllib.parse
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from contracts.egress import parse_rules, uncovered
from contracts.harbor import HARBOR_PARSER, HARBOR_TEST
from contracts.outbound import REPO_ALLOW_SETTING, AddressRefused, Allowlist, check_url

Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
Money = Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=6)]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$")]


def _known(context_key: str, what: str) -> AfterValidator:
    """Check a name against the list the caller put in the validation context."""

    def check(value: str, info: ValidationInfo) -> str:
        known: Iterable[str] | None = (info.context or {}).get(context_key)
        if known is not None and value not in known:
            raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(sorted(known))}")
        return value

    return AfterValidator(check)


class ModelChoices(Protocol):
    """What the server lets a trial name in `model_pairs` (`orchestrator.catalog` builds it
    from its catalogues, secret store and model plane; the validation context's `models`)."""

    def refusal(self, model: str, agents: list[str]) -> str | None:
        """Why the trial cannot run `model` with `agents`, naming the model; None: it can."""
        ...


def _runnable(value: str, info: ValidationInfo) -> str:
    choices: ModelChoices | None = (info.context or {}).get("models")
    if choices is not None:
        why = choices.refusal(value, list(info.data.get("agents") or []))
        if why is not None:
            raise ValueError(why)
    return value


AgentName = Annotated[str, _known("agents", "agent")]
PairName = Annotated[str, _known("pairs", "model pair"), AfterValidator(_runnable)]
"""A local pair (`tiny`, `7b:thinking`) or a provider's model (`anthropic/claude-sonnet-4-5`)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _sorted_unique(value: list[float]) -> list[float]:
    if len(set(value)) != len(value):
        raise ValueError("each fraction may appear once")
    return sorted(value)


def _public_url(value: str, info: ValidationInfo) -> str:
    """With `webhook_allow` in the context (the server's allowlist): refuse a URL whose host
    is, or resolves to, an address a trial may not reach."""
    allow: Allowlist | None = (info.context or {}).get("webhook_allow")
    if allow is not None:
        try:
            check_url(value, allow)
        except AddressRefused as exc:
            raise ValueError(str(exc)) from None
    return value


class BudgetAlerts(_Strict):
    """When the operator hears of spend: SSE event, webhook call and Prometheus counter."""

    thresholds: Annotated[
        list[Annotated[float, Field(gt=0, le=1)]], AfterValidator(_sorted_unique)
    ] = Field(default_factory=lambda: [0.5, 0.8, 1.0])
    """Fractions of a scope's limit (project, machine day, task) that raise an alert once per
    period, e.g. 0.8 for 80 %."""
    daily_spend_above: Money | None = None
    """Alert once a UTC day when the project's spend that day (all machines) exceeds this, in
    the budget's currency; null for no such alert."""
    webhook_url: Annotated[str, Field(pattern=r"^https?://\S+$"), AfterValidator(_public_url)] | (
        None
    ) = None
    """Every alert is POSTed here as JSON (retried with backoff); null for none. Loopback,
    link-local, private and the server's own addresses are refused unless the server allows
    the host (`AUTOVIBE_WEBHOOK_ALLOW`)."""


class Budget(_Strict):
    amount: Money
    """Money the project may spend per period, in `currency`."""
    currency: Annotated[Currency, _known("currencies", "currency")] = "CAD"
    """Primary currency; USD prices are converted through the ledger's price directive."""
    period: Literal["daily", "weekly", "biweekly", "monthly", "once"] = "biweekly"
    """How often the budget is replenished."""
    alerts: BudgetAlerts = Field(default_factory=BudgetAlerts)
    """Threshold alerts on the budget counters."""


class Machines(_Strict):
    count: int = Field(default=1, ge=1, le=256)
    """Worker machines; the local driver runs this many assignments at once."""
    daily_allowance: Money = Decimal("1")
    """What one machine may spend per day, in the budget's currency."""


class Assignment(_Strict):
    strategy: Literal["random", "bandit"] = "random"
    """How agents and model pairs are assigned to tasks: `random` (uniform draws) or `bandit`
    (Thompson sampling on success and cost per success, learnt from earlier trials' results)."""
    seed: int = 0
    """Seed of the draws: the same seed (and for `bandit` the same history) gives the same plan."""
    trials_per_task: int = Field(default=1, ge=1, le=100)
    """Assignments made for every task."""
    task_kinds: dict[str, str] = Field(default_factory=dict)
    """`bandit`: task id → kind; outcomes are pooled per kind. A task not listed is its own kind."""
    cost_prior_weight: float = Field(default=1.0, gt=0, le=1000)
    """`bandit`: how many observed costs the cost prior (the mean cost over all arms) is worth."""
    infra_retries: int = Field(default=2, ge=0, le=10)
    """Times an assignment is run again after an infrastructure failure (the model plane
    failed its calls, its runner died or could not start) before it is recorded `infra_error`;
    such an ending is never scored as the agent's."""


GIT_URL = re.compile(r"^(?:(?:https?|ssh|git|file)://\S+|[\w.-]+@[\w.-]+:\S+)$")
"""`https://host/path` (or `http://`), `ssh://[user@]host/path`, `git://host/path`,
`file:///path` or scp-like `user@host:path`."""
_HEX = re.compile(r"^[0-9a-f]{7,64}$")
_REF = re.compile(r"^[A-Za-z0-9_+][A-Za-z0-9._/+-]{0,254}$")


def is_git_url(value: str) -> bool:
    return GIT_URL.match(value) is not None


def _repo(value: Any) -> Path | str:
    """A git URL stays a string; anything else is a folder."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise ValueError("a folder or a git URL (a string)")
    return value if is_git_url(value) else Path(value)


def _repo_allowed(value: Path | str, info: ValidationInfo) -> Path | str:
    if isinstance(value, Path):
        return _under_task_roots(value, info)
    if value.startswith("file://"):
        # A file:// URL reads the server's disk: only what a folder repo may name.
        local = Path(urllib.parse.unquote(urllib.parse.urlsplit(value).path))
        if not local.is_absolute():
            raise ValueError("a file:// URL names an absolute path (file:///srv/repos/x.git)")
        _under_task_roots(local, info)
        return value
    # A trial names the URL: the orchestrator fetches it, so its host must be public unless
    # the server allows it (`AUTOVIBE_REPO_ALLOW`), as a webhook's. Checked again at each fetch
    # only by git's own resolution: a DNS answer that changes in between is not caught.
    allow: Allowlist | None = (info.context or {}).get("repo_allow")
    if allow is not None:
        try:
            check_url(value, allow, REPO_ALLOW_SETTING)
        except AddressRefused as exc:
            raise ValueError(f"repo: {exc}") from None
    return value


def _private_task_folder(resolved: Path, roots: list[Path], private: list[Path]) -> bool:
    """Whether a folder under the task roots holds what no agent may see: the platform's git
    mirrors and exported trees (a task's whole history, its fix included), or an imported task
    set (its gold patches) — `set.json` in the folder or in one above it, up to its root."""
    from contracts.tasksets import SET_FILE

    if any(resolved.is_relative_to(folder) for folder in private):
        return True
    root = next((r for r in roots if resolved.is_relative_to(r)), None)
    folder = resolved
    while root is not None:
        if (folder / SET_FILE).exists():
            return True
        if folder == root or folder.parent == folder:
            return False
        folder = folder.parent
    return False


def _under_task_roots(value: Path, info: ValidationInfo) -> Path:
    """With `task_roots` in the context: the folder, symlinks resolved, must lie under one of
    them. The answer is the same whether the path exists or not, so it reveals nothing."""
    roots: list[Path] | None = (info.context or {}).get("task_roots")
    if roots is None:
        return value
    resolved = value.resolve()
    if not any(resolved.is_relative_to(root) for root in roots) or _private_task_folder(
        resolved, roots, (info.context or {}).get("task_private") or []
    ):
        raise ValueError(
            "must be a folder under the task roots (AUTOVIBE_TASK_ROOTS: "
            f"{', '.join(str(r) for r in roots)}) or a git URL (https://, ssh://, git://, "
            "file://)"
        )
    return resolved


def _agent_program(value: list[str] | None, info: ValidationInfo) -> list[str] | None:
    """The `command` agent's program: a file under the task roots (symlinks resolved) or a
    bare name found on PATH, checked where `task_roots` is in the context (the server)."""
    roots: list[Path] | None = (info.context or {}).get("task_roots")
    if value is None or roots is None:
        return value
    program = value[0]
    if "/" not in program:
        if shutil.which(program) is None:
            raise ValueError(f"{program!r} is not a program on the server's PATH")
        return value
    resolved = Path(program).resolve()
    if not any(resolved.is_relative_to(root) for root in roots) or not resolved.is_file():
        raise ValueError(
            "the program must be a file under the task roots (AUTOVIBE_TASK_ROOTS: "
            f"{', '.join(str(r) for r in roots)}) or a bare name on PATH"
        )
    return [str(resolved), *value[1:]]


_RESERVED_TOP = frozenset({
    "bin", "boot", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "media", "mnt",
    "opt", "proc", "root", "run", "sbin", "srv", "sys", "tmp", "usr", "var", "tests", "logs",
    "solution", "nix", "snap",
})  # fmt: skip


def _workdir(value: str) -> str:
    if not re.fullmatch(r"/[a-z][a-z0-9_-]{0,31}", value) or value[1:] in _RESERVED_TOP:
        raise ValueError(
            f"a folder at the sandbox's root that the system does not use (/app, /workspace), "
            f"not {value!r} (not one of /{', /'.join(sorted(_RESERVED_TOP))})"
        )
    return value


def _parser(value: str, info: ValidationInfo) -> str:
    """With `parsers` in the context (swebench's parser names): `pytest`, `harbor`, a
    repository `owner/name`, or a parser swebench has."""
    known: list[str] | None = (info.context or {}).get("parsers")
    if value == HARBOR_PARSER:
        return value
    if "/" in value:
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
            raise ValueError(f"a repository is `owner/name`, not {value!r}")
    elif known is not None and value != "pytest" and value not in known:
        raise ValueError(
            f"unknown test log parser {value!r}; allowed: pytest, harbor, a repository "
            f"`owner/name` (swebench's parser for it, else pytest's) or one of "
            f"{', '.join(known)}"
        )
    return value


class TaskEnvironment(_Strict):
    """What the task's agent and tests need beyond the host's tools and the repository as
    committed: Debian packages (a root filesystem built from them once with mmdebstrap, the
    host's release, mounted read-only as the sandbox's system folders), and setup commands
    (run once over the repository, their result every assignment's starting tree). Both are
    content-addressed and shared by every task that names the same."""

    packages: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9+.-]{1,62}$")]] = Field(
        default_factory=list, max_length=200
    )
    """Debian package names (`jq`, `dc`, `nodejs`)."""
    setup: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list, max_length=50)
    """Shell commands run once, in order, in a sandbox with no network, over a copy of the
    repository at the task's commit, on the packages' root (SWE-bench's `pre_install` and
    `install` steps): what they build is part of every assignment's workspace, not of its
    patch (`workers.setups`)."""

    @model_validator(mode="after")
    def _something(self) -> TaskEnvironment:
        if not self.packages and not self.setup:
            raise ValueError("an environment names `packages`, `setup` commands, or both")
        return self


class Task(_Strict):
    id: Slug
    repo: Annotated[
        Path | str, PlainValidator(_repo, json_schema_input_type=str), AfterValidator(_repo_allowed)
    ]
    """The task's repository: a folder under the server's task roots (`AUTOVIBE_TASK_ROOTS`;
    symlinks resolved; relative to the trial file), copied as it is; or a git URL (`https://`,
    `ssh://`, `git://`, `file://` under the task roots) with `commit` or `ref`, kept as a mirror
    in the data root and checked out with no history."""
    commit: Annotated[str, Field(pattern=_HEX.pattern)] | None = None
    """With a git URL: the commit the workspace holds (lower-case hex, full or abbreviated)."""
    ref: Annotated[str, Field(pattern=_REF.pattern)] | None = None
    """With a git URL and no `commit`: a branch or tag, resolved to its commit at submission
    (the stored trial keeps that commit)."""
    prompt: str = Field(min_length=1)
    """What the agent is asked to do."""
    test_command: str = Field(min_length=1)
    """Command that runs the tests in the workspace (pytest: results are read from `-rA`)."""
    fail_to_pass: list[str] = Field(min_length=1)
    """Tests that fail before and must pass after (SWE-bench FAIL_TO_PASS)."""
    pass_to_pass: list[str] = Field(default_factory=list)
    """Tests that pass before and must keep passing (SWE-bench PASS_TO_PASS)."""
    timeout_s: int = Field(default=600, ge=1, le=7 * 24 * 3600)
    """Wall time after which the agent's whole process group is killed."""
    budget: Money | None = None
    """Optional cap on this task's spend, in the budget's currency."""
    agent_command: Annotated[
        list[str] | None, Field(min_length=1), AfterValidator(_agent_program)
    ] = None
    """argv the `command` agent runs for this task: a program under the task roots or a bare
    name on the server's PATH, then its arguments."""
    test_patch: str | None = None
    """A diff applied to the workspace after the agent and before the tests (SWE-bench's
    `test_patch`): the tests that judge the task, which the agent never sees. With the
    `harbor` parser: the diff creating the task's `tests/` folder, applied to a folder of its
    own, never the workspace, shown to the tests' sandbox as /tests."""
    parser: Annotated[str, AfterValidator(_parser)] | None = None
    """How the test output is read: `pytest` (its `-rA` summary; the default), a repository the
    `swebench` package knows (`django/django`, `sympy/sympy`: its parser for that repository),
    a `swebench` parser by name (`parse_log_django`), or `harbor` (the reward the verifier
    writes, else its exit status: `HARBOR_TEST` is the task's one FAIL_TO_PASS id)."""
    environment: TaskEnvironment | None = None
    """A root filesystem of Debian packages the task runs in, and setup commands run once over
    its repository (sandboxed trials only); None: the host's system folders, the repository as
    committed."""
    workdir: Annotated[str, AfterValidator(_workdir)] | None = None
    """Where the workspace also appears inside the sandboxes, and where the agent and the tests
    start (a Harbor task's `/app`); None: at its own path only."""

    @model_validator(mode="after")
    def _pinned(self) -> Task:
        if isinstance(self.repo, str) and self.commit is None and self.ref is None:
            raise ValueError("a git URL repo needs `commit` (or `ref`): the workspace is pinned")
        if isinstance(self.repo, Path) and (self.commit or self.ref):
            raise ValueError("`commit` and `ref` go with a git URL repo; a folder is copied as is")
        if self.parser == HARBOR_PARSER and (
            self.fail_to_pass != [HARBOR_TEST] or self.pass_to_pass
        ):
            raise ValueError(
                f"a `harbor` task is graded by its verifier alone: fail_to_pass [{HARBOR_TEST}], "
                "no pass_to_pass"
            )
        return self


class TaskSetRef(_Strict):
    """`tasks: {set: NAME, ids: [...]}` or `{set: NAME, sample: N}`: tasks of a set imported
    with `autovibe tasks import` (under `$AUTOVIBE_DATA/tasks/NAME/`), resolved at submission;
    the tasks its validation (`autovibe tasks validate`) found invalid are left out."""

    set: Slug
    """The task set's name."""
    ids: Annotated[list[str], Field(min_length=1)] | None = None
    """The set's tasks to run, by id; an invalid one is refused, naming why."""
    sample: int | None = Field(default=None, ge=1)
    """Run this many of the set's valid tasks, drawn with `assignment.seed`."""
    agent_command: Annotated[list[str], Field(min_length=1)] | None = None
    """argv the `command` agent runs for each of these tasks (see `Task.agent_command`)."""

    @model_validator(mode="after")
    def _one_way(self) -> TaskSetRef:
        if self.ids is not None and self.sample is not None:
            raise ValueError("name the tasks (`ids`) or draw them (`sample`), not both")
        return self


class TaskSets(Protocol):
    """The server's imported task sets (`orchestrator.taskstore`; the validation context's
    `task_sets`)."""

    def select(self, ref: TaskSetRef, seed: int) -> list[Task]:
        """The valid tasks `ref` names; ValueError naming the set, the task and why not."""
        ...


def _unsandboxed_allowed(value: str, info: ValidationInfo) -> str:
    if value == "none" and (info.context or {}).get("allow_unsandboxed") is False:
        raise ValueError(
            "`none` runs the agent unconfined on the server and is refused unless the server "
            "sets AUTOVIBE_ALLOW_UNSANDBOXED=1 (allowed: bwrap)"
        )
    return value


class Sandbox(_Strict):
    kind: Annotated[Literal["none", "bwrap"], AfterValidator(_unsandboxed_allowed)] = "bwrap"
    """How each agent is confined: `bwrap` (bubblewrap: read-only host, own namespaces, only
    the proxy reachable) or `none` (a plain subprocess; the proxy is then only a convention;
    only when the server sets `AUTOVIBE_ALLOW_UNSANDBOXED`)."""
    memory_mb: int = Field(default=4096, ge=64, le=1024 * 1024)
    """Address-space limit of each process of the agent, in MiB (RLIMIT_AS)."""
    cpus: float = Field(default=1.0, gt=0, le=1024)
    """CPU share of the agent; enforced as CPU time, cpus x timeout_s seconds per process."""
    processes: int = Field(default=512, ge=16, le=65536)
    """Most processes and threads alive in the sandbox at once (pids cgroup, RLIMIT_NPROC)."""
    tmp_mb: int = Field(default=1024, ge=16, le=1024 * 1024)
    """Size of the sandbox's private /tmp, in MiB (a tmpfs: it counts as memory)."""
    workspace_mb: int = Field(default=4096, ge=16, le=16 * 1024 * 1024)
    """Most the workspace and output folder may hold, in MiB; the agent is killed past it."""
    network: Literal["proxy", "transparent"] = "proxy"
    """How a `bwrap` agent reaches the proxy: `proxy` (proxy variables; the proxy bridged onto
    the sandbox's own loopback) or `transparent` (a network namespace whose every TCP
    connection is redirected to the proxy, no proxy variables; needs root and iptables)."""


def _allowed_pool(value: str | None, info: ValidationInfo) -> str | None:
    pools: list[str] | None = (info.context or {}).get("nomad_node_pools")
    if value is not None and pools is not None and value not in pools:
        raise ValueError(
            f"node pool {value!r} is not one the server allows (AUTOVIBE_NOMAD_NODE_POOLS); "
            f"allowed: {', '.join(pools)}"
        )
    return value


def _allowed_datacenters(value: list[str] | None, info: ValidationInfo) -> list[str] | None:
    allowed: list[str] | None = (info.context or {}).get("nomad_datacenters")
    if value is None or allowed is None or "*" in allowed:
        return value
    refused = [dc for dc in value if dc not in allowed]
    if refused:
        raise ValueError(
            f"datacenters {', '.join(refused)} are not ones the server allows "
            f"(AUTOVIBE_NOMAD_DATACENTERS); allowed: {', '.join(allowed)}"
        )
    return value


class NomadPlacement(_Strict):
    """Where on the server's Nomad cluster a trial's workers run. The cluster itself (address,
    token, namespace, job ids, interpreter) is the server's configuration (`AUTOVIBE_NOMAD_*`);
    a trial only chooses among the node pools and datacenters the server allows."""

    node_pool: Annotated[str | None, AfterValidator(_allowed_pool)] = None
    """Node pool of the worker jobs; the server's first allowed pool when unset."""
    datacenters: Annotated[
        list[str] | None, Field(min_length=1), AfterValidator(_allowed_datacenters)
    ] = None
    """Datacenters the worker jobs may run in; all the server allows when unset."""
    cpu_mhz: int = Field(default=1000, ge=100)
    """CPU reserved per worker allocation, in MHz."""
    memory_mb: int = Field(default=4096, ge=64)
    """Memory reserved per worker allocation, in MiB."""

    @model_validator(mode="before")
    @classmethod
    def _stored_before_placement(cls, data: Any, info: ValidationInfo) -> Any:
        # Trials stored before the cluster became the server's carry its fields; they were
        # checked when submitted, and are read back without a context: drop them, unused.
        if info.context is None and isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in _LEGACY_CLUSTER_FIELDS}
        return data


_LEGACY_CLUSTER_FIELDS = ("address", "namespace", "region", "token_env", "jobs", "python")


class NomadCluster(_Strict):
    """Where the `nomad` driver dispatches workers: the server's settings (`AUTOVIBE_NOMAD_*`,
    `workers.nomad.cluster_for`) with a trial's placement, never a trial's own choice of
    cluster. Unset fields fall back to the NOMAD_* environment, as with the nomad CLI. The ACL
    token is never written here: only the name of the environment variable that holds it."""

    address: str | None = None
    """Nomad HTTP API, e.g. `https://nomad.internal:4646` (`NOMAD_ADDR` when unset)."""
    namespace: str | None = None
    """Namespace of the worker jobs (`NOMAD_NAMESPACE`, else `default`)."""
    region: str | None = None
    """Region of the worker jobs (`NOMAD_REGION`, else `global`)."""
    node_pool: str = "default"
    """Node pool of the worker jobs."""
    datacenters: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    """Datacenters the worker jobs may run in (`*`: any)."""
    token_env: str = "NOMAD_TOKEN"
    """Environment variable of the orchestrator that holds the ACL token."""
    jobs: dict[AgentName, str] = Field(default_factory=dict)
    """Parameterized job ID per agent; `autovibe-worker-<agent>` when not listed."""
    python: str = "python3"
    """Interpreter on the Nomad clients that has autovibe installed (runs `workers.runner`)."""
    cpu_mhz: int = Field(default=1000, ge=100)
    """CPU reserved per worker allocation, in MHz."""
    memory_mb: int = Field(default=4096, ge=64)
    """Memory reserved per worker allocation, in MiB."""


class Confidence(_Strict):
    """The confidence gate (DeepEval): a test score and an LLM judge's "the change solves the
    task" score, combined as a weighted mean; a result below `threshold` is not accepted and
    is flagged for review. At the default weights and threshold only a resolved result can be
    accepted and the judge ranks results without vetoing them: the default judge may be the
    270M `tiny` model, whose opinion should not overrule the tests. Raise the judge's weight
    (e.g. tests 0.6 / judge 0.4: a resolved change is then refused below a judge score of 2.5)
    once the judge is a capable pair."""

    enabled: bool = True
    """Score every graded assignment; off: results carry no confidence and none is flagged."""
    threshold: float = Field(default=0.7, ge=0, le=1)
    """Confidence a result needs to be accepted."""
    judge: PairName | None = None
    """Model that judges the change (`<pair>` or `<pair>:thinking`); default: the normal model
    of the trial's first pair."""
    weights: dict[Literal["tests", "judge"], Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {"tests": 0.7, "judge": 0.3}  # type: ignore[arg-type]
    )
    """Weight of each score in the mean; a score left out weighs 0. When the judge cannot be
    reached the confidence is the test score alone."""
    timeout_s: float = Field(default=60, gt=0, le=3600)
    """How long one judge call may take before the judge counts as unavailable."""

    @model_validator(mode="after")
    def _some_weight(self) -> Confidence:
        if sum(self.weights.values()) <= 0:
            raise ValueError("weights: at least one of tests, judge must be above 0")
        return self


class Routing(_Strict):
    """Where a request for the model `auto` (or `auto:thinking`) goes. The proxy sends it to
    the normal (or thinking) model of the assignment's pair on the local model plane; only a
    request the local pair cannot serve (an API the model plane does not speak, a prompt
    beyond the local context) goes to `cloud_model`, and only when `allow_cloud` is true.
    Requests that name a model are not routed."""

    auto: Literal["local_first"] = "local_first"
    """Routing of `auto`: `local_first` (the only policy so far)."""
    allow_cloud: bool = False
    """Whether `auto` may fall back to `cloud_model`; false: such requests are refused (403)."""
    cloud_model: Annotated[str, Field(pattern=r"^[a-z0-9_-]+/\S+$")] | None = None
    """The cloud fallback as `provider/model` (`openai/gpt-4o-mini`), priced in prices.yaml."""

    @model_validator(mode="after")
    def _cloud_named(self) -> Routing:
        if self.allow_cloud and self.cloud_model is None:
            raise ValueError("allow_cloud: true needs a cloud_model (provider/model)")
        return self


def _egress_rule(value: str) -> str:
    if len(parse_rules(value)) != 1:  # ValueError names a malformed one
        raise ValueError(f"{value!r} is one rule: host, host:port, *.suffix[:port] or CIDR[:port]")
    return value


EgressRule = Annotated[str, AfterValidator(_egress_rule)]


class Egress(_Strict):
    """Where workers may go through the proxy besides the model plane and the providers (always
    reachable; the proxy host's own services never are). In configs/projects.yaml a project's
    lists; in a trial, a narrowing of its project's: a trial may only drop or narrow entries."""

    allow: list[EgressRule] | None = None
    """HTTP(S) destinations: `host`, `host:port`, `*.suffix[:port]`, `address` or
    `CIDR[:port]`; no port: any port. null: the level above's (the project's for a trial,
    AUTOVIBE_EGRESS_ALLOW for a project); [] for none."""
    tcp_allow: list[EgressRule] | None = None
    """`host:port` reachable with raw TCP (not HTTP or TLS), e.g. a git server over SSH. null:
    the level above's (AUTOVIBE_EGRESS_TCP_ALLOW for a project); [] for none."""


class TrialConfig(_Strict):
    """A trial: tasks × agents × model pairs, with a budget."""

    name: Slug
    project: Slug
    budget: Budget
    machines: Machines = Field(default_factory=Machines)
    agents: Annotated[list[AgentName], AfterValidator(_check_unique)] = Field(min_length=1)
    """Agent adapters by short name (see `autovibe agents ls`)."""
    model_pairs: Annotated[list[PairName], AfterValidator(_check_unique)] = Field(min_length=1)
    """Model pairs from configs/models.yaml, `<pair>` or `<pair>:thinking`."""
    assignment: Assignment = Field(default_factory=Assignment)
    tasks: list[Task] = Field(min_length=1)
    """The tasks, or a task set by name (`{set: NAME, ids: [...]}`, `{set: NAME, sample: N}`),
    which the server expands into its tasks at submission."""
    task_set: TaskSetRef | None = None
    """The task set `tasks` was drawn from, when the trial named one (kept as submitted)."""
    driver: Literal["local", "nomad", "vm"] = "local"
    """Worker driver: `local` (a detached subprocess per assignment), `nomad` (a dispatch of
    a parameterized batch job per assignment; see nomad-jobs/README.md) or `vm` (the runner
    started over SSH in a worker VM of `autovibe vm up`; see vm-templates/README.md)."""
    nomad: NomadPlacement = Field(default_factory=NomadPlacement)
    """Node pool, datacenters and resources of the workers when `driver` is `nomad`."""
    sandbox: Sandbox = Field(default_factory=Sandbox)
    """How the local driver confines each agent."""
    confidence: Confidence = Field(default_factory=Confidence)
    """The confidence gate every graded result goes through."""
    routing: Routing = Field(default_factory=Routing)
    """Where requests for the model `auto` go: the local pair first, the cloud if allowed."""
    egress: Egress = Field(default_factory=Egress)
    """Where the workers may go: the project's allowlists (configs/projects.yaml), or a part."""

    @model_validator(mode="before")
    @classmethod
    def _keep_task_set(cls, data: Any) -> Any:
        # `tasks: {set: ...}` is expanded by the `tasks` validator; the reference is kept.
        if isinstance(data, dict) and isinstance(data.get("tasks"), dict):
            return {"task_set": data["tasks"], **data}
        return data

    @field_validator("tasks", mode="before", json_schema_input_type=list[Task] | TaskSetRef)
    @classmethod
    def _expand_task_set(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, dict):
            return value
        try:
            ref = TaskSetRef.model_validate(value)
        except ValidationError as exc:
            raise ValueError(
                f"a task set is {{set: NAME, ids: [...]}} or {{set: NAME, sample: N}}: "
                f"{'; '.join(describe_errors(exc))}"
            ) from None
        sets: TaskSets | None = (info.context or {}).get("task_sets")
        if sets is None:
            raise ValueError(
                f"task set {ref.set!r}: a task set is expanded by the server that holds it"
            )
        assignment = info.data.get("assignment")
        seed = assignment.seed if isinstance(assignment, Assignment) else 0
        extra = {} if ref.agent_command is None else {"agent_command": ref.agent_command}
        # As plain data: checked again like any trial's tasks (task roots, the program).
        return [t.model_dump(mode="json") | extra for t in sets.select(ref, seed)]

    @field_validator("egress")
    @classmethod
    def _within_project(cls, egress: Egress, info: ValidationInfo) -> Egress:
        """With the server's `EgressPolicies` in the context: refuse a list wider than the
        project's, naming what is not allowed and what is."""
        policies: EgressPolicies | None = (info.context or {}).get("egress")
        project = info.data.get("project")
        if policies is None or project is None:
            return egress
        allowed = policies.of(project)
        problems = []
        for field in ("allow", "tcp_allow"):
            asked: list[str] | None = getattr(egress, field)
            granted: list[str] = getattr(allowed, field)
            extra = uncovered(asked or [], granted)
            if extra:
                problems.append(
                    f"{field}: {', '.join(extra)} not allowed by project {project!r}, which "
                    f"allows {', '.join(granted) or 'nothing'} (a trial may only narrow it)"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return egress

    @model_validator(mode="after")
    def _unique_tasks(self) -> TrialConfig:
        ids = [t.id for t in self.tasks]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"task ids must be unique; repeated: {', '.join(dupes)}")
        if "command" in self.agents:
            bare = [t.id for t in self.tasks if not t.agent_command]
            if bare:
                raise ValueError(
                    "agent `command` needs `agent_command` on every task; "
                    f"missing: {', '.join(bare)}"
                )
        return self


def _check_unique(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise ValueError("each name may appear once")
    return value


# -- catalogues ----------------------------------------------------------------------------


class ModelSpec(_Strict):
    served_name: str
    """Name requests use (`tiny`, `tiny:thinking`)."""
    weights: str
    """Path under `model-weights/`: a file (GGUF) or a folder (a Hugging Face snapshot)."""
    source: str | None = None
    """Where the weights come from when not on disk (a PyPI package for the tiny model)."""
    hf_repo: str | None = None
    """Hugging Face repository the operator copies the weights from, offline; never fetched at
    run time."""
    context: int = Field(default=2048, ge=1)
    """Context length served (vLLM `max_model_len`, llama.cpp `n_ctx`)."""
    params_b: float | None = Field(default=None, gt=0)
    """Parameters, in billions."""
    dtype: str | None = None
    """Weight type on disk (`bfloat16`, `q4_k_m`); the KV cache uses 2 bytes per value."""
    weight_bytes: int | None = Field(default=None, gt=0)
    """Approximate size of the weights (the memory they take once loaded)."""
    sha256: str | dict[str, str] | None = None
    """Expected SHA-256 of the weights file, or per file of a folder; None when unknown."""
    layers: int | None = Field(default=None, ge=1)
    """Transformer layers (`num_hidden_layers` in config.json), for the KV-cache estimate."""
    kv_heads: int | None = Field(default=None, ge=1)
    """Key/value heads (`num_key_value_heads`), for the KV-cache estimate."""
    head_dim: int | None = Field(default=None, ge=1)
    """Size of one attention head, for the KV-cache estimate."""
    tensor_parallel: int = Field(default=1, ge=1, le=64)
    """GPUs one replica of this model is split over (vLLM `tensor_parallel_size`)."""
    reasoning_parser: str | None = None
    """vLLM reasoning parser that keeps the thinking apart from the answer (`deepseek_r1`)."""


class ModelPair(_Strict):
    device: Literal["cpu", "gpu"]
    normal: ModelSpec
    thinking: ModelSpec
    accelerator_type: str | None = None
    """GPU type the replicas must run on (a Ray accelerator type: `H100`, `A100`, `L4`…)."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Share of each GPU's memory vLLM may take (weights, then KV cache in the rest)."""
    min_replicas: int = Field(default=1, ge=0)
    """Autoscaling floor of each model's replicas."""
    max_replicas: int = Field(default=1, ge=1)
    """Autoscaling ceiling of each model's replicas."""

    @model_validator(mode="after")
    def _gpu_needs(self) -> ModelPair:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )
        if self.device == "gpu":
            needed = ("hf_repo", "weight_bytes", "layers", "kv_heads", "head_dim")
            for role in ("normal", "thinking"):
                spec = getattr(self, role)
                missing = [f for f in needed if getattr(spec, f) is None]
                if missing:
                    raise ValueError(f"{role}: a GPU model needs {', '.join(missing)}")
        return self


class ModelsCatalog(_Strict):
    pairs: dict[str, ModelPair]

    def served_names(self) -> list[str]:
        """Every name a trial or a request may use: `<pair>` and `<pair>:thinking`."""
        return sorted(n for name in self.pairs for n in (name, f"{name}:thinking"))


class TokenPrice(_Strict):
    input_per_mtok: Money
    output_per_mtok: Money
    cache_read_per_mtok: Money | None = None
    """Input tokens read from the prompt cache; absent: charged as plain input."""
    cache_write_per_mtok: Money | None = None
    """Input tokens written to the prompt cache; absent: charged as plain input."""
    as_of: datetime.date | None = None
    """The day the price was read from the provider's price page (`autovibe models ls`)."""


class LocalCompute(_Strict):
    """A local model is priced by the hour of the machine serving it, apportioned by tokens."""

    hourly_usd: Money
    tokens_per_hour: int = Field(gt=0)
    """Nominal throughput of that machine; cost per token = hourly_usd / tokens_per_hour."""

    def per_mtok(self) -> Decimal:
        return self.hourly_usd * Decimal(1_000_000) / Decimal(self.tokens_per_hour)


VmPriceKey = Literal["local", "nomad", "vm", "default"]


def _free_local_vm() -> dict[VmPriceKey, Decimal]:
    return {"local": Decimal(0)}


class ComputePrices(_Strict):
    """Non-LLM compute, priced in USD and posted to the ledger (`Expenses:Compute:…`)."""

    vm_hour_usd: dict[VmPriceKey, Money] = Field(default_factory=_free_local_vm)
    """USD per hour of a worker VM, by worker driver, charged for each assignment's wall time;
    `default` prices the drivers not named. The local driver costs 0 unless priced here."""

    def vm_hour(self, driver: str) -> Decimal:
        """USD per VM-hour of `driver`; KeyError naming the config field when it has no price."""
        prices: dict[str, Decimal] = {str(k): v for k, v in self.vm_hour_usd.items()}
        for name in (driver, "default"):
            if name in prices:
                return prices[name]
        if driver == "local":
            return Decimal(0)
        raise KeyError(
            f"prices.yaml: compute.vm_hour_usd has no price for driver {driver!r} and no "
            f"'default'; priced: {', '.join(sorted(self.vm_hour_usd)) or 'none'}"
        )


class UnitPrices(_Strict):
    """One provider's prices of the endpoints billed by something other than chat tokens
    (`proxy/endpoints.py` says which endpoint uses which), USD, by model."""

    embeddings_per_mtok: dict[str, Money] = Field(default_factory=dict)
    """Per million input tokens of `POST /v1/embeddings`."""
    images_per_image: dict[str, dict[str, dict[str, Money]]] = Field(default_factory=dict)
    """Per image of `POST /v1/images/generations`, by model, then quality, then size."""
    speech_per_mchar: dict[str, Money] = Field(default_factory=dict)
    """Per million input characters of `POST /v1/audio/speech`."""
    transcription_per_minute: dict[str, Money] = Field(default_factory=dict)
    """Per minute of audio of `POST /v1/audio/transcriptions`, billed to the second."""


class PriceCatalog(_Strict):
    currency: Literal["USD"] = "USD"
    fx: dict[Currency, Decimal]
    """How much of each currency one USD buys (written to the ledger as price directives)."""
    providers: dict[str, dict[str, TokenPrice]] = Field(default_factory=dict)
    """Cloud prices per provider and model, USD per million tokens."""
    local: dict[str, LocalCompute] = Field(default_factory=dict)
    """Local models (by served name) priced from compute cost."""
    compute: ComputePrices = Field(default_factory=ComputePrices)
    """Worker VM-hours (GPU-hours of local models are in `local`, apportioned by tokens)."""
    units: dict[str, UnitPrices] = Field(default_factory=dict)
    """Per provider: embeddings, images, speech and transcription (`UnitPrices`)."""

    @functools.cached_property
    def local_prices(self) -> dict[str, TokenPrice]:
        """Derived local prices of the names asked so far (priced ones only: a request names
        any model it likes), because every proxied call asks several times. A cached property,
        not a pydantic private attribute: reading one of those goes through the model's
        `__getattr__` (about 5 us, twice per proxied call), this is a plain attribute."""
        return {}

    def price(self, provider: str, model: str) -> TokenPrice | None:
        """USD per million tokens for a model, or None when unknown (callers fail closed)."""
        if provider == "local":
            price = self.local_prices.get(model)
            if price is None:
                compute = self.local.get(model) or self.local.get(model.split(":")[0])
                if compute is None:
                    return None
                per = compute.per_mtok()
                # Derived, not configured: full precision rather than the 6-decimal Money rule.
                price = TokenPrice.model_construct(input_per_mtok=per, output_per_mtok=per)
                self.local_prices[model] = price
            return price
        return self.providers.get(provider, {}).get(model)

    def convert(self, usd: Decimal, currency: str) -> Decimal:
        """USD into `currency` at the configured rate (the ledger's price directive)."""
        if currency not in self.fx:
            raise KeyError(f"no exchange rate for {currency}; known: {', '.join(sorted(self.fx))}")
        return usd * self.fx[currency]

    def cost_usd(
        self,
        provider: str,
        model: str,
        prompt: int,
        completion: int,
        *,
        cache_read: int = 0,
        cache_write: int = 0,
    ) -> Decimal | None:
        """USD for a call; `cache_read` and `cache_write` are the parts of `prompt` the
        provider read from or wrote to its prompt cache. None when the model has no price."""
        price = self.price(provider, model)
        if price is None:
            return None
        read_price = price.cache_read_per_mtok
        write_price = price.cache_write_per_mtok
        uncached = max(0, prompt - cache_read - cache_write)
        return (
            price.input_per_mtok * uncached
            + (price.input_per_mtok if read_price is None else read_price) * cache_read
            + (price.input_per_mtok if write_price is None else write_price) * cache_write
            + price.output_per_mtok * completion
        ) / 1_000_000


# -- loading with positions ----------------------------------------------------------------


class Project(_Strict):
    egress: Egress = Field(default_factory=Egress)
    """The project's egress allowlists; a null list is the server's (AUTOVIBE_EGRESS_ALLOW)."""


class ProjectsCatalog(_Strict):
    """configs/projects.yaml: what differs per project. A project not listed has the server's
    defaults."""

    projects: dict[Slug, Project] = Field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class EgressPolicies:
    """Each project's egress lists, resolved: configs/projects.yaml over the server's."""

    default: Egress
    """The server's (AUTOVIBE_EGRESS_ALLOW, AUTOVIBE_EGRESS_TCP_ALLOW), neither list null."""
    projects: ProjectsCatalog = dataclasses.field(default_factory=ProjectsCatalog)

    def of(self, project: str) -> Egress:
        """The project's lists, neither null."""
        own = self.projects.projects.get(project)
        if own is None:
            return self.default
        return Egress(
            allow=self.default.allow if own.egress.allow is None else own.egress.allow,
            tcp_allow=(
                self.default.tcp_allow if own.egress.tcp_allow is None else own.egress.tcp_allow
            ),
        )

    def of_trial(self, config: TrialConfig) -> Egress:
        """What the trial's workers may reach: its own lists where it has them, its project's
        elsewhere (a trial's lists were checked to lie within its project's)."""
        project = self.of(config.project)
        asked = config.egress
        return Egress(
            allow=project.allow if asked.allow is None else asked.allow,
            tcp_allow=project.tcp_allow if asked.tcp_allow is None else asked.tcp_allow,
        )


_M = TypeVar("_M", bound=BaseModel)


class ConfigError(Exception):
    """A config file or payload failed validation; `str()` lists every problem with its place."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" if source else p for p in problems))


def _positions(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, child in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue  # unhashable: building the data refuses the file
            out[(*path, key.value)] = key.start_mark.line + 1
            _positions(child, (*path, key.value), out)
            out[(*path, key.value)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            _positions(child, (*path, i), out)


def describe_errors(
    exc: ValidationError, lines: dict[tuple[Any, ...], int] | None = None
) -> list[str]:
    """One line per error: `[line N: ]field.path: message`."""
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        where = ""
        if lines is not None:
            probe = loc
            while probe not in lines and probe:
                probe = probe[:-1]
            if probe in lines:
                where = f"line {lines[probe]}: "
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        out.append(f"{where}{field}: {msg}")
    return out


def read_yaml(path: Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    text = path.read_text()
    # Parsed once, for the line numbers and then for the data, built from that node as
    # `yaml.safe_load` builds it; the lines are read first, since building flattens merge keys.
    loader = yaml.SafeLoader(text)
    lines: dict[tuple[Any, ...], int] = {}
    try:
        node = loader.get_single_node()
        if node is not None:
            _positions(node, (), lines)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(
            str(path), [f"{line}not valid YAML: {getattr(exc, 'problem', exc)}"]
        ) from exc
    finally:
        loader.dispose()
    return data, lines


def load_trial(path: Path, context: dict[str, Any] | None = None) -> TrialConfig:
    """Parse and validate a trial file; task repos are resolved relative to the file."""
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["a trial file is a YAML mapping (name, project, budget, …)"])
    for task in data.get("tasks") or []:
        if (
            isinstance(task, dict)
            and isinstance(task.get("repo"), str)
            and not is_git_url(task["repo"])
        ):
            repo = Path(task["repo"])
            task["repo"] = str(repo if repo.is_absolute() else (path.parent / repo).resolve())
    try:
        return TrialConfig.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(str(path), describe_errors(exc, lines)) from exc


def load_catalog(path: Path, model: type[_M]) -> _M:
    data, lines = read_yaml(path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(str(path), describe_errors(exc, lines)) from exc


def load_models(configs: Path) -> ModelsCatalog:
    return load_catalog(configs / "models.yaml", ModelsCatalog)


def load_prices(configs: Path) -> PriceCatalog:
    return load_catalog(configs / "prices.yaml", PriceCatalog)


def load_projects(configs: Path) -> ProjectsCatalog:
    """configs/projects.yaml; without one, no project has settings of its own."""
    path = configs / "projects.yaml"
    return load_catalog(path, ProjectsCatalog) if path.exists() else ProjectsCatalog()
