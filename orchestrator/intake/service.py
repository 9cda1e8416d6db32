"""The intake channels as a long-running process: `autovibe intake github`, and the `intake`
service `autovibe up` starts when `$AUTOVIBE_INTAKE_CONFIG` configures a channel
(`python -m orchestrator.intake.service`)."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from contracts.dataroot import DataRoot
from contracts.intake import GithubIntake, IntakeConfig, load_intake
from contracts.settings import Settings
from orchestrator.client import Client
from orchestrator.intake.github import GithubApi, IssueQueue
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


def run(settings: Settings, once: bool = False) -> None:
    """Run every configured channel until SIGTERM or SIGINT (one round each with `once`)."""
    config = intake_config(settings)
    if config.github is None:
        raise IntakeNotConfigured(f"{settings.intake_config}: no channel configured (github:)")
    queue = github_queue(settings, config.github)
    if once:
        queue.step()
        return
    stop = threading.Event()

    def _stop(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.warning("intake: GitHub issue queue on %d repositories", len(config.github.repos))
    queue.run(stop)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(Settings())
