"""Elasticsearch for the traffic-store tests: the stand-in, or a real cluster with
`pytest -m live`."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from elasticsearch import Elasticsearch, helpers
from es_harness import StandInElasticsearch, Target

from traffic.elasticsearch_store import GROUPS


@pytest.fixture
def stand_in() -> Iterator[StandInElasticsearch]:
    es = StandInElasticsearch()
    es.start()
    yield es
    es.stop()
    assert not es.violations, "requests outside the documented API:\n" + "\n".join(es.violations)


@pytest.fixture(params=["stand-in", pytest.param("live", marks=pytest.mark.live)])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """Indices of a prefix of their own, on the stand-in or at `ELASTICSEARCH_URL` (deleted
    after the test)."""
    prefix = f"autovibe-test-{uuid.uuid4().hex[:8]}"
    if request.param == "stand-in":
        es: StandInElasticsearch = request.getfixturevalue("stand_in")
        yield Target(
            es.url,
            prefix,
            lambda: [(i, d, s) for i, docs in es.indices.items() for d, s in docs.items()],
            es,
        )
        return
    url = os.environ.get("ELASTICSEARCH_URL")
    if not url:
        pytest.skip("set ELASTICSEARCH_URL to run against a real Elasticsearch")
    client = Elasticsearch(url, request_timeout=30)

    def stored() -> list[tuple[str, str, dict[str, Any]]]:
        client.indices.refresh(index=f"{prefix}-*", allow_no_indices=True)
        hits = helpers.scan(client, index=f"{prefix}-*", query={"query": {"match_all": {}}})
        return [(hit["_index"], hit["_id"], hit["_source"]) for hit in hits]

    yield Target(url, prefix, stored)
    # Wildcard deletes are refused by default (action.destructive_requires_name): by name.
    for index in client.indices.get(index=f"{prefix}-*", allow_no_indices=True):
        client.indices.delete(index=index)
    for group in GROUPS:
        client.indices.delete_index_template(name=f"{prefix}-{group}")
    client.close()
