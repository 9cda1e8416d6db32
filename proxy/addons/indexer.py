"""Keeps the traffic index caught up with the spool while the proxy runs."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

from mitmproxy.addonmanager import Loader

from proxy.addons import dataroot
from proxy.index import TrafficIndex

log = logging.getLogger(__name__)


class Indexer:
    interval_s = 1.0
    """Seconds between catch-ups; the index trails the spool by about this much."""

    def __init__(self) -> None:
        self.index: TrafficIndex | None = None
        self.traffic_logs: Path | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def load(self, loader: Loader) -> None:
        dataroot.add_option(loader)

    def configure(self, updated: set[str]) -> None:
        if dataroot.OPTION in updated:
            root = dataroot.current()
            with self._lock:
                if self.index is not None:
                    self.index.close()
                self.index = TrafficIndex(root.traffic_index)
                self.traffic_logs = root.traffic_logs

    def running(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="autovibe-indexer", daemon=True)
            self._thread.start()

    def done(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        # Flows spooled during shutdown are indexed now rather than on the next start.
        self.catch_up()
        with self._lock:
            if self.index is not None:
                self.index.close()
                self.index = None

    def catch_up(self) -> int:
        with self._lock:
            if self.index is None or self.traffic_logs is None:
                return 0
            try:
                return self.index.catch_up(self.traffic_logs)
            except (sqlite3.Error, OSError):
                # The spool keeps everything; the next round picks up where this one failed.
                log.exception("traffic index catch-up failed")
                return 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.catch_up()
