"""The Telegram bot: operators on an allowlist run, follow, report and cancel trials from a chat.

Commands: `/run NAME` (the trial file `<trials_dir>/NAME.yaml`, submitted under a fresh name),
`/status [ID]` (one message, edited as the trial moves on, never a flood), `/report ID` (the
table; the cost chart and the project's learning curve as images), `/cancel ID`,
`/budget [PROJECT]`. Budget alerts the orchestrator raises are pushed to every allowed user.
A user not on the allowlist gets one refusal; each of their messages is audited. Each user may
send `per_user_per_minute` commands and all together `overall_per_minute`; past that the
answer is a 429-style refusal, given once per window. Every command is a line of
`audit/intake-<day>.jsonl`.

The Bot API is spoken through python-telegram-bot's `Bot` (getUpdates long polling,
sendMessage, editMessageText, sendPhoto); trials through the control API as the operator.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from telegram import Bot, Update
from telegram.error import TelegramError

from budget.scopes import project_scope
from contracts.config import ConfigError, load_trial
from contracts.intake import TelegramIntake
from contracts.reports import TrialReport
from orchestrator.access import AuditLog, MemoryRateWindow
from orchestrator.catalog import Catalog
from orchestrator.client import ApiError, Client
from orchestrator.platform import Platform
from orchestrator.report import learning_curve, to_markdown
from orchestrator.state import BudgetAlert, IntakeCursor

log = logging.getLogger("autovibe.intake.telegram")

ENDED = ("finished", "cancelled")
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_TEXT = 4000
"""Telegram's limit is 4096 characters a message; longer text is cut with a mark."""
ALERTS_CURSOR = "telegram:budget_alerts"
HELP = (
    "/run NAME: submit the trial file NAME\n/status [ID]: a trial's progress (or the active "
    "ones)\n/report ID: its table and chart\n/cancel ID\n/budget [PROJECT]"
)


@dataclass
class _Watched:
    trial_id: str
    text: str


