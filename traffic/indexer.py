"""`python -m traffic.indexer`: keeps the traffic store caught up with the spool, in its own
process.

The proxy appends each flow to the spool (JSONL, the source of truth); this process reads the
spool every `index_interval_s` and feeds the store named by `AUTOVIBE_TRAFFIC_STORE` (SQLite
with FTS5, or Elasticsearch at `AUTOVIBE_ELASTICSEARCH_URL`). Both stores keep their offsets
with what they took in, so it may be stopped, restarted or run beside another catch-up (the
API's reads) without losing or repeating a flow. The stack and docker-compose run it next to
mitmdump started with `autovibe_indexer=false`, so indexing never competes with the request
path for the proxy's interpreter; it runs at a lower priority (`index_nice`), so it does not
compete with it for the CPU either. SIGTERM or SIGINT: one last catch-up, then exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from common import logs
from contracts.dataroot import DataRoot
from contracts.settings import Settings
from traffic.sqlite_store import DEFAULT_BODY_MAX
from traffic.stores import STORES, TrafficStore, get_store

log = logging.getLogger(__name__)

READY_FILE = "indexer.ready"
"""In the data root's `run/`: the pid of the indexer that opened its store and is catching up."""


@dataclass(frozen=True)
class SettingNames:
    """What the person configuring the indexer calls each setting, for the error messages."""

    store: str
    url: str
    body_max: str


ENV_NAMES = SettingNames(
    "AUTOVIBE_TRAFFIC_STORE", "AUTOVIBE_ELASTICSEARCH_URL", "AUTOVIBE_INDEX_BODY_MAX"
)


def open_store(
    root: DataRoot, name: str, *, url: str, body_max: int, names: SettingNames = ENV_NAMES
) -> TrafficStore:
    """The traffic store `name` of `root`; ValueError, naming the setting, if it cannot work."""
    if body_max < 0:
        raise ValueError(f"{names.body_max} must be 0 or more bytes, got {body_max}")
    if name not in STORES:
        raise ValueError(f"{names.store}: unknown store {name!r}: use one of {', '.join(STORES)}")
    options = {}
    if name == "elasticsearch":
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(
                f"{names.url} must be an http:// or https:// URL with a host when "
                f"{names.store}=elasticsearch, got {url!r}"
            )
        options["url"] = url
    store = get_store(name, root, **options)
    # Both stores cut bodies the same way (traffic.sqlite_store.index_copy).
    store.body_max = body_max
    return store


def store_for(settings: Settings) -> TrafficStore:
    """The traffic store `settings` name (`traffic_store`, `elasticsearch_url`, ...)."""
    body_max = DEFAULT_BODY_MAX if settings.index_body_max is None else settings.index_body_max
    return open_store(
        DataRoot.at(settings.data),
        settings.traffic_store,
        url=(settings.elasticsearch_url or "").strip(),
        body_max=body_max,
    )


def catch_up(store: TrafficStore, traffic_logs: Path) -> int:
    """One catch-up of `store`; a failure is logged and left to the next round."""
    try:
        return store.catch_up(traffic_logs)
    except (sqlite3.Error, OSError):
        # The spool keeps everything; the next round picks up where this one failed.
        log.exception("traffic store catch-up failed")
        return 0


def ready_pid(root: DataRoot) -> int | None:
    """The pid in `run/indexer.ready`: an indexer that got its store open, if one did."""
    try:
        return int((root.run / READY_FILE).read_text())
    except (OSError, ValueError):
        return None


def healthy(root: DataRoot | None = None) -> bool:
    """An indexer got its store open and still runs (the container's healthcheck)."""
    pid = ready_pid(root or DataRoot.at(Settings().data))
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user
    return True


def run(settings: Settings, stop: threading.Event) -> int:
    """Catch the store up every `index_interval_s` until `stop` is set, then once more.

    Returns the number of flows taken in.
    """
    root = DataRoot.at(settings.data)
    store = store_for(settings)
    ready = DataRoot.ensure(root.run) / READY_FILE
    ready.write_text(str(os.getpid()))
    extra = {"store": settings.traffic_store, "traffic_logs": str(root.traffic_logs)}
    log.info("indexer started", extra=extra | {"interval_s": settings.index_interval_s})
    total = 0
    try:
        while True:
            added = catch_up(store, root.traffic_logs)
            if added:
                log.debug("flows indexed", extra={"flows": added})
            total += added
            if stop.is_set():
                # That round ran after the stop: nothing spooled before it is left behind.
                break
            stop.wait(settings.index_interval_s)
    finally:
        store.close()
        with contextlib.suppress(OSError):
            if ready_pid(root) == os.getpid():
                ready.unlink()
    log.info("indexer stopped", extra=extra | {"flows": total})
    return total


def main() -> None:
    """Run the indexer for this environment's settings until SIGTERM or SIGINT."""
    logs.configure()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        settings = Settings()
        if settings.index_nice:
            os.nice(settings.index_nice)
        run(settings, stop)
    except ValueError as exc:
        log.error("indexer not started: %s", exc)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
