"""The statistics of a trial report: Wilson intervals, percentiles and exact pairwise tests.

Success rates are compared with Fisher's exact test (two-sided): exact at any sample size,
fast enough to run inside an API request, and conservative — it never calls a difference
significant that is not. Within one family of comparisons (agents, model pairs, arms) the
p-values are Holm-adjusted, so looking at many pairs does not manufacture a "significant" one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from contracts.reports import Comparison

ALPHA = 0.05
"""Significance level of every comparison in the report."""

# scipy.stats is imported in the functions that use it, when a report is first computed: it
# is half of what the control API and every `autovibe` command import at start, and most of
# them never compute a report.


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when there are no trials."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return (0.0, 1.0)
    from scipy.stats import norm

    z = float(norm.ppf(1 - (1 - confidence) / 2))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # Clamp the rounding noise at the ends (0/n and n/n touch 0 and 1 exactly).
    return (max(0.0, centre - half), min(1.0, centre + half))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between ranks; None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Arm:
    """One side of a comparison: a name and its resolved count out of n scored runs."""

    name: str
    resolved: int
    n: int


def compare_all(arms: Sequence[Arm], alpha: float = ALPHA) -> list[Comparison]:
    """Every pair of arms compared by Fisher's exact test, Holm-adjusted as one family."""
    pairs = list(combinations(arms, 2))
    raw = [_fisher(a, b) for a, b in pairs]
    adjusted = holm([p for p in raw if p is not None])
    it = iter(adjusted)
    out = []
    for (a, b), p in zip(pairs, raw, strict=True):
        p_adj = next(it) if p is not None else None
        significant = p_adj is not None and p_adj < alpha
        out.append(
            Comparison(
                a=a.name,
                b=b.name,
                a_resolved=a.resolved,
                a_n=a.n,
                b_resolved=b.resolved,
                b_n=b.n,
                difference=round(a.resolved / a.n - b.resolved / b.n, 4) if a.n and b.n else None,
                test="fisher_exact",
                p_value=_sig(p),
                p_adjusted=_sig(p_adj),
                significant=significant,
                verdict=_verdict(a, b, p_adj, alpha),
            )
        )
    return out


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _sig(p: float | None) -> float | None:
    """Six significant digits: a tiny p-value keeps its size."""
    return None if p is None else float(f"{p:.6g}")


def _fisher(a: Arm, b: Arm) -> float | None:
    if a.n == 0 or b.n == 0:
        return None
    table = [[a.resolved, a.n - a.resolved], [b.resolved, b.n - b.resolved]]
    from scipy.stats import fisher_exact

    return float(fisher_exact(table, alternative="two-sided").pvalue)


def _best_possible_p(a: Arm, b: Arm) -> float:
    """The smallest p-value these sample sizes allow: one side all resolved, the other none."""
    from scipy.stats import fisher_exact

    return float(fisher_exact([[a.n, 0], [0, b.n]], alternative="two-sided").pvalue)


def _verdict(a: Arm, b: Arm, p_adjusted: float | None, alpha: float) -> str:
    if p_adjusted is None:
        return "no comparison: a side has no scored run"
    if p_adjusted < alpha:
        better = a.name if a.resolved / a.n > b.resolved / b.n else b.name
        return f"significant at {alpha}: {better} resolves more"
    best = _best_possible_p(a, b)
    if best >= alpha:
        return (
            f"not significant: too few runs ({a.n} vs {b.n}) — even the most lopsided "
            f"outcome would give p = {best:.3g}"
        )
    return f"not significant at {alpha}"
