"""The worker-driver port: start an assignment somewhere, tell whether it still runs, stop it."""

from __future__ import annotations

from typing import Protocol

from contracts.config import NomadCluster
from workers.spec import AssignmentSpec


class WorkerDriver(Protocol):
    name: str

    def launch(self, spec: AssignmentSpec) -> None:
        """Start the assignment; returns once it is started (it runs on without us)."""
        ...

    def alive(self, spec: AssignmentSpec) -> bool:
        """Whether the assignment's runner is still running."""
        ...

    def cancel(self, spec: AssignmentSpec) -> None:
        """Stop the assignment's runner and everything it started."""
        ...


def get_driver(name: str, nomad: NomadCluster | None = None) -> WorkerDriver:
    """The driver by its short name; `nomad` uses the given cluster, else the NOMAD_* defaults."""
    if name == "local":
        from workers.local import LocalDriver

        return LocalDriver()
    if name == "nomad":
        from workers.nomad import NomadDriver

        return NomadDriver(nomad)
    raise KeyError(f"unknown worker driver {name!r}; allowed: local, nomad")
