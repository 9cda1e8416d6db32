"""Crash safety and concurrency of ledger writes, with real processes and the real `bean-check`."""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest

from ledger.book import InferenceItem, Ledger
from ledger.check import bean_check

REPO = Path(__file__).resolve().parents[2]
OPENED = dt.date(2025, 1, 6)
ITEM = InferenceItem("local", "tiny", "m1", Decimal("0.000123"), 100, Decimal("1.38"))

# Posts `count` transactions keyed `<prefix>-<i>` and prints each key once `post_inference`
# has returned: a printed key is an acknowledged, durable posting. With a fourth argument it
# prints `ready` and waits for that file to exist, so several posters start together.
POSTER = """
import datetime as dt, sys, time
from decimal import Decimal
from pathlib import Path
from ledger.book import InferenceItem, Ledger

path, prefix, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ledger = Ledger(path)
if len(sys.argv) > 4:
    print("ready", flush=True)
    while not Path(sys.argv[4]).exists():
        time.sleep(0.001)
item = InferenceItem("local", "tiny", "m1", Decimal("0.000123"), 100, Decimal("1.38"))
for i in range(count):
    key = f"{prefix}-{i}"
    ledger.post_inference(key=key, on=dt.date(2025, 1, 6), narration=key, items=[item], meta={})
    print(key, flush=True)
"""


def start_poster(
    path: Path, prefix: str, count: int, go: Path | None = None
) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    barrier = [str(go)] if go is not None else []
    return subprocess.Popen(
        [sys.executable, "-c", POSTER, str(path), prefix, str(count), *barrier],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def opened_ledger(tmp_path: Path) -> Ledger:
    ledger = Ledger(tmp_path / "financial" / "demo" / "ledger.beancount")
    ledger.open("demo", Decimal("1000"), "CAD", {"CAD": Decimal("1.38")}, OPENED)
    return ledger


@pytest.mark.slow
def test_sigkill_mid_write_leaves_a_valid_ledger(tmp_path: Path) -> None:
    """Kill a posting loop at random moments, and right inside the write (temp file written,
    not yet renamed): every time, the ledger passes bean-check and no acknowledged posting is lost.
    """
    ledger = opened_ledger(tmp_path)

    def temps() -> list[Path]:
        # Postings replace the current journal segment; the head changes only for openings.
        return list(ledger.path.parent.rglob("*.tmp"))

    rng = random.Random(20250106)
    acknowledged: set[str] = set()
    killed_mid_write = 0
    for round_ in range(6):
        for temp in temps():
            temp.unlink()  # left by the previous kill; no writer is alive now
        poster = start_poster(ledger.path, f"r{round_}", 100_000)
        assert poster.stdout is not None
        acknowledged.add(poster.stdout.readline().strip())  # it is posting in its loop now
        if round_ % 2:
            deadline = time.monotonic() + 5
            while not temps() and time.monotonic() < deadline:
                pass
        else:
            time.sleep(rng.uniform(0.0, 0.25))
        poster.send_signal(signal.SIGKILL)
        poster.wait(timeout=10)
        killed_mid_write += round_ % 2 and bool(temps())
        acknowledged |= {line.strip() for line in poster.stdout if line.strip()}
        poster.stdout.close()

        assert bean_check(ledger.path) == [], f"round {round_}"
        posted = ledger.postings_by_key()
        assert acknowledged <= posted.keys(), f"round {round_}: acknowledged postings lost"
        assert ledger.spent() == ITEM.amount() * len(posted)
    assert len(acknowledged) > 6
    assert killed_mid_write > 0, "no kill landed between writing the temp file and the rename"


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    ledger = opened_ledger(tmp_path)
    count, go = 25, tmp_path / "go"
    posters = [start_poster(ledger.path, prefix, count, go) for prefix in ("p", "q")]
    for poster in posters:
        assert poster.stdout is not None
        assert poster.stdout.readline().strip() == "ready"
    go.touch()
    outputs = [p.communicate(timeout=60)[0].split() for p in posters]
    assert [p.returncode for p in posters] == [0, 0]
    assert all(len(out) == count for out in outputs)

    expected = {f"{prefix}-{i}" for prefix in ("p", "q") for i in range(count)}
    assert set(ledger.postings_by_key()) == expected
    assert ledger.spent() == ITEM.amount() * 2 * count
    assert bean_check(ledger.path) == []
