"""The Telegram bot against a stand-in of the Bot API (tests/orchestrator/telegram_standin.py: a
real HTTP server speaking the documented methods), with real everything else:
python-telegram-bot's Bot, the control API (TestClient), the state DB, the budget counters, the
scheduler and runner (the `command` agent, unsandboxed), the report and its chart.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from git_servers import CALC_BUG, TEST
from telegram_standin import BotApi, bot_api_standin
from trial_runs import operator_api, trial_settings

from contracts.intake import TelegramIntake
from orchestrator.client import Client
from orchestrator.intake.telegram import TelegramBot, bot_for
from orchestrator.platform import Platform
from orchestrator.scheduler import Scheduler
from orchestrator.state import BudgetAlert, Trial

TOKEN = "123456:standin-bot-token"
ALICE, BOB, MALLORY = 1001, 1002, 6666
FIX_AGENT = "import pathlib; p = pathlib.Path('calc.py'); p.write_text(p.read_text().replace('a - b', 'a + b'))"  # noqa: E501


@dataclass
class World:
    api: BotApi
    platform: Platform
    config: TelegramIntake
    client: Client

    def audit(self) -> list[dict[str, Any]]:
        folder = self.platform.root.root / "audit"
        return [
            json.loads(line)
            for path in sorted(folder.glob("intake-*.jsonl"))
            for line in path.read_text().splitlines()
        ]

    def run(self, *steps: Any, **overrides: Any) -> TelegramBot:
        """A bot, started on the stand-in, taking `steps` (coroutine functions of the bot)."""
        config = self.config.model_copy(update=overrides)

        async def go() -> TelegramBot:
            async with bot_for(config, TOKEN) as bot:
                tg = TelegramBot(config, bot, self.client, self.platform)
                for step in steps:
                    await step(tg)
                return tg

        return asyncio.run(go())


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    repo = tmp_path / "calc"
    (repo / "tests").mkdir(parents=True)
    (repo / "calc.py").write_text(CALC_BUG)
    (repo / "tests" / "test_calc.py").write_text(TEST)
    trials = tmp_path / "trials"
    trials.mkdir()
    trial = {
        "name": "calc",
        "project": "tg",
        "budget": {"amount": "1", "currency": "CAD", "period": "monthly"},
        "agents": ["command"],
        "model_pairs": ["tiny"],
        "sandbox": {"kind": "none"},
        "tasks": [
            {
                "id": "calc",
                "repo": str(repo),
                "prompt": "Fix add().",
                "test_command": "python -m pytest -q",
                "fail_to_pass": ["tests/test_calc.py::test_add"],
                "timeout_s": 60,
                "agent_command": ["python3", "-c", FIX_AGENT],
            }
        ],
    }
    (trials / "calc.yaml").write_text(yaml.safe_dump(trial))
    with bot_api_standin(TOKEN) as api, operator_api(trial_settings(tmp_path)) as (http, platform):
        config = TelegramIntake(
            allowed_users=[ALICE, BOB], api_url=api.url, trials_dir=trials, poll_timeout_s=0
        )
        yield World(api, platform, config, Client.over(http))


async def step(tg: TelegramBot) -> None:
    await tg.step(timeout=0)


@pytest.mark.slow  # a real trial run between the bot's rounds (~6 s on 2 cores)
def test_run_status_report_cancel_budget_from_a_chat(world: World) -> None:
    api = world.api
    scheduler = Scheduler(world.platform)

    async def run_to_the_end(tg: TelegramBot) -> None:
        api.push(ALICE, "/run calc")
        await tg.step(timeout=0)
        deadline = time.monotonic() + 120
        while tg.watched and time.monotonic() < deadline:
            scheduler.tick()
            await tg.step(timeout=0)
            await asyncio.sleep(0.2)

    world.run(run_to_the_end)
    # One message for the run, edited as it moved on: never a flood.
    (status,) = api.chat(ALICE)
    with world.platform.store.session() as s:
        (trial,) = s.query(Trial).all()
    assert trial.name.startswith("calc-tg") and trial.status == "finished"
    assert status.text is not None and status.text.startswith(f"{trial.id} {trial.name}: queued")
    assert status.edits, "the status message was never edited"
    assert status.edits[-1].startswith(f"{trial.id} {trial.name}: finished\n1 resolved")
    edits = api.method_calls("editMessageText")
    assert edits == len(status.edits)  # each edit changed the text (no 'not modified' 400)

    def say(*texts: str) -> Any:
        async def go(tg: TelegramBot) -> None:
            for text in texts:
                api.push(ALICE, text)
            await tg.step(timeout=0)

        return go

    world.run(say(f"/report {trial.id}", f"/cancel {trial.id}", "/budget", "/status", "/help"))
    report, chart, curve, cancel, budget, active, helptext = api.chat(ALICE)[1:]
    assert "command" in (report.text or "") and "tiny" in (report.text or "")
    for image in (chart, curve):
        assert image.photo is not None and image.photo.startswith(b"\x89PNG")
    assert cancel.text == f"{trial.id} {trial.name}: finished"  # nothing left to cancel
    assert budget.text is not None and budget.text.startswith("tg: spent")
    assert "of 1.000000 CAD (monthly)" in budget.text or "of 1 CAD (monthly)" in budget.text
    assert active.text == "no active trial"
    assert helptext.text is not None and "/run NAME" in helptext.text
    commands = [e["command"] for e in world.audit() if e["action"] == "command"]
    assert commands == ["/run", "/report", "/cancel", "/budget", "/status", "/help"]


def test_strangers_get_one_refusal_and_every_user_a_rate_limit(world: World) -> None:
    api = world.api

    async def flood(tg: TelegramBot) -> None:
        for _ in range(3):
            api.push(MALLORY, "/status")
        for _ in range(12):
            api.push(ALICE, "/status")
        await tg.step(timeout=0)
        for _ in range(6):
            api.push(BOB, "/status")
        await tg.step(timeout=0)

    world.run(flood, overall_per_minute=15)
    (refusal,) = api.chat(MALLORY)
    assert refusal.text == "You are not allowed to use this bot."
    alice = [m.text for m in api.chat(ALICE)]
    assert alice[:10] == ["no active trial"] * 10
    assert len(alice) == 11 and (alice[10] or "").startswith("429 Too Many Requests: retry in")
    # Bob is within his own 10, but 10 of the 15 a minute for everybody are spent: 5 answered.
    bob = [m.text for m in api.chat(BOB)]
    assert bob[:5] == ["no active trial"] * 5
    assert len(bob) == 6 and (bob[5] or "").startswith("429")
    actions = [(e["who"], e["action"]) for e in world.audit()]
    assert actions.count((f"telegram:{MALLORY}", "refused")) == 3
    assert actions.count((f"telegram:{ALICE}", "rate_limited")) == 2
    assert actions.count((f"telegram:{BOB}", "rate_limited")) == 1
    assert TelegramIntake(allowed_users=[1]).per_user_per_minute == 10
    assert TelegramIntake(allowed_users=[1]).overall_per_minute == 100


def test_budget_alerts_are_pushed_to_every_allowed_user_once(world: World) -> None:
    api = world.api
    with world.platform.store.session() as s:
        s.add(Trial(id="t1", name="old", project="tg", config={}))
    with world.platform.store.session() as s:
        s.add(_alert("0.5"))  # raised before the bot started: not pushed

    async def alert_then_step(tg: TelegramBot) -> None:
        tg.mark_alerts_seen()
        with world.platform.store.session() as s:
            s.add(_alert("0.8"))
        await tg.step(timeout=0)
        await tg.step(timeout=0)

    world.run(alert_then_step)
    for user in (ALICE, BOB):
        (pushed,) = api.chat(user)
        assert pushed.text == ("budget alert: trial t1, project:tg crossed 0.8: 0.80 of 1.00 CAD")
    assert [e["action"] for e in world.audit()] == ["budget_alert"]


def _alert(threshold: str) -> BudgetAlert:
    used = str(Decimal(threshold).quantize(Decimal("0.01")))
    return BudgetAlert(
        trial_id="t1", project="tg", scope="project:tg", period="once", threshold=threshold,
        used=used, limit="1.00", currency="CAD",
    )  # fmt: skip


@pytest.mark.live
@pytest.mark.skipif(
    not os.environ.get("TELEGRAM_BOT_TOKEN"), reason="needs TELEGRAM_BOT_TOKEN (a test bot's)"
)
def test_live_bot_api_answers_get_me_and_get_updates() -> None:
    config = TelegramIntake(allowed_users=[1])

    async def go() -> None:
        async with bot_for(config, os.environ["TELEGRAM_BOT_TOKEN"]) as bot:
            me = await bot.get_me()
            assert me.is_bot
            await bot.get_updates(timeout=0)

    asyncio.run(go())
