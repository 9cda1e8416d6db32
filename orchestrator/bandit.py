"""The `bandit` strategy: Thompson sampling of agent × model pair per task kind, cost per success.

Each arm (agent, model pair) keeps, per task kind, what earlier trials observed: attempts,
successes (graded `resolved`) and the metered cost of every attempt. For every assignment the
bandit draws, for every arm,

    θ ~ Beta(1 + successes, 1 + failures)                     chance that one attempt succeeds
    λ ~ Gamma(shape = w + attempts, rate = w·m + Σ cost)      attempts bought per unit of money

and picks the arm with the highest θ·λ = θ / c, successes per unit of money, the inverse of
cost per success (cost per attempt / success rate). Failures cost money too, so the cost sum
runs over every attempt.

Why the cost is sampled, and from a Gamma: a point estimate (θ divided by the observed mean
cost) would lock in an arm whose first run happened to be cheap and leave an untried arm with
no cost at all. Costs are positive and right-skewed; modelling them as exponential with a
Gamma prior on the rate is conjugate (one running sum per arm), accepts zero-cost attempts
(runs that stopped before any model call), and narrows as attempts accumulate, so cost is
explored exactly as success is. A lognormal would need per-arm variance estimates, a
Normal-Gamma prior and strictly positive costs, for little gain at the handful of attempts an
arm gets. The prior is worth `w` attempts (`assignment.cost_prior_weight`) at `m`, the mean
cost over the whole history (all kinds, all arms), which keeps it in the history's currency
and scale; with no history every arm shares the same prior and the choice is uniform.

Within one trial the plan is drawn up front (outcomes arrive later), so each assignment is a
fresh draw from the same posteriors: batched Thompson sampling, which spreads a trial over
the arms that are still plausibly best. Learning happens across trials, from stored results.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import select

from contracts.config import PriceCatalog, TrialConfig
from orchestrator.state import Assignment, Store, Trial, stored_config


class Outcome(NamedTuple):
    """One graded attempt: which arm, on what kind of task, resolved or not, at what cost."""

    task_kind: str
    agent: str
    pair: str
    resolved: bool
    cost: float


Arm = tuple[str, str]
"""(agent, model pair) — the model pair as a trial names it, `<pair>` or `<pair>:thinking`."""


@dataclass
class ArmStats:
    attempts: int = 0
    successes: int = 0
    cost: float = 0.0

    @property
    def failures(self) -> int:
        return self.attempts - self.successes


class ThompsonBandit:
    """Posteriors per (task kind, arm), built from past outcomes."""

    def __init__(
        self,
        history: Iterable[Outcome | tuple[str, str, str, bool, float]],
        cost_prior_weight: float = 1.0,
    ):
        self.stats: dict[tuple[str, Arm], ArmStats] = {}
        total_cost, total_attempts = 0.0, 0
        for row in history:
            o = Outcome(*row)
            if o.cost < 0:
                raise ValueError(f"negative cost {o.cost} for {o.agent} × {o.pair}")
            s = self.stats.setdefault((o.task_kind, (o.agent, o.pair)), ArmStats())
            s.attempts += 1
            s.successes += bool(o.resolved)
            s.cost += float(o.cost)
            total_cost += float(o.cost)
            total_attempts += 1
        mean = total_cost / total_attempts if total_attempts else 0.0
        self.prior_shape = cost_prior_weight
        # With no cost seen anywhere the scale is arbitrary (every arm shares it): use 1.
        self.prior_rate = cost_prior_weight * (mean if mean > 0 else 1.0)

    def arm_stats(self, kind: str, arm: Arm) -> ArmStats:
        return self.stats.get((kind, arm), ArmStats())

    def sample(self, kind: str, arm: Arm, rng: random.Random) -> float:
        """One draw of successes per unit of money (θ·λ) for `arm` on tasks of `kind`."""
        s = self.arm_stats(kind, arm)
        theta = rng.betavariate(1 + s.successes, 1 + s.failures)
        rate = rng.gammavariate(self.prior_shape + s.attempts, 1 / (self.prior_rate + s.cost))
        return theta * rate

    def choose(self, kind: str, arms: Sequence[Arm], rng: random.Random) -> Arm:
        """The arm whose draw is highest (Thompson sampling)."""
        if not arms:
            raise ValueError("no arm to choose from")
        return max(arms, key=lambda arm: self.sample(kind, arm, rng))


def task_kind(config: TrialConfig, task_id: str) -> str:
    """The kind a task's outcomes are pooled under: `assignment.task_kinds`, else its id."""
    return config.assignment.task_kinds.get(task_id, task_id)


def history_from_state(
    store: Store,
    currency: str | None = None,
    prices: PriceCatalog | None = None,
    project: str | None = None,
) -> list[Outcome]:
    """Graded attempts of every trial in the state DB (optionally one project's), oldest first.

    Only `finished` assignments with a grade count (an infrastructure failure or a cancel says
    nothing about the arm). Costs are in each trial's currency; with `currency`, they are
    converted through `prices.fx`, and rows whose currency cannot be converted are skipped.
    """
    out: list[Outcome] = []
    with store.session() as s:
        query = (
            select(Assignment, Trial.config)
            .join(Trial, Assignment.trial_id == Trial.id)
            .where(Assignment.state == "finished", Assignment.status.is_not(None))
            .order_by(Trial.created_at, Assignment.index)
        )
        if project is not None:
            query = query.where(Trial.project == project)
        configs: dict[str, TrialConfig] = {}
        for a, trial_config in s.execute(query):
            ending = a.ending
            if ending.cost is None:
                continue
            cost, have = ending.cost, ending.currency
            if currency is not None and have != currency:
                if prices is None or have not in prices.fx or currency not in prices.fx:
                    continue
                cost = cost / prices.fx[have] * prices.fx[currency]
            if a.trial_id not in configs:
                configs[a.trial_id] = stored_config(trial_config)
            kinds = configs[a.trial_id].assignment.task_kinds
            kind = kinds.get(a.task_id, a.task_id)
            out.append(Outcome(kind, a.agent, a.model, a.status == "resolved", float(cost)))
    return out
