"""No loss: Elasticsearch goes away under load and comes back; every flow lands exactly once.

The issue's "stop the index for ten minutes under load" compressed to seconds: a writer thread
keeps appending to the spool while the stand-in refuses connections, then answers 503, then
throttles items with 429, then heals. Backoff is real, with short delays.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from es_harness import StandInElasticsearch
from test_elasticsearch import DAY1, flow, spool

from contracts.dataroot import DataRoot
from traffic.elasticsearch_store import ElasticsearchTrafficStore
from traffic.spool import Spool


def spool_sizes(root: DataRoot) -> dict[str, int]:
    return {
        p.relative_to(root.traffic_logs).as_posix(): p.stat().st_size
        for p in root.traffic_logs.glob("*/*/flows.jsonl")
    }


def test_an_outage_under_load_loses_nothing_and_repeats_nothing(
    stand_in: StandInElasticsearch, tmp_path: Path
) -> None:
    root = DataRoot.at(tmp_path)
    total = 1200
    written: list[str] = []

    def write() -> None:
        with Spool(root) as s:
            for n in range(total):
                # A minute apart: the flows cross midnight into a second daily index.
                record = flow(DAY1 + 60_000 + n * 60, project=f"p{n % 3}")
                s.append(record)
                written.append(record.id)
                time.sleep(0.0012)

    writer = threading.Thread(target=write)
    es = ElasticsearchTrafficStore.in_root(
        root, stand_in.url, chunk_size=50, initial_backoff_s=0.005, max_backoff_s=0.05
    )
    shipped = 0
    frozen: dict[str, dict[str, int]] = {}

    def ship_for(seconds: float) -> None:
        nonlocal shipped
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            shipped += es.catch_up(root.traffic_logs)
            time.sleep(0.01)

    writer.start()
    ship_for(0.3)
    assert shipped > 0, "nothing shipped while Elasticsearch was up"

    stand_in.down()  # connection refused
    frozen["refused"] = es.offsets()
    ship_for(0.4)
    assert es.offsets() == frozen["refused"]
    stand_in.up()

    stand_in.fail_with(503)
    frozen["503"] = es.offsets()
    ship_for(0.4)
    assert es.offsets() == frozen["503"]
    stand_in.fail_with(None)

    stand_in.throttle_every = 3  # every third item of a bulk answered 429, the rest created
    ship_for(0.4)
    stand_in.throttle_every = 0

    writer.join()
    assert len(written) == total
    assert spool_sizes(root) != es.offsets(), "the outage should have left work to do"
    deadline = time.monotonic() + 20
    while es.offsets() != spool_sizes(root) and time.monotonic() < deadline:
        ship_for(0.05)

    assert es.offsets() == spool_sizes(root)
    assert set(stand_in.documents()) == set(written)
    assert len(stand_in.creates) == total and set(stand_in.creates.values()) == {1}
    assert shipped == total
    assert len(stand_in.indices) == 2
    # Each kind of trouble really happened, and the retries met documents already there.
    assert stand_in.statuses[503] > 0
    assert stand_in.statuses[429] > 0
    assert stand_in.statuses[409] > 0
    es.close()


def test_backoff_doubles_skips_calls_and_resets(
    stand_in: StandInElasticsearch, tmp_path: Path
) -> None:
    root = DataRoot.at(tmp_path)
    spool(root, [flow(DAY1)])
    now = [0.0]
    es = ElasticsearchTrafficStore.in_root(
        root, stand_in.url, clock=lambda: now[0], initial_backoff_s=1.0, max_backoff_s=4.0
    )

    def attempts(at: float) -> int:
        now[0] = at
        before = len(stand_in.requests)
        assert es.catch_up(root.traffic_logs) == 0
        return len(stand_in.requests) - before

    stand_in.fail_with(503)
    assert attempts(0.0) == 1
    assert attempts(0.99) == 0  # waits 1 s
    assert attempts(1.0) == 1
    assert attempts(2.99) == 0  # then 2 s
    assert attempts(3.0) == 1
    assert attempts(6.99) == 0  # then 4 s
    assert attempts(7.0) == 1
    assert attempts(10.99) == 0  # and never more than max_backoff_s
    stand_in.fail_with(None)
    now[0] = 11.0
    assert es.catch_up(root.traffic_logs) == 1
    spool(root, [flow(DAY1)])
    stand_in.fail_with(503)
    assert attempts(11.0) == 1
    assert attempts(11.99) == 0  # a success started the backoff over at 1 s
    stand_in.fail_with(None)
    now[0] = 12.0
    assert es.catch_up(root.traffic_logs) == 1
    es.close()
