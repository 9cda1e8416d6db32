"""How much a model call reserves before it is sent: the arithmetic of the budget addon.

Pure: no flow, no store, no clock. The budget addon (`proxy.addons.budget`) gathers the facts
(the price, the exchange rate, the estimated input, the output the request asks for, what the
tightest scope has left) and applies the answer (reserve the amount; write the cap into the
request when it asked for no maximum; refuse when nothing is affordable).

A call reserves its most: the input estimate at the input price plus, at the output price, the
output it asked for (`max_tokens` and the like) times its choices (`n`, `best_of`). A call that
asked for no maximum gets one: the most output the tightest scope can still pay for after the
input, never more than the proxy's ceiling, written into the request so the provider cannot
exceed it. A call priced per unit (images, audio seconds: `proxy.endpoints`) reserves the most
its request can cost, whatever its tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

MTOK = 1_000_000


@dataclass(frozen=True)
class Reservation:
    amount: Decimal
    """In the budget's currency."""
    prompt_tokens: int
    completion_tokens: int
    """The output reserved for, all choices together."""
    cap: int | None = None
    """The per-choice maximum to write into a request that asked for none; None: unchanged."""


def per_unit(most_usd: Decimal, fx: Decimal, most_units: int, unit: str) -> Reservation:
    """A call priced per unit: the most its request can cost, converted; its token count is
    the units when they are tokens (an embedding's input), else none."""
    return Reservation(most_usd * fx, most_units if unit == "token" else 0, 0)


def for_tokens(
    *,
    input_per_mtok: Decimal,
    output_per_mtok: Decimal,
    prompt_tokens: int,
    asked: int | None,
    choices: int,
    left: Decimal,
    ceiling: int,
) -> Reservation | None:
    """A token-priced call: prices per million tokens in the budget's currency, the input
    estimate, the output `asked` per choice (None: no maximum in the request), the number of
    `choices`, what the tightest scope has `left`, and the proxy's `ceiling` on a capped
    output. None when a call without a maximum cannot afford one output token."""
    choices = max(choices, 1)
    cap = None
    if asked is not None:
        completion_tokens = asked * choices
    else:
        if output_per_mtok > 0:
            affordable = (left * MTOK - input_per_mtok * prompt_tokens) / output_per_mtok
            cap = min(ceiling, math.floor(affordable / choices))
        else:
            cap = ceiling
        if cap < 1:
            return None
        completion_tokens = cap * choices
    amount = (input_per_mtok * prompt_tokens + output_per_mtok * completion_tokens) / MTOK
    return Reservation(amount, prompt_tokens, completion_tokens, cap)
