"""Keeps the traffic store (SQLite or Elasticsearch) caught up with the spool as the proxy runs.

On by default, for whatever starts mitmdump alone. The stack, docker-compose and the bench set
`autovibe_indexer=false` and run `python -m traffic.indexer` beside the proxy instead: indexing
(FTS5 above all) then stops competing with the request path for this process's interpreter.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from proxy.addons import dataroot
from traffic.indexer import SettingNames, catch_up, open_store
from traffic.sqlite_store import DEFAULT_BODY_MAX
from traffic.stores import DEFAULT, STORES, TrafficStore

ENABLED_OPTION = "autovibe_indexer"
STORE_OPTION = "autovibe_traffic_store"
URL_OPTION = "autovibe_elasticsearch_url"
URL_ENV = "AUTOVIBE_ELASTICSEARCH_URL"
BODY_MAX_OPTION = "autovibe_index_body_max"
OPTION_NAMES = SettingNames(STORE_OPTION, URL_OPTION, BODY_MAX_OPTION)


class Indexer:
    interval_s = 1.0
    """Seconds between catch-ups; the store trails the spool by about this much."""

    def __init__(self) -> None:
        self.store: TrafficStore | None = None
        self.traffic_logs: Path | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False

    def load(self, loader: Loader) -> None:
        dataroot.add_option(loader)
        loader.add_option(
            name=ENABLED_OPTION,
            typespec=bool,
            default=True,
            help="Index the spool from a thread of this process; false when `python -m "
            "traffic.indexer` runs beside the proxy (the stack does), so no store is opened here.",
        )
        loader.add_option(
            name=STORE_OPTION,
            typespec=str,
            default=DEFAULT,
            help=f"Where captured flows are indexed from the spool: {' or '.join(STORES)}.",
        )
        loader.add_option(
            name=URL_OPTION,
            typespec=str,
            # From the environment by default: a password on mitmdump's command line is
            # readable by any local user in /proc/<pid>/cmdline.
            default=os.environ.get(URL_ENV, ""),
            help="Elasticsearch URL (http[s]://[user:password@]host:port) for "
            f"{STORE_OPTION}=elasticsearch; default: ${URL_ENV}, the way to pass a password.",
        )
        loader.add_option(
            name=BODY_MAX_OPTION,
            typespec=int,
            default=DEFAULT_BODY_MAX,
            help="Bytes of each body (and of each websocket's messages) kept in the traffic "
            "store; the spool keeps more (autovibe_spool_body_max).",
        )

    def configure(self, updated: set[str]) -> None:
        options = {dataroot.OPTION, ENABLED_OPTION, STORE_OPTION, URL_OPTION, BODY_MAX_OPTION}
        if not updated & options:
            return
        store: TrafficStore | None = None
        root = dataroot.current()
        if getattr(ctx.options, ENABLED_OPTION):
            try:
                store = open_store(
                    root,
                    getattr(ctx.options, STORE_OPTION),
                    url=getattr(ctx.options, URL_OPTION).strip(),
                    body_max=getattr(ctx.options, BODY_MAX_OPTION),
                    names=OPTION_NAMES,
                )
            except ValueError as exc:
                raise exceptions.OptionsError(str(exc)) from exc
        with self._lock:
            if self.store is not None:
                self.store.close()
            self.store = store
            self.traffic_logs = root.traffic_logs
        if store is not None and self._running:
            self._start()

    def running(self) -> None:
        self._running = True
        if self.store is not None:
            self._start()

    def _start(self) -> None:
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
            if self.store is not None:
                self.store.close()
                self.store = None

    def catch_up(self) -> int:
        with self._lock:
            if self.store is None or self.traffic_logs is None:
                return 0
            return catch_up(self.store, self.traffic_logs)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.catch_up()
