"""Rate limits shared by API processes: a SQLite file in the data root, or a real redis-server.

Each API process (uvicorn worker, replica) has its own `RateLimiter`; what they share is the
store. Two limiters here stand for two processes, and two real processes race for one window.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from contracts.dataroot import DataRoot
from contracts.settings import Settings
from orchestrator.access import (
    WINDOW_S,
    ApiToken,
    RateLimited,
    RateLimiter,
    RateStoreUnavailable,
    RateWindow,
    RedisRateWindow,
    SqliteRateWindow,
    TokenScope,
    TokenStore,
    rate_limiter,
    rate_window,
)
from orchestrator.auth import Guard

# By its package path: tests/budget, where the redis-server fixture lives, is not on sys.path here.
from tests.budget.budget_harness import RedisServer, redis_server

T0 = 1_760_000_000.0
LIMITS = {"machine": 3, "viewer": 5}


def token(scope: TokenScope = TokenScope.machine, token_id: str = "tok_m1") -> ApiToken:
    return ApiToken(token_id, scope, "0" * 64, "2025-01-01T00:00:00Z", project="p1")


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    yield from redis_server()


@pytest.fixture(params=["sqlite", "redis"])
def windows(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[RateWindow, RateWindow]]:
    """Two windows over one store, as two API processes would open them."""
    if request.param == "sqlite":
        path = tmp_path / "api" / "rate-limits.sqlite"
        pair: tuple[RateWindow, RateWindow] = (SqliteRateWindow(path), SqliteRateWindow(path))
    else:
        server: RedisServer = request.getfixturevalue("redis")
        first = RedisRateWindow(server.url)
        first.client.flushdb()
        pair = (first, RedisRateWindow(server.url))
    yield pair
    for window in pair:
        window.close()


def test_two_limiters_share_one_allowance(windows: tuple[RateWindow, RateWindow]) -> None:
    a, b = (RateLimiter(LIMITS, w) for w in windows)
    a.hit(token(), T0)
    b.hit(token(), T0 + 1)
    a.hit(token(), T0 + 2)
    for limiter in (a, b):  # the third request used the allowance up for both processes
        with pytest.raises(RateLimited) as refused:
            limiter.hit(token(), T0 + 10)
        assert refused.value.retry_after == 50  # the first request leaves the window at T0+60
    b.hit(token(scope=TokenScope.viewer, token_id="tok_v"), T0 + 10)  # per token
    b.hit(token(scope=TokenScope.admin, token_id="tok_a"), T0 + 10)  # no limit configured
    a.hit(token(), T0 + WINDOW_S + 0.5)  # sliding: one slot is free again
    with pytest.raises(RateLimited) as refused:
        b.hit(token(), T0 + WINDOW_S + 0.6)
    assert refused.value.retry_after == 1  # the second leaves at T0+61


def test_refused_requests_are_not_counted(windows: tuple[RateWindow, RateWindow]) -> None:
    a, b = windows
    assert [a.admit("k", 2, T0), b.admit("k", 2, T0 + 1)] == [None, None]
    for t in range(2, 30):
        assert b.admit("k", 2, T0 + t) == pytest.approx(WINDOW_S - t)
    assert a.admit("k", 2, T0 + WINDOW_S) is None


RACER = """
import sys
from pathlib import Path
from orchestrator.access import rate_window

window = rate_window(sys.argv[1], path=Path(sys.argv[2]), url=sys.argv[2])
admitted = sum(window.admit("tok_race", 25, float(sys.argv[3])) is None for _ in range(40))
window.close()
print(admitted)
"""


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_two_processes_racing_admit_exactly_the_limit(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    where = str(tmp_path / "rate.sqlite")
    if store == "redis":
        server: RedisServer = request.getfixturevalue("redis")
        RedisRateWindow(server.url).client.flushdb()
        where = server.url
    script = textwrap.dedent(RACER)
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", script, store, where, str(T0)], stdout=subprocess.PIPE
        )
        for _ in range(2)
    ]
    counts = [int(p.communicate(timeout=60)[0]) for p in racers]
    assert sum(counts) == 25, counts


def test_guards_of_two_apps_answer_429_with_retry_after(tmp_path: Path) -> None:
    settings = Settings(data=tmp_path / "data", rate_limit_machine=2)
    root = DataRoot.at(settings.data)
    tokens = TokenStore(root)
    record, secret = tokens.create(TokenScope.machine, project="p1", machine="m1")
    clients = []
    for _ in range(2):  # two API processes: own guard, own limiter, one shared store
        guard = Guard(TokenStore(root), rate_limiter(settings, root))
        app = FastAPI(dependencies=[Depends(guard)])
        app.post("/v1/projects/{project}/payments")(lambda project: {"ok": project})
        clients.append(TestClient(app))
    headers = {"Authorization": f"Bearer {secret}"}
    codes = [c.post("/v1/projects/p1/payments", headers=headers).status_code for c in clients]
    assert codes == [200, 200]
    refused = clients[0].post("/v1/projects/p1/payments", headers=headers)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert (root.root / "api" / "rate-limits.sqlite").exists()
    assert record.id  # counted per token id, never per secret


def test_unusable_stores_are_named() -> None:
    with pytest.raises(RateStoreUnavailable, match="needs budget_redis_url"):
        rate_window("redis", path=Path("/nonexistent"), url=None)
    with pytest.raises(RateStoreUnavailable, match="unknown budget store 'etcd'"):
        rate_window("etcd", path=Path("/nonexistent"), url=None)
    with pytest.raises(RateStoreUnavailable, match=r"rate-limit store redis://127\.0\.0\.1:1/0"):
        RedisRateWindow("redis://127.0.0.1:1/0").admit("k", 1, T0)
