"""Traffic-store adapters, picked by short name: `sqlite` (embedded default) or `elasticsearch`.

Both are fed from the spool, the source of truth, and track how far they got per spool file,
so `catch_up` can be called as often as wanted and an outage of the store loses nothing.
Adapters are imported only when picked, so the SQLite store never loads elasticsearch-py.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from contracts.adapters import resolve
from contracts.dataroot import DataRoot
from contracts.records import FlowRecord

DEFAULT = "sqlite"
HOUR_S = 3600


@dataclass(frozen=True)
class ModelUsage:
    """Metered LLM calls of one provider and model, summed."""

    provider: str
    model: str
    calls: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: Decimal
    estimated_calls: int
    """Calls whose response carried no usage and were charged by an estimate."""


@dataclass(frozen=True)
class CallFailures:
    """Calls through the proxy that the upstream or the proxy itself failed (5xx, or no response
    at all): the model plane's failures, as the capture saw them, whatever the agent says."""

    calls: int
    failed: int
    last_failed: bool
    """The assignment's last call failed: the agent gave up on a broken model plane."""
    last_error: str | None
    """The last failure, `HTTP 502` or the proxy's error text."""


@dataclass(frozen=True)
class SpooledFlow:
    """What a usage posting needs of one stored flow, and where the spool holds it."""

    spool_file: str
    """The spool file's key, `<project>/<YYYY-MM-DD>/flows.jsonl`."""
    id: str
    spool_offset: int
    ts_start: float
    trial: str | None
    assignment: str | None
    machine: str | None
    provider: str | None
    model: str | None
    tokens: int
    cost_usd: Decimal

    @property
    def hour(self) -> dt.datetime:
        start = int(self.ts_start) // HOUR_S * HOUR_S
        return dt.datetime.fromtimestamp(start, dt.UTC)


class MeteredFlows(Protocol):
    """The traffic plane's read port: what the ledger, the scheduler and the reports ask of the
    captured traffic. Readers depend on this, never on a store's class."""

    def catch_up(self, traffic_logs_dir: Path) -> int:
        """Take in every complete spool line not taken yet, so reads see them."""
        ...

    def spooled(self, project: str) -> list[SpooledFlow]:
        """The project's flows in spool order (by spool file, then offset)."""
        ...

    def usage(
        self,
        *,
        project: str | None = None,
        trial: str | None = None,
        assignment: str | None = None,
    ) -> list[ModelUsage]:
        """Metered LLM calls grouped by provider and model, optionally for one scope."""
        ...

    def call_failures(self, assignment: str) -> CallFailures:
        """The assignment's failed calls (5xx or no response) and whether its last one failed."""
        ...

    def flows(
        self,
        *,
        project: str | None = None,
        trial: str | None = None,
        assignment: str | None = None,
    ) -> list[FlowRecord]:
        """Stored flows in the order they started, optionally for one scope."""
        ...

    def close(self) -> None: ...


READERS = {"sqlite": "traffic.sqlite_store:SqliteTrafficStore"}
"""Stores that implement `MeteredFlows`. The Elasticsearch store is fed from the spool as
well but answers no reads yet: readers use the embedded store, which every deployment keeps."""


def metered_flows(root: DataRoot, name: str = DEFAULT) -> MeteredFlows:
    """The read port over the traffic of data root `root` (the embedded store by default)."""
    reader: MeteredFlows = resolve("traffic reader", name, READERS).in_root(root)
    return reader


class TrafficStore(Protocol):
    body_max: int
    """Bytes of each body kept in the store (the spool keeps more)."""

    def catch_up(self, traffic_logs_dir: Path) -> int:
        """Take in every complete spool line not taken yet; returns the number of new flows."""
        ...

    def close(self) -> None: ...


STORES = {
    "sqlite": "traffic.sqlite_store:SqliteTrafficStore",
    "elasticsearch": "traffic.elasticsearch_store:ElasticsearchTrafficStore",
}
"""Short name → store class; each is built by `in_root(root, **its own options)`."""


def get_store(name: str, root: DataRoot, **options: Any) -> TrafficStore:
    """The store called `name` (or an operator's dotted path) for the data root `root`
    (`elasticsearch` needs `url=`); `contracts.adapters.UnknownAdapter` lists the names."""
    store: TrafficStore = resolve("traffic store", name, STORES).in_root(root, **options)
    return store
