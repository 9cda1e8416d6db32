"""Traffic-store adapters, picked by short name: `sqlite` (embedded default) or `elasticsearch`.

Both are fed from the spool, the source of truth, and track how far they got per spool file,
so `catch_up` can be called as often as wanted and an outage of the store loses nothing. Both
answer the read port, `MeteredFlows`, with the same flows and the same sums to the cent; the
platform and the ledger read from the store the settings name (`metered_flows_for`), the one
the indexer feeds. Adapters are imported only when picked, so the SQLite store never loads
elasticsearch-py.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol, Self

from contracts.adapters import resolve
from contracts.dataroot import DataRoot
from contracts.records import FlowRecord
from contracts.settings import Settings

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
class ErrorCount:
    """Calls whose answer fell short the same way: the status and the record's
    `upstream_error` (the error the provider named, `stream_cut`, `no_response`, …)."""

    status: int | None
    upstream_error: str
    calls: int


@dataclass(frozen=True)
class ProviderCalls:
    """Calls to one provider (the model plane is `local`) and how many fell short, by kind."""

    provider: str
    calls: int
    """Every call to the provider the proxy saw, its own refusals included."""
    errors: tuple[ErrorCount, ...]
    """By status, then error; empty when every answer was whole."""

    @property
    def failed(self) -> int:
        return sum(e.calls for e in self.errors)


def count_provider_calls(
    flows: Iterable[tuple[str, int | None, str | None]],
) -> list[ProviderCalls]:
    """(provider, status, upstream_error) of each flow to a provider → one row per provider,
    by name; both stores count with this, so they agree."""
    calls: Counter[str] = Counter()
    errors: dict[str, Counter[tuple[int, str]]] = defaultdict(Counter)
    for provider, status, upstream_error in flows:
        calls[provider] += 1
        if upstream_error is not None:
            # -1 sorts an answer that never came before the statuses.
            errors[provider][(-1 if status is None else status, upstream_error)] += 1
    return [
        ProviderCalls(
            provider,
            calls[provider],
            tuple(
                ErrorCount(None if status < 0 else status, kind, n)
                for (status, kind), n in sorted(errors[provider].items())
            ),
        )
        for provider in sorted(calls)
    ]


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


def failure_text(status: int | None, error: str | None) -> str:
    """A failed call in a line: `HTTP 502: <error>`, or the proxy's error when no answer came."""
    return str(error) if status is None else f"HTTP {status}" + (f": {error}" if error else "")


class Closing:
    """A store that `with` closes at the end of the block."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrafficUnavailable(Exception):
    """The store cannot answer a read now (a cluster down or refusing); the spool keeps
    everything, so the same read succeeds once the store is back."""


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

    def provider_calls(
        self,
        *,
        project: str | None = None,
        trial: str | None = None,
        assignment: str | None = None,
    ) -> list[ProviderCalls]:
        """Calls per provider and those whose answer fell short (429, 529 overloaded, 5xx, an
        error event, a cut stream, no answer), counted by status and the error named."""
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


READERS = {
    "sqlite": "traffic.sqlite_store:SqliteTrafficStore",
    "elasticsearch": "traffic.elasticsearch_store:ElasticsearchTrafficStore",
}
"""Stores that implement `MeteredFlows` (today, every store), by short name."""


def metered_flows(root: DataRoot, name: str = DEFAULT, **options: Any) -> MeteredFlows:
    """The read port over the traffic of data root `root` in store `name` (the embedded store
    by default; `elasticsearch` needs `url=`)."""
    reader: MeteredFlows = resolve("traffic reader", name, READERS).in_root(root, **options)
    return reader


def metered_flows_for(settings: Settings) -> MeteredFlows:
    """The read port over the store `settings` name (`traffic_store`, `elasticsearch_url`,
    `index_body_max`), the one `python -m traffic.indexer` feeds."""
    options: dict[str, Any] = {}
    if settings.index_body_max is not None:
        options["body_max"] = settings.index_body_max
    if settings.traffic_store == "elasticsearch":
        url = (settings.elasticsearch_url or "").strip()
        if not url:
            raise ValueError(
                "AUTOVIBE_ELASTICSEARCH_URL must be set when AUTOVIBE_TRAFFIC_STORE=elasticsearch"
            )
        options["url"] = url
    return metered_flows(DataRoot.at(settings.data), settings.traffic_store, **options)


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
