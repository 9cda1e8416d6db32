"""The budget plane's scope rules: which counter scopes a trial opens and charges, by name.

A trial charges its project's scope (`project:<p>`, the trial's budget per period), each of
its machines' daily allowance (`machine:<p>:<m>`, the confidence judge's machine `judge` and
the task setups' machine `setup` among them) and each capped task once (`task:<t>:<id>`);
the daily-spend alert watches `daily:<p>`. The proxy reserves in these scopes, the
orchestrator opens them when a trial starts and reports and alerts on them.
"""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from budget import CounterStore, Period
    from contracts.config import TrialConfig


def project_scope(project: str) -> str:
    return f"project:{project}"


def machine_scope(project: str, machine: str) -> str:
    return f"machine:{project}:{machine}"


def task_scope(trial: str, task: str) -> str:
    return f"task:{trial}:{task}"


def daily_scope(project: str) -> str:
    return f"daily:{project}"


JUDGE_MACHINE = "judge"
"""The machine name the confidence judge calls the model plane as, through the proxy: its
calls are charged to the trial's project and to this machine's daily allowance."""
SETUP_MACHINE = "setup"
"""The machine name a task's setup commands reach the operator's registries as, through the
proxy (`orchestrator.setup_access`): their flows are captured under it, and whatever they
cost is charged to the trial's project and to this machine's daily allowance."""


def machines_of(config: TrialConfig) -> list[str]:
    """The names of a trial's machines: m1 … mN."""
    return [f"m{i}" for i in range(1, config.machines.count + 1)]


def trial_scopes(trial_id: str, config: TrialConfig) -> list[str]:
    """The counter scopes a trial opened: its project, each machine's day, each capped task."""
    p = config.project
    return [
        project_scope(p),
        *(machine_scope(p, m) for m in machines_of(config)),
        machine_scope(p, JUDGE_MACHINE),
        machine_scope(p, SETUP_MACHINE),
        *(task_scope(trial_id, t.id) for t in config.tasks if t.budget is not None),
    ]


def open_project(
    store: CounterStore,
    project: str,
    machines: list[str],
    *,
    amount: Decimal,
    daily_allowance: Decimal,
    currency: str,
    period: Period,
    now: float,
) -> None:
    """Open (or reopen) a project's scope and each machine's daily scope; idempotent."""
    store.ensure_scope(project_scope(project), amount, currency, period, now)
    for machine in machines:
        store.ensure_scope(machine_scope(project, machine), daily_allowance, currency, "daily", now)


def open_trial(store: CounterStore, config: TrialConfig, trial_id: str, now: float) -> None:
    """Open the scopes the proxy charges for a trial: project, each machine's day (the judge's
    and the setups' too), each capped task. Reopening keeps what was spent; limits and periods
    become this trial's."""
    b = config.budget
    open_project(
        store,
        config.project,
        [*machines_of(config), JUDGE_MACHINE, SETUP_MACHINE],
        amount=b.amount,
        daily_allowance=config.machines.daily_allowance,
        currency=b.currency,
        period=b.period,
        now=now,
    )
    for task in config.tasks:
        if task.budget is not None:
            store.ensure_scope(task_scope(trial_id, task.id), task.budget, b.currency, "once", now)


def open_ample(path: Path, project: str, machines: list[str], currency: str = "USD") -> None:
    """A budget no test or benchmark will exhaust, in the embedded store at `path`."""
    from budget import open_counters

    store = open_counters("sqlite", path=path)
    try:
        ample = Decimal(10**6)
        open_project(
            store,
            project,
            machines,
            amount=ample,
            daily_allowance=ample,
            currency=currency,
            period="once",
            now=time.time(),
        )
    finally:
        store.close()
