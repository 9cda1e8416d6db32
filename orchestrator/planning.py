"""Who does what: turns a trial config into assignments (task × agent × model pair)."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from contracts.config import TrialConfig
from orchestrator.bandit import Outcome, ThompsonBandit, task_kind


@dataclass(frozen=True)
class Planned:
    index: int
    task_id: str
    agent: str
    model: str


def plan(
    config: TrialConfig, history: Iterable[Outcome | tuple[str, str, str, bool, float]] = ()
) -> list[Planned]:
    """Each of a task's `trials_per_task` runs gets an agent and a model pair.

    `random`: uniform draws. `bandit`: Thompson sampling per task kind on cost per success,
    from `history` (earlier trials' graded outcomes, `bandit.history_from_state`). The same
    seed (and history) gives the same plan, so a trial can be repeated exactly.
    """
    rng = random.Random(config.assignment.seed)
    out: list[Planned] = []
    if config.assignment.strategy == "bandit":
        bandit = ThompsonBandit(history, cost_prior_weight=config.assignment.cost_prior_weight)
        arms = [(agent, model) for agent in config.agents for model in config.model_pairs]
        for task in config.tasks:
            kind = task_kind(config, task.id)
            for _ in range(config.assignment.trials_per_task):
                agent, model = bandit.choose(kind, arms, rng)
                out.append(Planned(len(out), task.id, agent, model))
        return out
    for task in config.tasks:
        for _ in range(config.assignment.trials_per_task):
            agent = rng.choice(config.agents)
            model = rng.choice(config.model_pairs)
            out.append(Planned(len(out), task.id, agent, model))
    return out
