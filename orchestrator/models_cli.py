"""`autovibe models ls`: what a trial can name in `model_pairs`, and whether it can run now.

Local pairs: served or not, with the evidence, and their price; providers: URL, wire formats,
whether their key is in the secret store, the endpoints the proxy meters, and every priced
model. The facts are `orchestrator.model_choices`', the ones a submission is checked against.
The command joins `autovibe models` (serving's CLI) from here, because it reads planes that
serving may not import (the agents' wire formats, the proxy's endpoint tables).
"""

from __future__ import annotations

from decimal import Decimal

import typer

from contracts.config import TokenPrice
from contracts.providers import key_path
from contracts.settings import Settings
from orchestrator.catalog import Catalog
from orchestrator.model_choices import LOCAL_WIRES, ModelChoices, wire_names
from proxy.endpoints import allowed
from workers.agents import SPEAKS


def _usd(value: Decimal) -> str:
    """At least two decimals, at most six: 3.00, 0.075, 0.666667."""
    whole, _, cents = f"{value:.6f}".partition(".")
    return f"{whole}.{cents.rstrip('0').ljust(2, '0')}"


def price_text(price: TokenPrice) -> str:
    """USD per million tokens: in, out, and the cache prices where the model has them."""
    parts = [f"in {_usd(price.input_per_mtok)}", f"out {_usd(price.output_per_mtok)}"]
    if price.cache_read_per_mtok is not None:
        parts.append(f"cache read {_usd(price.cache_read_per_mtok)}")
    if price.cache_write_per_mtok is not None:
        parts.append(f"cache write {_usd(price.cache_write_per_mtok)}")
    as_of = f" (as of {price.as_of})" if price.as_of is not None else ""
    return " ".join(parts) + " USD/Mtok" + as_of


def listing(choices: ModelChoices) -> list[str]:
    """The lines `models ls` prints."""
    lines = [f"Local pairs (model plane {choices.settings.model_url}):"]
    for name in choices.local_names():
        pair = choices.models.pairs[name.split(":")[0]]
        price = choices.prices.price("local", name)
        served = choices.served(name)
        lines.append(
            f"  {name:<14} {pair.device}  {'served' if served.ok else 'NOT served':<10}  "
            f"{price_text(price) if price is not None else 'NO PRICE (refused)'}"
        )
        lines.append(f"      evidence: {served.why}")
        lines.append(f"      speaks: {wire_names(LOCAL_WIRES[pair.device])}")
    lines.append("Providers (configs/providers.yaml; name models as <provider>/<model>):")
    for name, provider in choices.providers.providers.items():
        key = choices.key(name)
        lines.append(
            f"  {name:<14} {provider.url}  speaks {wire_names(frozenset(provider.wire))}  "
            f"key {'present' if key.ok else 'MISSING'} ({key_path(name)})"
        )
        if not key.ok:
            lines.append(f"      {key.why}")
        lines.append(f"      endpoints metered: {allowed(name)}")
        priced = choices.prices.providers.get(name, {})
        if not priced:
            lines.append("      no model priced in configs/prices.yaml: every model is refused")
        for model, price in sorted(priced.items()):
            lines.append(f"      {name}/{model:<28} {price_text(price)}")
    speaks = ", ".join(f"{a} ({wire_names(w)})" for a, w in sorted(SPEAKS.items()))
    lines.append(f"Agents speak: {speaks}")
    return lines


def ls() -> None:
    """Local pairs (served or not, with the evidence) and providers (key present or not,
    endpoints metered), with prices."""
    choices = Catalog.load(Settings()).choices()
    for line in listing(choices):
        typer.echo(line)
