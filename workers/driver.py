"""The worker-driver port: start an assignment somewhere, tell whether it still runs, stop it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from contracts.adapters import resolve
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


@runtime_checkable
class WithEndNotice(Protocol):
    """A driver that hears its runners end: the scheduler collects an ending when it happens
    instead of at its next poll."""

    def on_end(self, wake: Callable[[], None]) -> None:
        """Call `wake` (from any thread) each time a runner this driver launched ends."""
        ...


DRIVERS = {
    "local": "workers.local:LocalDriver",
    "nomad": "workers.nomad:NomadDriver",
    "vm": "workers.vm_driver:VmDriver",
}
"""Short name -> driver class; each is built with the cluster (`None`: local, or NOMAD_*)."""


def get_driver(name: str, nomad: NomadCluster | None = None) -> WorkerDriver:
    """The driver by its short name (or an operator's dotted path); `nomad` is the cluster the
    driver places on, else the NOMAD_* defaults (the local driver places nothing)."""
    driver: WorkerDriver = resolve("worker driver", name, DRIVERS)(nomad)
    return driver
