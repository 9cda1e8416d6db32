"""The orchestrator opens the scopes the proxy charges, in the store the proxy reads."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from budget.sqlite import SqliteCounters
from contracts.config import TrialConfig
from contracts.settings import Settings
from orchestrator.platform import Platform


def test_open_ledger_opens_project_machine_and_task_scopes(
    tmp_path: Path, demo_trial: dict[str, Any]
) -> None:
    demo_trial["machines"] = {"count": 2, "daily_allowance": "0.5"}
    demo_trial["tasks"][0]["budget"] = "0.25"
    config = TrialConfig.model_validate(demo_trial)
    platform = Platform.from_settings(Settings(data=tmp_path / "data"))

    platform.open_ledger(config, "t-1")
    platform.open_ledger(config, "t-1")  # idempotent, as a retried submission would be

    store = SqliteCounters(platform.root.budget_counters)
    b = config.budget
    project = store.describe(f"project:{config.project}")
    assert project is not None
    assert (project.limit, project.currency, project.period) == (b.amount, b.currency, b.period)
    for machine in ("m1", "m2"):
        allowance = store.describe(f"machine:{config.project}:{machine}")
        assert allowance is not None
        assert (allowance.limit, allowance.period) == (Decimal("0.5"), "daily")
    assert store.describe(f"machine:{config.project}:m3") is None
    for t in config.tasks:
        scope = store.describe(f"task:t-1:{t.id}")
        if t.budget is None:
            assert scope is None
        else:
            assert scope is not None and (scope.limit, scope.period) == (t.budget, "once")
    assert config.tasks[0].budget == Decimal("0.25")
    store.close()
