"""The model plane's supervisor: a model server that died while the API runs is started again.

The scheduler calls `check` on every tick. A server that `autovibe up` started (it has a pid
file) and that no longer runs is restarted through the stack, proven with a real completion,
at most `Settings.model_restarts` times per API process, after a back-off that doubles with
each restart. Every restart, and giving up, is logged and shown as an event on each active
trial's stream; the assignments whose calls fell in the gap end `model_unreachable` and are
run again by the scheduler.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from contracts.dataroot import DataRoot
from contracts.settings import Settings
from orchestrator import stack

log = logging.getLogger("autovibe.supervisor")

BACKOFF_S = 1.0
"""Wait before the first restart; doubled before each later one (a crash loop is not a loop)."""


class ModelSupervisor:
    def __init__(self, settings: Settings, announce: Callable[[str, dict[str, object]], None]):
        self.settings = settings
        self.announce = announce
        """Puts an event (`kind`, data) on every active trial's stream."""
        self.restarts = 0
        self.watching = False
        """Set once the server was seen started by `up`; a failed restart removes its pid file."""
        self.gave_up = False

    def check(self) -> None:
        """Restart the model server if `up` started it and it has died."""
        root = DataRoot.at(self.settings.data)
        self.watching = self.watching or stack.recorded(root, "model")
        if self.gave_up or not self.watching or stack.running_pid(root, "model") is not None:
            return
        if self.restarts >= self.settings.model_restarts:
            self.gave_up = True
            detail = (
                f"died and is not restarted ({self.restarts} of {self.settings.model_restarts} "
                f"restarts used); see {root.run / 'model.log'}"
            )
            log.error("model server %s", detail)
            self.announce("model_server_down", {"detail": detail})
            return
        self.restarts += 1
        time.sleep(BACKOFF_S * 2 ** (self.restarts - 1))
        count = f"{self.restarts} of {self.settings.model_restarts}"
        log.warning("model server died; restart %s", count)
        try:
            stack.up(self.settings, ["model"])
        except stack.StackError as exc:
            log.error("model server restart %s failed: %s", count, exc)
            self.announce(
                "model_server_restarted", {"detail": f"restart {count} failed: {exc}", "ok": False}
            )
            return
        self.announce(
            "model_server_restarted", {"detail": f"died and was restarted ({count})", "ok": True}
        )
