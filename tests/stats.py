"""Goodness-of-fit statistics without scipy: chi-squares for draws from one distribution (`fits`), for draws grouped
by a condition with an exact distribution per group (`conditional_chi_square`), and for draws that each have their own
predicted distribution (`predictive_chi_square`), with its per-category z-scores (`predictive_z_scores`)."""

from __future__ import annotations

import math

import numpy as np


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


def conditional_chi_square(groups, min_expected: float = 5.0) -> tuple[float, int]:
    """
    Pearson's statistic for draws grouped by a condition, each group with its own exact distribution (the token at one
    position, grouped by prefix): given the group sizes the groups are independent multinomials, so the per-group
    statistics and their degrees of freedom add up. Within a group, cells expected fewer than `min_expected` times
    are pooled, and the pool joins the group's smallest cell if it is itself below; a group left with one cell carries
    no information. A draw in a cell of probability 0 makes the statistic infinite.

    Args:
        groups (iterable of `(counts, probs)`, both `np.ndarray` of shape `(num_cells,)`): observed counts and exact
            probabilities of each group.
    """
    stat, df = 0.0, 0
    for counts, probs in groups:
        if (counts[probs <= 0] > 0).any():
            return math.inf, max(df, 1)
        expected = counts.sum() * probs
        small = expected < min_expected
        cells_obs, cells_exp = list(counts[~small].astype(float)), list(expected[~small])
        pooled_obs, pooled_exp = float(counts[small].sum()), float(expected[small].sum())
        if pooled_exp >= min_expected:
            cells_obs.append(pooled_obs)
            cells_exp.append(pooled_exp)
        elif pooled_exp > 0 and cells_exp:
            smallest = int(np.argmin(cells_exp))
            cells_obs[smallest] += pooled_obs
            cells_exp[smallest] += pooled_exp
        if len(cells_exp) < 2:
            continue
        stat += sum((o - e) ** 2 / e for o, e in zip(cells_obs, cells_exp))
        df += len(cells_exp) - 1
    return stat, max(df, 1)


def predictive_chi_square(outcomes: np.ndarray, predicted: np.ndarray, min_expected: float = 5.0) -> tuple[float, int]:
    """
    Goodness of fit of draws that each have their own predicted distribution: draw i falls in category `outcomes[i]`
    and had distribution `predicted[i]` given every earlier draw (the token at one position of sequences with
    different prefixes; its rank under the prefix's distribution).

    The deviations D = counts - sum_i predicted[i] are a sum of martingale differences; their summed conditional
    covariance is S = sum_i diag(q_i) - q_i q_i^T, so D^T S^+ D is asymptotically chi-square with rank(S) degrees of
    freedom (martingale central limit theorem). With one distribution for every draw this is Pearson's statistic.
    Categories expected fewer than `min_expected` times in all are pooled, and the pool joins the smallest other
    category if it is itself below. A draw in a category it had probability 0 of reaching makes the statistic
    infinite.

    Args:
        outcomes (`np.ndarray` of shape `(n,)`): category of each draw.
        predicted (`np.ndarray` of shape `(n, num_categories)`): the distribution each draw was predicted to follow.
    """
    if (predicted[np.arange(len(outcomes)), outcomes] <= 0).any():
        return math.inf, 1
    expected = predicted.sum(axis=0)
    small = expected < min_expected
    if small.any() and not small.all():
        large = np.flatnonzero(~small)
        pool = len(large) if expected[small].sum() >= min_expected else int(np.argmin(expected[large]))
        index = np.full(len(expected), pool)  # old category -> new category
        index[large] = np.arange(len(large))
        predicted = predicted @ np.eye(max(len(large), pool + 1))[index]
        outcomes = index[outcomes]
        expected = predicted.sum(axis=0)
    deviation = np.bincount(outcomes, minlength=predicted.shape[1]) - expected
    covariance = np.diag(expected) - predicted.T @ predicted
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    # S always has the null direction (1, ..., 1) (counts and expectations both sum to n); drop every null direction.
    spanned = eigenvalues > 1e-9 * max(eigenvalues.max(), 1.0)
    projected = eigenvectors[:, spanned].T @ deviation
    return float((projected**2 / eigenvalues[spanned]).sum()), max(int(spanned.sum()), 1)


def predictive_z_scores(outcomes: np.ndarray, predicted: np.ndarray, min_variance: float = 100.0) -> np.ndarray:
    """
    Per category of `predictive_chi_square`'s draws, z = (count - sum_i q_i) / sqrt(sum_i q_i (1 - q_i)): one
    martingale sum over its standard deviation, asymptotically standard normal. A shift of the category's
    probability by delta over n draws moves the mean of z by at least 2 delta sqrt(n) (the variance is at most n / 4). Only
    categories with variance >= `min_variance` are scored, where the normal tail holds far out.

    Returns:
        `np.ndarray` of shape `(num_scored,)`.
    """
    counts = np.bincount(outcomes, minlength=predicted.shape[1])
    variance = (predicted * (1.0 - predicted)).sum(axis=0)
    scored = variance >= min_variance
    return (counts[scored] - predicted[:, scored].sum(axis=0)) / np.sqrt(variance[scored])
