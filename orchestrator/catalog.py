"""What a trial may name: agents, model pairs, currencies, from the planes that own them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contracts.config import ModelsCatalog, PriceCatalog, load_models, load_prices
from contracts.settings import Settings
from workers.agents import AGENTS


@dataclass(frozen=True)
class Catalog:
    models: ModelsCatalog
    prices: PriceCatalog

    @classmethod
    def load(cls, settings: Settings) -> Catalog:
        return cls(load_models(settings.configs), load_prices(settings.configs))

    def validation_context(self) -> dict[str, Any]:
        return {
            "agents": sorted(AGENTS),
            "pairs": self.models.served_names(),
            "currencies": sorted(self.prices.fx),
        }
