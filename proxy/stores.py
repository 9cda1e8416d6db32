"""Traffic-store adapters, picked by short name: `sqlite` (embedded default) or `elasticsearch`.

Both are fed from the spool, the source of truth, and track how far they got per spool file,
so `catch_up` can be called as often as wanted and an outage of the store loses nothing.
Adapters are imported only when picked, so the SQLite store never loads elasticsearch-py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from contracts.dataroot import DataRoot

DEFAULT = "sqlite"


class TrafficStore(Protocol):
    body_max: int
    """Bytes of each body kept in the store (the spool keeps more)."""

    def catch_up(self, traffic_logs_dir: Path) -> int:
        """Take in every complete spool line not taken yet; returns the number of new flows."""
        ...

    def close(self) -> None: ...


class UnknownStore(ValueError):
    """A store name that is not one of `STORES`."""


def _sqlite(root: DataRoot, **options: Any) -> TrafficStore:
    from proxy.index import TrafficIndex

    if options:
        raise TypeError(f"the sqlite store takes no options, got {sorted(options)}")
    return TrafficIndex(root.traffic_index)


def _elasticsearch(root: DataRoot, **options: Any) -> TrafficStore:
    from proxy.es_shipper import ElasticsearchShipper

    return ElasticsearchShipper.in_root(root, **options)


STORES: dict[str, Callable[..., TrafficStore]] = {
    "sqlite": _sqlite,
    "elasticsearch": _elasticsearch,
}
"""Short name → factory taking the data root and the adapter's own options."""


def get_store(name: str, root: DataRoot, **options: Any) -> TrafficStore:
    """The store called `name` for the data root `root` (`elasticsearch` needs `url=`)."""
    if name not in STORES:
        raise UnknownStore(f"unknown traffic store {name!r}: use one of {', '.join(STORES)}")
    return STORES[name](root, **options)
