"""The trial config and the model/price catalogues, as Pydantic models.

A trial file is YAML; `load_trial` reports a bad one as `file:line: field.path: message`, naming
the allowed values. Which agents and model pairs exist is not known here: callers pass them in
the validation context (`{"agents": [...], "pairs": [...]}`), so the lists come from the
planes that own them.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

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


AgentName = Annotated[str, _known("agents", "agent")]
PairName = Annotated[str, _known("pairs", "model pair")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Budget(_Strict):
    amount: Money
    """Money the project may spend per period, in `currency`."""
    currency: Annotated[Currency, _known("currencies", "currency")] = "CAD"
    """Primary currency; USD prices are converted through the ledger's price directive."""
    period: Literal["daily", "weekly", "biweekly", "monthly", "once"] = "biweekly"
    """How often the budget is replenished."""


class Machines(_Strict):
    count: int = Field(default=1, ge=1, le=256)
    """Worker machines; the local driver runs this many assignments at once."""
    daily_allowance: Money = Decimal("1")
    """What one machine may spend per day, in the budget's currency."""


class Assignment(_Strict):
    strategy: Literal["random"] = "random"
    """How agents and model pairs are assigned to tasks (`bandit` comes later)."""
    seed: int = 0
    """Seed of the random assignment: the same seed gives the same plan."""
    trials_per_task: int = Field(default=1, ge=1, le=100)
    """Assignments made for every task."""


class Task(_Strict):
    id: Slug
    repo: Path
    """Folder of the task's repository; relative paths are relative to the trial file."""
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


class Sandbox(_Strict):
    kind: Literal["none", "bwrap"] = "bwrap"
    """How each agent is confined: `bwrap` (bubblewrap: read-only host, own namespaces, only
    the proxy reachable) or `none` (a plain subprocess; the proxy is then only a convention)."""
    memory_mb: int = Field(default=4096, ge=64, le=1024 * 1024)
    """Address-space limit of each process of the agent, in MiB (RLIMIT_AS)."""
    cpus: float = Field(default=1.0, gt=0, le=1024)
    """CPU share of the agent; enforced as CPU time, cpus x timeout_s seconds per process."""


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
    driver: Literal["local"] = "local"
    """Worker driver (`nomad` comes later)."""
    sandbox: Sandbox = Field(default_factory=Sandbox)
    """How the local driver confines each agent."""

    @model_validator(mode="after")
    def _unique_tasks(self) -> TrialConfig:
        ids = [t.id for t in self.tasks]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"task ids must be unique; repeated: {', '.join(dupes)}")
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
    """Path of the weights under `model-weights/`."""
    source: str | None = None
    """Where the weights come from when not on disk (a PyPI package for the tiny model)."""
    context: int = 2048


class ModelPair(_Strict):
    device: Literal["cpu", "gpu"]
    normal: ModelSpec
    thinking: ModelSpec


class ModelsCatalog(_Strict):
    pairs: dict[str, ModelPair]

    def served_names(self) -> list[str]:
        """Every name a trial or a request may use: `<pair>` and `<pair>:thinking`."""
        return sorted(n for name in self.pairs for n in (name, f"{name}:thinking"))


class TokenPrice(_Strict):
    input_per_mtok: Money
    output_per_mtok: Money


class LocalCompute(_Strict):
    """A local model is priced by the hour of the machine serving it, apportioned by tokens."""

    hourly_usd: Money
    tokens_per_hour: int = Field(gt=0)
    """Nominal throughput of that machine; cost per token = hourly_usd / tokens_per_hour."""

    def per_mtok(self) -> Decimal:
        return self.hourly_usd * Decimal(1_000_000) / Decimal(self.tokens_per_hour)


class PriceCatalog(_Strict):
    currency: Literal["USD"] = "USD"
    fx: dict[Currency, Decimal]
    """How much of each currency one USD buys (written to the ledger as price directives)."""
    providers: dict[str, dict[str, TokenPrice]] = Field(default_factory=dict)
    """Cloud prices per provider and model, USD per million tokens."""
    local: dict[str, LocalCompute] = Field(default_factory=dict)
    """Local models (by served name) priced from compute cost."""

    def price(self, provider: str, model: str) -> TokenPrice | None:
        """USD per million tokens for a model, or None when unknown (callers fail closed)."""
        if provider == "local":
            compute = self.local.get(model) or self.local.get(model.split(":")[0])
            if compute is None:
                return None
            per = compute.per_mtok()
            # Derived, not configured: keep full precision rather than the 6-decimal Money rule.
            return TokenPrice.model_construct(input_per_mtok=per, output_per_mtok=per)
        return self.providers.get(provider, {}).get(model)

    def convert(self, usd: Decimal, currency: str) -> Decimal:
        """USD into `currency` at the configured rate (the ledger's price directive)."""
        if currency not in self.fx:
            raise KeyError(f"no exchange rate for {currency}; known: {', '.join(sorted(self.fx))}")
        return usd * self.fx[currency]

    def cost_usd(self, provider: str, model: str, prompt: int, completion: int) -> Decimal | None:
        price = self.price(provider, model)
        if price is None:
            return None
        return (price.input_per_mtok * prompt + price.output_per_mtok * completion) / 1_000_000


# -- loading with positions ----------------------------------------------------------------


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
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(
            str(path), [f"{line}not valid YAML: {getattr(exc, 'problem', exc)}"]
        ) from exc
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _positions(node, (), lines)
    return data, lines


def load_trial(path: Path, context: dict[str, Any] | None = None) -> TrialConfig:
    """Parse and validate a trial file; task repos are resolved relative to the file."""
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["a trial file is a YAML mapping (name, project, budget, …)"])
    for task in data.get("tasks") or []:
        if isinstance(task, dict) and isinstance(task.get("repo"), str):
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
