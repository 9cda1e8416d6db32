"""What a trial may name: agents, models (local pairs and providers' models, `ModelChoices`),
currencies, from the planes that own them; and
what the server lets a trial ask for (task roots, unsandboxed runs, Nomad placement, webhook
hosts, each project's egress allowlists), from its settings and configs/projects.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from contracts.config import (
    Egress,
    EgressPolicies,
    ModelsCatalog,
    PriceCatalog,
    load_models,
    load_prices,
    load_projects,
)
from contracts.dataroot import DataRoot
from contracts.outbound import REPO_ALLOW_SETTING, Allowlist
from contracts.providers import ProvidersCatalog, load_providers, split_model
from contracts.settings import Settings
from orchestrator.model_choices import ModelChoices
from orchestrator.taskstore import TaskStore
from workers import swebench_logs
from workers.agents import AGENTS


@dataclass(frozen=True)
class Catalog:
    models: ModelsCatalog
    prices: PriceCatalog
    policy: dict[str, Any] = field(default_factory=dict)
    """The server's limits on a trial, as validation-context entries (see `server_policy`)."""
    providers: ProvidersCatalog = field(default_factory=ProvidersCatalog)
    settings: Settings = field(default_factory=Settings)
    """Where the secret store and the model plane are, for what a trial can run."""

    @classmethod
    def load(cls, settings: Settings) -> Catalog:
        return cls(
            load_models(settings.configs),
            load_prices(settings.configs),
            server_policy(settings),
            load_providers(settings.configs),
            settings,
        )

    def endpoint(self, model: str) -> tuple[str, str]:
        """Where an agent calls a trial's `model`, OpenAI-style (`…/v1`; Anthropic clients use
        its origin), and the name it sends: the model plane and the pair's name, or the
        provider's URL and its own model name (`openrouter/qwen/qwen3-coder` → `qwen/qwen3-coder`).
        KeyError for a provider not in providers.yaml."""
        split = split_model(model)
        if split is None:
            return self.settings.model_url, model
        provider, upstream = split
        return self.providers.providers[provider].base_url, upstream

    def choices(self) -> ModelChoices:
        """What a trial can run now (asks the secret store and model plane when needed)."""
        return ModelChoices(self.models, self.prices, self.providers, self.settings)

    @property
    def egress(self) -> EgressPolicies | None:
        """Each project's egress allowlists (what a trial may narrow, what its workers get);
        None without the server's policy (then the proxy's own lists apply)."""
        policies = self.policy.get("egress")
        return policies if isinstance(policies, EgressPolicies) else None

    def validation_context(self) -> dict[str, Any]:
        return {
            "agents": sorted(AGENTS),
            "models": self.choices(),
            "currencies": sorted(self.prices.fx),
            "parsers": swebench_logs.names(),
            "task_sets": TaskStore(DataRoot.at(self.settings.data)),
            **self.policy,
        }


def server_policy(settings: Settings) -> dict[str, Any]:
    """What contracts.config checks a trial against: the trial file is data, these are the
    server's."""
    return {
        "task_roots": settings.allowed_task_roots,
        "task_private": settings.private_task_folders,
        "allow_unsandboxed": settings.allow_unsandboxed,
        "nomad_node_pools": settings.nomad_node_pools,
        "nomad_datacenters": settings.nomad_datacenters,
        "webhook_allow": Allowlist.parse(settings.webhook_allow),
        "repo_allow": Allowlist.parse(settings.repo_allow, REPO_ALLOW_SETTING),
        "egress": EgressPolicies(
            Egress(allow=settings.egress_allow, tcp_allow=settings.egress_tcp_allow),
            load_projects(settings.configs),
        ),
    }
