"""The import rule between planes (README, "Architecture"), checked on the source itself.

Each top-level package is a plane with a level; a module may import only planes of a lower
level (and its own). Beyond that: the ledger reads traffic through its read port
(`traffic.stores`), never a store; the proxy (what runs inside mitmdump) imports nothing of
the ledger, the orchestrator or the workers. Every import counts, those inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEVELS = {
    "contracts": 0,
    "common": 1,
    "budget": 2,
    "traffic": 2,
    "secretstore": 2,
    "proxy": 3,
    "ledger": 3,
    "serving": 3,
    "workers": 3,
    "retention": 3,
    "orchestrator": 4,
    "bench": 5,
}
TRAFFIC_STORES = ("traffic.sqlite_store", "traffic.elasticsearch_store", "traffic.indexer")


def imports(plane: str) -> list[tuple[str, str]]:
    """(file, imported module) of every absolute import of another plane in `plane`."""
    found = []
    for path in sorted((ROOT / plane).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                if name.split(".")[0] in LEVELS and name.split(".")[0] != plane:
                    found.append((str(path.relative_to(ROOT)), name))
    return found


def test_every_package_is_a_plane_with_a_level() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(LEVELS)


def test_no_plane_imports_a_plane_above_it_or_beside_it() -> None:
    wrong = [
        f"{path} imports {name}"
        for plane, level in LEVELS.items()
        for path, name in imports(plane)
        if LEVELS[name.split(".")[0]] >= level
    ]
    assert wrong == []


def test_the_ledger_reads_traffic_through_its_port_only() -> None:
    wrong = [
        f"{path} imports {name}"
        for path, name in imports("ledger")
        if name.startswith(TRAFFIC_STORES)
    ]
    assert wrong == []


def test_the_proxy_imports_nothing_of_the_ledger_orchestrator_or_workers() -> None:
    wrong = [
        f"{path} imports {name}"
        for path, name in imports("proxy")
        if name.split(".")[0] in {"ledger", "orchestrator", "workers"}
    ]
    assert wrong == []
