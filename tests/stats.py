"""A chi-square goodness-of-fit check without scipy."""

from __future__ import annotations

import math


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper quantile of chi-square(df) (Wilson-Hilferty); z = 3.09 is the 0.1% level."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi_square(counts: dict, probs: dict, n: int, min_expected: float = 5.0) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom; cells with expectation < `min_expected` are pooled."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0.0, 0.0, 0
    for key in set(counts) | set(probs):
        expected = probs.get(key, 0.0) * n
        observed = counts.get(key, 0)
        if expected < min_expected:
            pooled_obs += observed
            pooled_exp += expected
            continue
        stat += (observed - expected) ** 2 / expected
        cells += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    elif pooled_obs > 0:
        stat = math.inf
    return stat, max(cells - 1, 1)


def fits(counts: dict, probs: dict, n: int) -> bool:
    stat, df = chi_square(counts, probs, n)
    return stat < chi_square_critical(df)
