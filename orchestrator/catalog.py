"""What a trial may name: agents, model pairs, currencies, from the planes that own them; and
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
from contracts.outbound import Allowlist
from contracts.settings import Settings
from workers.agents import AGENTS


@dataclass(frozen=True)
class Catalog:
    models: ModelsCatalog
    prices: PriceCatalog
    policy: dict[str, Any] = field(default_factory=dict)
    """The server's limits on a trial, as validation-context entries (see `server_policy`)."""

    @classmethod
    def load(cls, settings: Settings) -> Catalog:
        return cls(
            load_models(settings.configs), load_prices(settings.configs), server_policy(settings)
        )

    @property
    def egress(self) -> EgressPolicies | None:
        """Each project's egress allowlists (what a trial may narrow, what its workers get);
        None without the server's policy (then the proxy's own lists apply)."""
        policies = self.policy.get("egress")
        return policies if isinstance(policies, EgressPolicies) else None

    def validation_context(self) -> dict[str, Any]:
        return {
            "agents": sorted(AGENTS),
            "pairs": self.models.served_names(),
            "currencies": sorted(self.prices.fx),
            **self.policy,
        }


def server_policy(settings: Settings) -> dict[str, Any]:
    """What contracts.config checks a trial against: the trial file is data, these are the
    server's."""
    return {
        "task_roots": settings.allowed_task_roots,
        "allow_unsandboxed": settings.allow_unsandboxed,
        "nomad_node_pools": settings.nomad_node_pools,
        "nomad_datacenters": settings.nomad_datacenters,
        "webhook_allow": Allowlist.parse(settings.webhook_allow),
        "egress": EgressPolicies(
            Egress(allow=settings.egress_allow, tcp_allow=settings.egress_tcp_allow),
            load_projects(settings.configs),
        ),
    }
