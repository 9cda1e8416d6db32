"""Proof that a model server serves: one real one-token completion per served model.

A server that answers `/v1/models` can still die on its first matrix multiplication (llama.cpp
built for a CPU feature the machine lacks: a general protection fault in the first call), so
nothing says a model plane is ready before every model it serves has completed a token.
"""

from __future__ import annotations

import httpx

from contracts.config import ModelsCatalog

PROBE_PROMPT = "def add(a, b):"


class ProbeFailed(Exception):
    """A served model did not complete its probe; the message says which and how."""


def cpu_served_names(catalog: ModelsCatalog) -> list[str]:
    """The names the CPU model server answers to (every CPU pair, normal and thinking)."""
    return [
        spec.served_name
        for pair in catalog.pairs.values()
        if pair.device == "cpu"
        for spec in (pair.normal, pair.thinking)
    ]


def prove(base_url: str, models: list[str], timeout_s: float = 120) -> None:
    """Ask each model for one token at `base_url` (…/v1); ProbeFailed on any failure."""
    with httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s, trust_env=False) as http:
        for model in models:
            request = {"model": model, "prompt": PROBE_PROMPT, "max_tokens": 1, "temperature": 0}
            try:
                response = http.post("/completions", json=request)
            except httpx.HTTPError as exc:
                raise ProbeFailed(
                    f"model {model}: no answer to a one-token completion "
                    f"({type(exc).__name__}: {exc}); the server may have crashed"
                ) from exc
            choices = _choices(response)
            if response.status_code != 200 or not choices:
                raise ProbeFailed(
                    f"model {model}: a one-token completion answered HTTP "
                    f"{response.status_code}: {response.text[:300]}"
                )


def _choices(response: httpx.Response) -> list[object]:
    try:
        body = response.json()
    except ValueError:
        return []
    choices = body.get("choices") if isinstance(body, dict) else None
    return choices if isinstance(choices, list) else []
