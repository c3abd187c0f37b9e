"""Drift statistics on arrays and count vectors: pure functions, no profiles, no IO.

Each function compares a reference side with a current side and raises ``ValueError`` when the
comparison is undefined (no values, mismatched bins, a constant reference, …);
:mod:`batchml.monitoring.drift` turns that into a report row's ``error``. The module docstring of
:mod:`batchml.monitoring.drift` defines the methods and their thresholds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["chi2_two_sample", "domain_classifier_auc", "jensen_shannon", "ks_2sample", "psi", "wasserstein_normed"]

PSI_EPS = 1e-4


def psi(ref_counts: Any, cur_counts: Any, eps: float = PSI_EPS) -> float:
    """Population stability index of two count vectors over the same bins.

    >>> round(psi([50, 50], [40, 60]), 4)
    0.0405
    """
    ref, cur = _count_pair(ref_counts, cur_counts)
    ref, cur = np.maximum(ref / ref.sum(), eps), np.maximum(cur / cur.sum(), eps)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def jensen_shannon(ref_counts: Any, cur_counts: Any) -> float:
    """Jensen-Shannon distance (base 2, within [0, 1]) between two count vectors over the same bins."""
    from scipy.spatial import distance
    ref, cur = _count_pair(ref_counts, cur_counts)
    return float(distance.jensenshannon(ref, cur, base=2))


def chi2_two_sample(ref_counts: Any, cur_counts: Any) -> tuple[float, float, int]:
    """Pearson chi-square test of homogeneity on the 2 × k table of reference vs current counts.

    Same as ``scipy.stats.chi2_contingency(table, correction=False)`` after dropping bins that are
    empty on both sides. Returns ``(statistic, p_value, dof)``; one non-empty bin gives ``(0, 1, 0)``.
    """
    from scipy import stats  # imported on use: ~1 s, and the default (psi) needs none of it
    ref, cur = _count_pair(ref_counts, cur_counts)
    table = np.vstack([ref, cur])
    table = table[:, table.sum(axis=0) > 0]
    dof = table.shape[1] - 1
    if dof == 0:
        return 0.0, 1.0, 0
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    statistic = float(np.sum((table - expected) ** 2 / expected))
    return statistic, float(stats.chi2.sf(statistic, dof)), dof


def ks_2sample(ref: Any, cur: Any) -> tuple[float, float]:
    """Two-sided two-sample Kolmogorov-Smirnov test (scipy's ``ks_2samp``); NaN/±inf are ignored."""
    from scipy import stats  # imported on use: ~1 s, and the default (psi) needs none of it
    result = stats.ks_2samp(_finite(ref, "reference"), _finite(cur, "current"))
    return float(result.statistic), float(result.pvalue)


def wasserstein_normed(ref: Any, cur: Any, ref_std: float | None = None) -> float:
    """First Wasserstein distance divided by the reference std (ddof 0 of ``ref`` when not given)."""
    from scipy import stats  # imported on use: ~1 s, and the default (psi) needs none of it
    ref, cur = _finite(ref, "reference"), _finite(cur, "current")
    std = float(np.std(ref)) if ref_std is None else float(ref_std)
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"reference std is {std}: the feature is constant in the reference, so a distance normed by it is undefined (use psi)")
    return float(stats.wasserstein_distance(ref, cur)) / std


def domain_classifier_auc(reference: np.ndarray, current: np.ndarray, seed: int = 0, max_rows: int = 10_000) -> float:
    """AUROC of a small LightGBM model telling current rows from reference rows (0.5: no drift).

    Both sides are subsampled to the same size (at most ``max_rows``); 30 % is held out for the AUROC.
    NaN is allowed (LightGBM treats it as missing).
    """
    from batchml.models.lgbm import lgb as lightgbm  # lazily: only the optional multivariate check needs it

    ref, cur = _matrix(reference, "reference"), _matrix(current, "current")
    if ref.shape[1] != cur.shape[1]:
        raise ValueError(f"reference has {ref.shape[1]} columns but current has {cur.shape[1]}")
    rng = np.random.default_rng(seed)
    n = min(len(ref), len(cur), max_rows)
    if n < 50:
        raise ValueError(f"a domain classifier needs at least 50 rows per side, got {n}")
    x = np.vstack([ref[rng.choice(len(ref), n, replace=False)], cur[rng.choice(len(cur), n, replace=False)]])
    y = np.repeat([0.0, 1.0], n)
    order = rng.permutation(2 * n)
    test, train = order[: int(0.3 * 2 * n)], order[int(0.3 * 2 * n) :]
    # One thread: a model this small gains little from more, and OpenMP spin-waits badly on a busy host.
    params = {"objective": "binary", "num_leaves": 15, "learning_rate": 0.1, "min_data_in_leaf": 40,
              "verbose": -1, "seed": seed, "deterministic": True, "num_threads": 1}
    booster = lightgbm.train(params, lightgbm.Dataset(x[train], y[train]), num_boost_round=60)
    return _auroc(y[test], booster.predict(x[test]))


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from scipy import stats  # imported on use: ~1 s, and the default (psi) needs none of it
    # Mann-Whitney form: the probability that a random positive outranks a random negative.
    ranks = stats.rankdata(scores)
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("the held-out split holds only one side")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _count_pair(ref_counts: Any, cur_counts: Any) -> tuple[np.ndarray, np.ndarray]:
    ref, cur = np.asarray(ref_counts, dtype=np.float64), np.asarray(cur_counts, dtype=np.float64)
    if ref.ndim != 1 or ref.shape != cur.shape:
        raise ValueError(f"count vectors must be 1-D and of equal length, got {ref.shape} and {cur.shape}")
    for side, counts in (("reference", ref), ("current", cur)):
        if not np.all(np.isfinite(counts)) or np.any(counts < 0):
            raise ValueError(f"{side} counts must be finite and non-negative")
        if counts.sum() == 0:
            raise ValueError(f"no {side} values")
    return ref, cur


def _finite(values: Any, side: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError(f"no {side} values")
    return values


def _matrix(values: Any, side: str) -> np.ndarray:
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"{side} must be a 2-D array with at least one column, got shape {matrix.shape}")
    return matrix
