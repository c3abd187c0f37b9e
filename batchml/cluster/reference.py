"""The drift reference profile of a challenger trained on worker-resident rows, from merged parts.

Locally (:func:`batchml.monitoring.profiles.build_profile`) the profile is built from every
reference row (fit + validation): bin edges at the ``inverted_cdf`` quantiles of each numeric
feature, counts at those edges, missing counts, moments, a seeded bottom-k sample, categorical
level counts. Here the rows are in parts — each worker's fit matrix, and the validation tail on the
client — and the same profile comes from small answers of each part:

- **Edges, exactly**: an ``inverted_cdf`` quantile of n values is the value of a rank that depends
  on n alone (:func:`ranks`), so each edge is an order statistic, found by a distributed
  selection: each part offers random pivots of its values; it counts its values below and at each
  pivot; a rank falls either on a pivot (done) or strictly between two neighbouring pivots, and
  each part returns its few values in that gap. Three rounds, whatever the data.
- **Counts** at the edges, **missing** counts and **level counts** are sums.
- **Sample**: the bottom-k of rows keyed by one seeded stream of random numbers in reference
  order; a part draws its keys at its offset in that stream (PCG64's ``advance``), so the merged
  bottom-k is a uniform sample of the reference — on one worker the local sample itself.
- **Mean and std** merge by Chan's formula: equal to one pass up to float rounding (≤ 1e-12
  relative, tested), not bitwise.

Statistics here import no storage and no Dask: ``run_on_parts`` is given by the caller.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from batchml.monitoring.profiles import (DEFAULT_BINS, REFERENCE_SAMPLE_SIZE, CategoricalProfile, NumericProfile, ReferenceProfile,
                                         _Reservoir, _is_missing, _numeric_profile, _plain)

PIVOTS = 2048  # random pivots per part and feature: a gap between two holds ~rows / (parts x PIVOTS) values


def ranks(n: int, bins: int) -> np.ndarray:
    """The 0-based ranks whose values are ``np.quantile(values, ..., method="inverted_cdf")`` at the
    profile's probabilities, for n values (numpy's own arithmetic, on the ranks themselves)."""
    if n == 0:
        return np.empty(0, dtype=np.int64)
    return np.quantile(np.arange(n, dtype=np.float64), np.linspace(0, 1, bins + 1)[1:-1], method="inverted_cdf").astype(np.int64)


def stream(seed: int, offset: int, count: int) -> np.ndarray:
    """Numbers ``offset`` to ``offset + count`` of ``np.random.default_rng(seed).random(...)``."""
    rng = np.random.default_rng(seed)
    rng.bit_generator.advance(offset)  # one 64-bit draw per float64
    return rng.random(count)


# -- what each part answers (run where the part is) ----------------------------------------------


@dataclass
class PartSummary:
    rows: int
    present: np.ndarray  # per numeric feature: finite values
    mean: np.ndarray
    m2: np.ndarray  # sum of squared deviations from the part's mean
    pivots: list[np.ndarray]
    keys: np.ndarray  # the part's bottom-k sample: keys and rows
    sample: np.ndarray


def summarise(x: np.ndarray, numeric: int, offset: int, seed: int, sample_size: int = REFERENCE_SAMPLE_SIZE) -> PartSummary:
    """Round 1 over the part's matrix ``x`` (its first ``numeric`` columns are the numeric
    features), whose rows are at ``offset`` in the reference's order."""
    columns = [np.asarray(x[:, j], dtype=np.float64) for j in range(numeric)]
    reservoir = _Reservoir(sample_size, numeric)
    keys = stream(seed, offset, len(x))
    reservoir.offer(keys, columns)
    reservoir._cut()
    rng = np.random.default_rng([seed, offset])
    present, mean, m2, pivots = [], [], [], []
    for column in columns:
        finite = column[np.isfinite(column)]
        present.append(finite.size)
        mean.append(float(finite.mean()) if finite.size else 0.0)
        m2.append(float(np.sum((finite - finite.mean()) ** 2)) if finite.size else 0.0)
        pivots.append(np.unique(finite[rng.integers(0, finite.size, PIVOTS)]) if finite.size else np.empty(0))
    return PartSummary(len(x), np.array(present, dtype=np.int64), np.array(mean), np.array(m2), pivots, *reservoir.kept())