@dataclass
class TelegramBot:
    """One bot: `step` reads the waiting updates and answers them, then edits the watched
    status messages and pushes new budget alerts."""

    config: TelegramIntake
    bot: Bot
    client: Client
    platform: Platform
    audit: AuditLog = field(init=False)
    offset: int | None = None
    watched: dict[tuple[int, int], _Watched] = field(default_factory=dict)
    refused: set[int] = field(default_factory=set)
    """Users outside the allowlist who got their one refusal."""
    warned: dict[int, float] = field(default_factory=dict)
    """User → until when their rate-limit refusal was given (not repeated before)."""
    window: MemoryRateWindow = field(default_factory=MemoryRateWindow)

    def __post_init__(self) -> None:
        self.audit = AuditLog(self.platform.root, "intake")

    async def step(self, timeout: int | None = None) -> None:
        poll = self.config.poll_timeout_s if timeout is None else timeout
        updates = await self.bot.get_updates(
            offset=self.offset, timeout=poll, allowed_updates=["message"]
        )
        for update in updates:
            self.offset = update.update_id + 1
            await self.handle(update)
        await self.refresh_status()
        await self.push_alerts()

    async def run(self, stop: threading.Event) -> None:
        self.mark_alerts_seen()
        while not stop.is_set():
            try:
                await self.step()
            except (TelegramError, ApiError, OSError) as exc:
                log.error("telegram round failed, retried in 5 s: %s", exc)
                await asyncio.sleep(5)

    # -- one message -------------------------------------------------------------------------

    async def handle(self, update: Update) -> None:
        message = update.message
        if message is None or message.from_user is None or not message.text:
            return
        user, chat = message.from_user.id, message.chat_id
        command, _, rest = message.text.strip().partition(" ")
        command = command.split("@", 1)[0].lower()
        args = rest.split()
        who = f"telegram:{user}"
        if user not in self.config.allowed_users:
            self.audit.record(who=who, action="refused", command=command, why="not allowed")
            if user not in self.refused:
                self.refused.add(user)
                await self.bot.send_message(chat, "You are not allowed to use this bot.")
            return
        wait = self._rate_wait(user)
        if wait is not None:
            self.audit.record(who=who, action="rate_limited", command=command)
            if self.warned.get(user, 0) < time.time():
                self.warned[user] = time.time() + wait
                await self.bot.send_message(
                    chat, f"429 Too Many Requests: retry in {max(1, round(wait))} s"
                )
            return
        self.audit.record(who=who, action="command", command=command, args=args)
        handler = {
            "/run": self.cmd_run,
            "/status": self.cmd_status,
            "/report": self.cmd_report,
            "/cancel": self.cmd_cancel,
            "/budget": self.cmd_budget,
        }.get(command)
        if handler is None:
            await self.bot.send_message(chat, HELP)
            return
        try:
            await handler(chat, args)
        except ApiError as exc:
            await self.bot.send_message(chat, _cut("\n".join(exc.problems())))

    def _rate_wait(self, user: int) -> float | None:
        now = time.time()
        wait = self.window.admit(f"user:{user}", self.config.per_user_per_minute, now)
        if wait is None:
            wait = self.window.admit("all", self.config.overall_per_minute, now)
        return wait

    # -- commands ----------------------------------------------------------------------------

    async def cmd_run(self, chat: int, args: list[str]) -> None:
        if len(args) != 1 or not NAME.fullmatch(args[0]):
            await self.bot.send_message(chat, "usage: /run NAME (a trial file's name)")
            return
        path = self.config.trials_dir / f"{args[0]}.yaml"
        try:
            config = load_trial(path, Catalog.load(self.platform.settings).validation_context())
        except FileNotFoundError:
            await self.bot.send_message(
                chat, f"no trial file {args[0]!r} in {self.config.trials_dir}"
            )
            return
        except (ConfigError, ValidationError) as exc:
            await self.bot.send_message(chat, _cut(f"{args[0]} is not a valid trial:\n{exc}"))
            return
        # A trial name is unique: each /run is a trial of its own.
        config.name = f"{config.name[:50]}-tg{secrets.token_hex(3)}"
        created = self.client.submit(config.model_dump(mode="json", exclude_none=True))
        await self._watch(chat, str(created["id"]))

    async def cmd_status(self, chat: int, args: list[str]) -> None:
        if args:
            await self._watch(chat, args[0])
            return
        active = [t for t in self.client.trials() if t["status"] not in ENDED]
        lines = [f"{t['id']} {t['name']}: {t['status']}" for t in active] or ["no active trial"]
        await self.bot.send_message(chat, _cut("\n".join(lines)))

    async def cmd_report(self, chat: int, args: list[str]) -> None:
        if len(args) != 1:
            await self.bot.send_message(chat, "usage: /report ID")
            return
        report = TrialReport.model_validate(self.client.report(args[0]))
        await self.bot.send_message(chat, _cut(to_markdown(report)))
        curve = learning_curve(self.platform, report.project)
        from orchestrator import charts  # matplotlib is slow to import; only when asked

        with tempfile.TemporaryDirectory(prefix="av-telegram-") as tmp:
            chart = charts.cost_chart(report, Path(tmp) / "cost.png")
            await self.bot.send_photo(chat, chart.read_bytes(), caption=f"{args[0]}: cost")
            learnt = charts.learning_curve_chart(curve, Path(tmp) / "curve.png")
            caption = f"{report.project}: learning curve over {len(curve.points)} trials"
            await self.bot.send_photo(chat, learnt.read_bytes(), caption=caption)

    async def cmd_cancel(self, chat: int, args: list[str]) -> None:
        if len(args) != 1:
            await self.bot.send_message(chat, "usage: /cancel ID")
            return
        view = self.client.cancel(args[0])
        await self.bot.send_message(chat, f"{view['id']} {view['name']}: {view['status']}")

    async def cmd_budget(self, chat: int, args: list[str]) -> None:
        projects = args or sorted({t["project"] for t in self.client.trials()})
        counters = self.platform.counters()
        try:
            lines = []
            for project in projects:
                state = counters.describe(project_scope(project))
                if state is None:
                    lines.append(f"{project}: no budget opened")
                    continue
                lines.append(
                    f"{project}: spent {state.spent} of {state.limit} {state.currency} "
                    f"({state.period}), {state.reserved} reserved"
                )
        finally:
            counters.close()
        await self.bot.send_message(chat, _cut("\n".join(lines) or "no project yet"))

    # -- messages kept up to date ------------------------------------------------------------

    async def _watch(self, chat: int, trial_id: str) -> None:
        text = status_text(self.client.trial(trial_id))
        sent = await self.bot.send_message(chat, text)
        if not _ended(text):
            self.watched[(chat, sent.message_id)] = _Watched(trial_id, text)

    async def refresh_status(self) -> None:
        """Edit each watched message whose trial moved on; forget it once the trial ended."""
        for (chat, message_id), w in list(self.watched.items()):
            text = status_text(self.client.trial(w.trial_id))
            if text != w.text:
                await self.bot.edit_message_text(text, chat_id=chat, message_id=message_id)
                w.text = text
            if _ended(text):
                del self.watched[(chat, message_id)]

    def mark_alerts_seen(self) -> None:
        """Alerts raised before the bot started are not pushed."""
        with self.platform.store.session() as s:
            last = s.scalar(select(func.max(BudgetAlert.id))) or 0
            cursor = s.get(IntakeCursor, ALERTS_CURSOR) or IntakeCursor(key=ALERTS_CURSOR)
            cursor.etag = str(max(last, int(cursor.etag or 0)))
            s.add(cursor)

    async def push_alerts(self) -> None:
        with self.platform.store.session() as s:
            cursor = s.get(IntakeCursor, ALERTS_CURSOR) or IntakeCursor(key=ALERTS_CURSOR)
            seen = int(cursor.etag or 0)
            rows = list(
                s.scalars(select(BudgetAlert).where(BudgetAlert.id > seen).order_by(BudgetAlert.id))
            )
            if rows:
                cursor.etag = str(rows[-1].id)
                s.add(cursor)
        for a in rows:
            what = "daily spend" if a.threshold == "daily_spend_above" else f"{a.threshold}"
            text = (
                f"budget alert: trial {a.trial_id}, {a.scope} crossed {what}: "
                f"{a.used} of {a.limit} {a.currency}"
            )
            for user in self.config.allowed_users:
                await self.bot.send_message(user, text)
            self.audit.record(who="intake:telegram", action="budget_alert", alert=a.id)


def status_text(view: dict[str, Any]) -> str:
    """One trial's progress in a few lines: status, assignments by state, spend."""
    counts: dict[str, int] = {}
    for a in view["assignments"]:
        key = a["status"] or a["state"]
        counts[key] = counts.get(key, 0) + 1
    tally = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no assignment"
    spend = view["spend"]
    return (
        f"{view['id']} {view['name']}: {view['status']}\n{tally}\n"
        f"spent {spend['amount']} of {spend['budget']} {spend['currency']}"
    )


def _ended(text: str) -> bool:
    return text.split("\n", 1)[0].rsplit(": ", 1)[-1] in ENDED


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 20] + "\n… (cut)"


def bot_for(config: TelegramIntake, token: str) -> Bot:
    return Bot(token, base_url=f"{config.api_url.rstrip('/')}/bot")
