"""Keeps the traffic store (SQLite or Elasticsearch) caught up with the spool as the proxy runs."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from proxy.addons import dataroot
from proxy.index import DEFAULT_BODY_MAX
from proxy.stores import DEFAULT, STORES, TrafficStore, get_store

log = logging.getLogger(__name__)

STORE_OPTION = "autovibe_traffic_store"
URL_OPTION = "autovibe_elasticsearch_url"
BODY_MAX_OPTION = "autovibe_index_body_max"


class Indexer:
    interval_s = 1.0
    """Seconds between catch-ups; the store trails the spool by about this much."""

    def __init__(self) -> None:
        self.store: TrafficStore | None = None
        self.traffic_logs: Path | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def load(self, loader: Loader) -> None:
        dataroot.add_option(loader)
        loader.add_option(
            name=STORE_OPTION,
            typespec=str,
            default=DEFAULT,
            help=f"Where captured flows are indexed from the spool: {' or '.join(STORES)}.",
        )
        loader.add_option(
            name=URL_OPTION,
            typespec=str,
            default="",
            help="Elasticsearch URL (http[s]://[user:password@]host:port) for "
            f"{STORE_OPTION}=elasticsearch.",
        )
        loader.add_option(
            name=BODY_MAX_OPTION,
            typespec=int,
            default=DEFAULT_BODY_MAX,
            help="Bytes of each body (and of each websocket's messages) kept in the traffic "
            "store; the spool keeps more (autovibe_spool_body_max).",
        )

    def configure(self, updated: set[str]) -> None:
        if not updated & {dataroot.OPTION, STORE_OPTION, URL_OPTION, BODY_MAX_OPTION}:
            return
        root = dataroot.current()
        name: str = getattr(ctx.options, STORE_OPTION)
        url: str = getattr(ctx.options, URL_OPTION).strip()
        body_max: int = getattr(ctx.options, BODY_MAX_OPTION)
        if body_max < 0:
            raise exceptions.OptionsError(
                f"{BODY_MAX_OPTION} must be 0 or more bytes, got {body_max}"
            )
        if name not in STORES:
            raise exceptions.OptionsError(
                f"{STORE_OPTION}: unknown store {name!r}: use one of {', '.join(STORES)}"
            )
        options = {}
        if name == "elasticsearch":
            parts = urlsplit(url)
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                raise exceptions.OptionsError(
                    f"{URL_OPTION} must be an http:// or https:// URL with a host when "
                    f"{STORE_OPTION}=elasticsearch, got {url!r}"
                )
            options["url"] = url
        store = get_store(name, root, **options)
        # Both stores cut bodies the same way (proxy.index.index_copy).
        store.body_max = body_max
        with self._lock:
            if self.store is not None:
                self.store.close()
            self.store = store
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
            if self.store is not None:
                self.store.close()
                self.store = None

    def catch_up(self) -> int:
        with self._lock:
            if self.store is None or self.traffic_logs is None:
                return 0
            try:
                return self.store.catch_up(self.traffic_logs)
            except (sqlite3.Error, OSError):
                # The spool keeps everything; the next round picks up where this one failed.
                log.exception("traffic store catch-up failed")
                return 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.catch_up()
