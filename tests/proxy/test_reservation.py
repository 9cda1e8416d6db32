"""The reservation arithmetic of the budget addon, without a proxy (`proxy.reservation`)."""

from __future__ import annotations

from decimal import Decimal

from proxy.reservation import Reservation, for_tokens, per_unit

# 2 CAD and 6 CAD per million tokens in and out.
PRICES = {"input_per_mtok": Decimal(2), "output_per_mtok": Decimal(6)}


def test_a_call_that_asks_for_a_maximum_reserves_it_for_every_choice() -> None:
    held = for_tokens(**PRICES, prompt_tokens=1000, asked=100, choices=3, left=Decimal(1),
                      ceiling=4096)  # fmt: skip
    assert held == Reservation(Decimal("0.0038"), 1000, 300, None)  # (2*1000 + 6*300) / 1M


def test_a_call_without_a_maximum_gets_what_the_tightest_scope_can_pay() -> None:
    # 0.01 CAD left: 10000 micro-CAD; the input costs 2000, 8000 / 6 per token = 1333 tokens,
    # 666 per choice for two choices.
    held = for_tokens(**PRICES, prompt_tokens=1000, asked=None, choices=2, left=Decimal("0.01"),
                      ceiling=4096)  # fmt: skip
    assert held is not None and (held.cap, held.completion_tokens) == (666, 1332)
    assert held.amount <= Decimal("0.01")
    # Plenty left: the proxy's ceiling caps it.
    roomy = for_tokens(**PRICES, prompt_tokens=10, asked=None, choices=1, left=Decimal(100),
                       ceiling=4096)  # fmt: skip
    assert roomy is not None and roomy.cap == 4096


def test_nothing_affordable_is_a_refusal_and_free_output_is_capped_by_the_ceiling() -> None:
    assert for_tokens(**PRICES, prompt_tokens=1000, asked=None, choices=1,
                      left=Decimal("0.002"), ceiling=4096) is None  # fmt: skip
    free = for_tokens(input_per_mtok=Decimal(1), output_per_mtok=Decimal(0), prompt_tokens=5,
                      asked=None, choices=2, left=Decimal(0), ceiling=64)  # fmt: skip
    assert free is not None and (free.cap, free.completion_tokens) == (64, 128)


def test_a_call_priced_per_unit_reserves_its_most_converted() -> None:
    assert per_unit(Decimal("0.04"), Decimal("1.4"), 3, "image") == Reservation(
        Decimal("0.056"), 0, 0
    )
    assert per_unit(Decimal("0.0001"), Decimal(2), 500, "token").prompt_tokens == 500
