"""One way to pick an adapter: a short name from a plane's registry, or a dotted path.

Every plane that has swappable adapters (agents, worker drivers, counter stores, traffic
stores, secret stores) keeps a registry `short name -> "package.module:Class"` and calls
`resolve`; the class is imported only when picked, so an adapter's dependencies stay
optional. Each plane's adapters share one constructor (a classmethod the plane names), so
the caller never inspects which arguments a class takes. A name that is not registered is
one error, `UnknownAdapter`, that lists the allowed names.

Operators may name their own adapter by dotted path (`mycompany.stores:S3Traffic`) where the
choice is the server's (settings, environment); a trial never can (`dotted=False`): what a
trial names is data, not code to import.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


class UnknownAdapter(LookupError):
    """A name that is neither a registered adapter nor (where allowed) an importable path."""

    def __init__(self, kind: str, name: str, allowed: Mapping[str, str], why: str = "") -> None:
        self.kind, self.name, self.allowed = kind, name, sorted(allowed)
        super().__init__(f"unknown {kind} {name!r}{why}; allowed: {', '.join(self.allowed)}")

    def __str__(self) -> str:  # LookupError's repr-quoting of a KeyError is not wanted here
        return str(self.args[0])


def resolve(
    kind: str, name: str, registry: Mapping[str, str], *, dotted: bool = True, source: str = ""
) -> Any:
    """The class registered as `name` in `registry` ("module:Class" values), or, when
    `dotted`, the class at `name` itself ("package.module:Class" or "package.module.Class").
    `kind` and `source` (where the name came from, e.g. " ($AUTOVIBE_SECRET_STORE)") word
    the error."""
    target = registry.get(name)
    if target is None:
        if not dotted or "." not in name:
            raise UnknownAdapter(kind, name, registry, source)
        target = name
    module, sep, attr = target.partition(":")
    if not sep:
        module, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        why = f"{source} (cannot import {target}: {exc})"
        raise UnknownAdapter(kind, name, registry, why) from exc