def below(x: np.ndarray, part: int, points: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Round 2: per feature, the part's count of values below and at or below each point (sorted)."""
    out = []
    for j, pts in enumerate(points):
        column = x[:, j]
        finite = column[np.isfinite(column)]
        under = np.cumsum(np.bincount(np.searchsorted(pts, finite, side="right"), minlength=len(pts) + 1))[: len(pts)]
        at_or_under = np.cumsum(np.bincount(np.searchsorted(pts, finite, side="left"), minlength=len(pts) + 1))[: len(pts)]
        out.append((under, at_or_under))
    return out


def between(x: np.ndarray, part: int, gaps: list[list[tuple[float, float]]]) -> list[list[np.ndarray]]:
    """Round 3: per feature and gap, the part's values strictly inside it."""
    out = []
    for j, feature_gaps in enumerate(gaps):
        column = x[:, j]
        out.append([column[(column > low) & (column < high) & np.isfinite(column)] for low, high in feature_gaps])
    return out


def bin_counts(x: np.ndarray, part: int, edges: list[np.ndarray]) -> list[np.ndarray]:
    """Round 4: per feature, the part's finite values per bin (bin i: ``[edges[i-1], edges[i])``)."""
    out = []
    for j, feature_edges in enumerate(edges):
        column = x[:, j]
        finite = column[np.isfinite(column)]
        out.append(np.bincount(np.searchsorted(feature_edges, finite, side="right"), minlength=len(feature_edges) + 1))
    return out


# -- on the client ---------------------------------------------------------------------------------


def merged_profile(run_on_parts: Callable, numeric: list[str], levels: dict[str, Counter], missing_levels: dict[str, int],
                   offsets: list[int], scores: np.ndarray | None, seed: int, bins: int = DEFAULT_BINS,
                   sample_size: int = REFERENCE_SAMPLE_SIZE) -> ReferenceProfile:
    """The reference profile of rows held in parts. ``run_on_parts(fn, *args)`` runs ``fn(x, i, *args)``
    on every part's matrix ``x`` (part i at ``offsets[i]`` in reference order) where it is and
    returns the answers in order; ``levels`` / ``missing_levels``: each categorical's summed level counts and
    missing rows; ``scores``: the model's holdout scores."""
    width = len(numeric)
    summaries: list[PartSummary] = run_on_parts(_summarise_at, width, offsets, seed, sample_size)
    total_rows = sum(s.rows for s in summaries)
    edges = _edges(run_on_parts, summaries, width, bins)
    counts = [sum(part[j] for part in run_on_parts(bin_counts, edges)) for j in range(width)] if width else []
    reservoir = _Reservoir(sample_size, width)
    for s in summaries:
        reservoir.offer(s.keys, [s.sample[:, j] for j in range(width)])
    rows = reservoir.sample()
    profiles = {}
    for j, name in enumerate(numeric):
        present = int(sum(s.present[j] for s in summaries))
        mean, std = _moments([(int(s.present[j]), s.mean[j], s.m2[j]) for s in summaries])
        profiles[name] = NumericProfile(edges[j], np.asarray(counts[j], dtype=np.int64), total_rows - present, mean, std, rows[:, j])
    categorical = {name: _categorical(counted, missing_levels.get(name, 0)) for name, counted in levels.items()}
    profile = ReferenceProfile(profiles, categorical)
    if scores is not None:
        score_sample = _Reservoir(sample_size, 1)
        score_sample.offer(stream(seed, total_rows, len(scores)), [scores])
        profile.score = _numeric_profile(scores, bins, score_sample.sample()[:, 0])
    return profile


def _summarise_at(x: np.ndarray, part: int, width: int, offsets: list[int], seed: int, sample_size: int) -> PartSummary:
    return summarise(x, width, offsets[part], seed, sample_size)


def _edges(run_on_parts: Callable, summaries: list[PartSummary], width: int, bins: int) -> list[np.ndarray]:
    """Each feature's edges: the values at its quantile ranks, found by selection over the parts."""
    if not width:
        return []
    wanted = [ranks(int(sum(s.present[j] for s in summaries)), bins) for j in range(width)]
    points = [np.unique(np.concatenate([s.pivots[j] for s in summaries])) for j in range(width)]
    answers = run_on_parts(below, points)
    under = [sum(a[j][0] for a in answers) for j in range(width)]
    at_or_under = [sum(a[j][1] for a in answers) for j in range(width)]
    found: list[dict[int, float]] = [{} for _ in range(width)]
    gaps: list[list[tuple[float, float]]] = [[] for _ in range(width)]
    bases: list[list[tuple[int, int]]] = [[] for _ in range(width)]  # (rank, values below the gap)
    for j in range(width):
        pts = points[j]
        for rank in wanted[j]:
            i = int(np.searchsorted(under[j], rank, side="right")) - 1  # the last pivot with at most `rank` values below
            if i >= 0 and rank < at_or_under[j][i]:
                found[j][int(rank)] = float(pts[i])  # the rank falls on the pivot itself
                continue
            low = float(pts[i]) if i >= 0 else -np.inf
            high = float(pts[i + 1]) if i + 1 < len(pts) else np.inf
            gaps[j].append((low, high))
            bases[j].append((int(rank), int(at_or_under[j][i]) if i >= 0 else 0))
    if any(gaps):
        inside = run_on_parts(between, gaps)
        for j in range(width):
            for g, (rank, base) in enumerate(bases[j]):
                values = np.sort(np.concatenate([part[j][g] for part in inside]))
                found[j][rank] = float(values[rank - base])
    return [np.unique(np.array([found[j][int(r)] for r in wanted[j]], dtype=np.float64)) for j in range(width)]


def _moments(parts: list[tuple[int, float, float]]) -> tuple[float | None, float | None]:
    """Mean and std (ddof 0) of the parts' values from their counts, means and m2 (Chan et al.)."""
    n, mean, m2 = 0, 0.0, 0.0
    for count, part_mean, part_m2 in parts:
        if count == 0:
            continue
        delta = part_mean - mean
        m2 += part_m2 + delta**2 * n * count / (n + count)
        mean += delta * count / (n + count)
        n += count
    return (float(mean), float(np.sqrt(m2 / n))) if n else (None, None)


def _categorical(counted: Counter, missing: int) -> CategoricalProfile:
    counted = Counter({level: count for level, count in counted.items() if not _is_missing(level)})
    ranked = sorted(counted.items(), key=lambda kv: (-kv[1], str(kv[0])))
    return CategoricalProfile([_plain(level) for level, _ in ranked], np.array([c for _, c in ranked], dtype=np.int64), missing)
