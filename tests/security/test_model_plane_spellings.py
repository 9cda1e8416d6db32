"""The local model plane under other names is still the model plane (issue 18, finding 4).

Through the real mitmdump with a machine credential: the model server listens on 127.0.0.1,
and a worker calls it as `localhost`, `LOCALHOST`, `0.0.0.0` and `127.1`. Each call must be
metered as `local`, priced and budgeted like a call to the configured address, and a model
without a price refused before it reaches the server, whatever the spelling. Before, only the
exact `host:port` string of `autovibe_model_hosts` was metered: the rest passed unmetered.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))
from proxy_harness import Proxy, Upstream, metering_proxy, serve

SPELLINGS = ["localhost", "LOCALHOST", "0.0.0.0", "127.1"]


@pytest.fixture(scope="module")
def model_server() -> Iterator[Upstream]:
    yield from serve()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, model_server: Upstream) -> Iterator[Proxy]:
    yield from metering_proxy(tmp_path_factory, model_server.port)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_of_the_model_plane_is_metered_and_budgeted(
    proxy: Proxy, model_server: Upstream, spelling: str
) -> None:
    assignment = "a-" + spelling.replace(".", "-")
    with proxy.client(Proxy.identity(assignment)) as client:
        response = client.post(
            f"http://{spelling}:{model_server.port}/v1/completions",
            json={"model": "tiny", "prompt": f"call {assignment}", "max_tokens": 8},
        )
    assert response.status_code == 200, response.text
    record = proxy.spooled_one(assignment=assignment)
    assert (record.provider, record.model) == ("local", "tiny"), record
    assert record.cost_usd > 0 and record.usage is not None
    assert record.budget is not None, "no reservation was made for the call"


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_an_unpriced_model_is_refused_under_every_spelling(
    proxy: Proxy, model_server: Upstream, spelling: str
) -> None:
    marker = f"unpriced via {spelling}"
    with proxy.client(Proxy.identity("a-unpriced")) as client:
        response = client.post(
            f"http://{spelling}:{model_server.port}/v1/completions",
            json={"model": "not-in-prices", "prompt": marker, "max_tokens": 8},
        )
    assert response.status_code == 402, response.text
    assert response.json()["error"] == "unknown_price"
    assert not model_server.saw(marker), "the refused call reached the model server"
