"""Metered LLM calls for orchestrator tests: one capture record as the proxy spools it."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal

from contracts.records import FlowRecord, Usage

LOCAL_URL = "http://127.0.0.1:8500/v1/completions"


def llm_call(
    trial: str,
    assignment: str,
    model: str,
    usd: str,
    *,
    url: str = LOCAL_URL,
    provider: str = "local",
    tokens: tuple[int, int] = (40, 10),
) -> FlowRecord:
    """A 200 answer to `url` for machine m1 of project demo, `tokens` = (prompt, completion)."""
    now = time.time()
    host, _, path = url.partition("://")[2].partition("/")
    prompt, completion = tokens
    return FlowRecord(
        id=uuid.uuid4().hex,
        ts_start=now,
        ts_end=now + 1,
        duration_ms=1000,
        method="POST",
        url=url,
        host=host.partition(":")[0],
        path="/" + path,
        status=200,
        project="demo",
        trial=trial,
        assignment=assignment,
        machine="m1",
        provider=provider,
        model=model,
        usage=Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        ),
        cost_usd=Decimal(usd),
    )
