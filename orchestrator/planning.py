"""Who does what: turns a trial config into assignments (task × agent × model pair)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from contracts.config import TrialConfig


@dataclass(frozen=True)
class Planned:
    index: int
    task_id: str
    agent: str
    model: str


def plan(config: TrialConfig) -> list[Planned]:
    """`random` strategy: each of a task's `trials_per_task` runs draws an agent and a pair.

    The same seed gives the same plan, so a trial can be repeated exactly.
    """
    rng = random.Random(config.assignment.seed)
    out: list[Planned] = []
    for task in config.tasks:
        for _ in range(config.assignment.trials_per_task):
            agent = rng.choice(config.agents)
            model = rng.choice(config.model_pairs)
            out.append(Planned(len(out), task.id, agent, model))
    return out
