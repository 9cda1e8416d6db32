"""The intake channels as a long-running process: `autovibe intake github`, and the `intake`
service `autovibe up` starts when `$AUTOVIBE_INTAKE_CONFIG` configures a channel
(`python -m orchestrator.intake.service`)."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from types import FrameType

from contracts.dataroot import DataRoot
from contracts.intake import GithubIntake, IntakeConfig, TelegramIntake, load_intake
from contracts.settings import Settings
from orchestrator.client import Client
from orchestrator.intake.github import GithubApi, IssueQueue
from orchestrator.intake.telegram import TelegramBot, bot_for
from orchestrator.platform import Platform
from orchestrator.state import Store, state_url
from secretstore import store_from_env

log = logging.getLogger("autovibe.intake")


class IntakeNotConfigured(Exception):
    """No intake file, or no section for the channel asked for."""


def intake_config(settings: Settings) -> IntakeConfig:
    if settings.intake_config is None:
        raise IntakeNotConfigured(
            "no intake configured: set AUTOVIBE_INTAKE_CONFIG to a YAML file (see README, Intake)"
        )
    return load_intake(settings.intake_config)


def github_queue(
    settings: Settings, config: GithubIntake, client: Client | None = None
) -> IssueQueue:
    """The issue queue of `config`: its token from the secret store, the API as the operator."""
    token = store_from_env(settings=settings).get(config.token_secret)
    return IssueQueue(
        config,
        GithubApi(token, config.api_url, config.rate_floor),
        client or Client(settings),
        Store(state_url(settings)),
        DataRoot.at(settings.data),
        token,
    )


CHANNELS = ("github", "telegram")
"""The channels that run as this process (the concierge and the webhook live in the API)."""


def channels(config: IntakeConfig) -> list[str]:
    return [name for name in CHANNELS if getattr(config, name) is not None]


def run(settings: Settings, only: str | None = None, once: bool = False) -> None:
    """Run the configured channels (or `only` one) until SIGTERM or SIGINT; with `once`, one
    round each."""
    config = intake_config(settings)
    wanted = [c for c in channels(config) if only in (None, c)]
    if not wanted:
        raise IntakeNotConfigured(
            f"{settings.intake_config}: no {only or 'github: or telegram:'} section"
        )
    stop = threading.Event()
    if not once:

        def _stop(_sig: int, _frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    workers = []
    if config.github is not None and "github" in wanted:
        queue = github_queue(settings, config.github)
        if once:
            queue.step()
        else:
            log.warning("intake: GitHub issue queue on %d repositories", len(config.github.repos))
            workers.append(threading.Thread(target=queue.run, args=(stop,), daemon=True))
    for worker in workers:
        worker.start()
    if config.telegram is not None and "telegram" in wanted:
        asyncio.run(_telegram(settings, config.telegram, stop, once))
    for worker in workers:
        worker.join()


async def _telegram(
    settings: Settings, config: TelegramIntake, stop: threading.Event, once: bool
) -> None:
    token = store_from_env(settings=settings).get(config.token_secret)
    async with bot_for(config, token) as bot:
        tg = TelegramBot(config, bot, Client(settings), Platform.from_settings(settings))
        if once:
            await tg.step(timeout=0)
            return
        log.warning("intake: Telegram bot for %d users", len(config.allowed_users))
        await tg.run(stop)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(Settings())
