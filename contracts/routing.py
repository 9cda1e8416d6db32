"""An assignment's routing policy (`routing.json` in its artifacts folder): written by the
orchestrator when it prepares the assignment, read by the proxy's routing addon for `auto`."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from contracts.config import Routing
from contracts.credentials import MachineIdentity
from contracts.dataroot import DataRoot, atomic_write

POLICY_FILE = "routing.json"


class AssignmentPolicy(BaseModel):
    """`routing.json`: the trial's routing policy and the assignment's local pair."""

    pair: str
    """The assignment's model pair (`tiny`); its models are `<pair>` and `<pair>:thinking`."""
    context: int | None = None
    """Context length of the pair's models (models.yaml); None: not checked."""
    routing: Routing = Routing()


def policy_path(root: DataRoot, project: str, trial: str, assignment: str) -> Path:
    return root.assignment_dir(project, trial, assignment) / POLICY_FILE


def write_policy(
    root: DataRoot,
    identity: MachineIdentity,
    pair: str,
    routing: Routing,
    context: int | None = None,
) -> Path:
    """Write the assignment's routing policy where the proxy reads it (atomic replace)."""
    path = policy_path(root, identity.project, identity.trial, identity.assignment)
    DataRoot.ensure(path.parent)
    policy = AssignmentPolicy(pair=pair.split(":")[0], context=context, routing=routing)
    atomic_write(path, policy.model_dump_json(indent=2))
    return path
