"""Traffic-store adapters, picked by short name: `sqlite` (embedded default) or `elasticsearch`.

Both are fed from the spool, the source of truth, and track how far they got per spool file,
so `catch_up` can be called as often as wanted and an outage of the store loses nothing.
Adapters are imported only when picked, so the SQLite store never loads elasticsearch-py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from contracts.adapters import resolve
from contracts.dataroot import DataRoot

DEFAULT = "sqlite"


class TrafficStore(Protocol):
    body_max: int
    """Bytes of each body kept in the store (the spool keeps more)."""

    def catch_up(self, traffic_logs_dir: Path) -> int:
        """Take in every complete spool line not taken yet; returns the number of new flows."""
        ...

    def close(self) -> None: ...


STORES = {
    "sqlite": "proxy.index:TrafficIndex",
    "elasticsearch": "proxy.es_shipper:ElasticsearchShipper",
}
"""Short name → store class; each is built by `in_root(root, **its own options)`."""


def get_store(name: str, root: DataRoot, **options: Any) -> TrafficStore:
    """The store called `name` (or an operator's dotted path) for the data root `root`
    (`elasticsearch` needs `url=`); `contracts.adapters.UnknownAdapter` lists the names."""
    store: TrafficStore = resolve("traffic store", name, STORES).in_root(root, **options)
    return store
