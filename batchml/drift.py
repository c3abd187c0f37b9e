"""Drift statistics: a reference profile stored with each model, a streamed current side, pure maths.

At training time :func:`build_profile` summarises the training data (and the model's holdout scores)
into a :class:`ReferenceProfile`, which is JSON-serialisable and travels with the model, so a drift
run never rescans the training data. A drift run feeds each batch of new rows to a
:class:`CurrentAccumulator` (bounded memory, whatever the number of rows), then
:func:`compute_drift` compares the two and returns a :class:`DriftReport`. No IO happens here.

    profile = build_profile({"epss": x_train}, {"ecosystem": eco_train}, scores=holdout_scores)
    current = CurrentAccumulator(ReferenceProfile.from_dict(profile.to_dict()))
    for batch in batches:                       # e.g. one Arrow record batch at a time
        current.update({"epss": batch_epss}, {"ecosystem": batch_eco}, scores=batch_scores)
    report = compute_drift(profile, current, DriftConfig())

**Binning.** A numeric feature is cut into ``bins`` (default 10) equal-frequency bins of the
reference's non-missing values: the inner edges are the reference values at the quantiles 1/10 …
9/10 (numpy's ``inverted_cdf``, so edges are observed values), repeated edges are dropped (a
discrete feature gets fewer bins, e.g. integer edges for a count), and the
outer bins are open to −inf and +inf so every current value lands somewhere. Bin *i* is
``[edge[i-1], edge[i])``. A categorical feature has one bin per reference level plus one
``(unseen)`` bin pooling every level the reference never saw. Missing values (NaN and ±inf for
numbers, None or NaN for categories) get a ``(missing)`` bin when either side has any. PSI,
Jensen-Shannon and chi-square all use these bins; charts get them as ``DriftResult.histogram``.

**PSI** = Σ (cᵢ − rᵢ)·ln(cᵢ / rᵢ) over the bins, with rᵢ, cᵢ the reference and current proportions
raised to at least ``PSI_EPS`` = 1e-4 (no renormalisation). The epsilon keeps an empty bin finite:
it counts as holding 0.01 %, so a level that appears with share p adds ≈ p·ln(p / 1e-4), e.g.
0.31 for p = 5 %. Drift when PSI ≥ ``psi_threshold`` (0.2, the usual "significant shift" mark).

**Other methods.** ``jensen_shannon``: Jensen-Shannon distance (base 2, in [0, 1]) over the same
bins. ``chi2``: Pearson's chi-square on the 2 × k table of reference vs current counts (two-sample
contingency form, no Yates correction, bins empty on both sides dropped) — not a goodness-of-fit
test against reference proportions, which treats the reference as exact and so false-alarms when
the reference is not much larger than the current side. ``ks`` (two-sample Kolmogorov-Smirnov) and
``wasserstein`` (first Wasserstein distance divided by the reference std, ddof 0, as Evidently does)
compare *samples*: a seeded reservoir of ``REFERENCE_SAMPLE_SIZE`` training rows kept in the
profile and a seeded bottom-k reservoir of ``CURRENT_SAMPLE_SIZE`` current rows, so a KS p-value
reflects those sample sizes, not the full row counts; ``n_reference``/``n_current`` say which.

**Why effect sizes by default.** A p-value answers "is there *any* difference?", and with enough
rows there always is: with a million rows per side a 0.02 sd shift of a normal feature gives a KS
p-value around 1e-29 while its PSI is 0.0004. Nightly batches are large, so p-value tests
would flag every feature every night. PSI (and the distances) measure *how much* the distribution
moved, which is what decides whether a model needs retraining; ``ks``/``chi2`` remain available
with ``p_value`` (default 0.01) as their threshold. ``thresholds: {feature: value}`` overrides the
threshold of one feature (in the unit of its method; ``__score__`` for the prediction row).

**Extra rows.** Besides one ``kind="feature"`` row per feature with the configured method:
``prediction`` (PSI of the current scores against the holdout score profile, named ``__score__``),
``unseen_levels`` per categorical (share of current non-missing rows whose level the reference never
saw; drift above ``UNSEEN_SHARE_THRESHOLD``), ``missing_rate`` per feature (current minus reference
missing rate; drift when its absolute value exceeds ``MISSING_RATE_THRESHOLD``) and, when
``multivariate`` is on, a domain classifier's AUROC over the numeric features (drift at or above
``DOMAIN_AUC_THRESHOLD``). Dataset drift counts only ``feature`` rows that were computed: the
drifted share must reach ``dataset_drift_share``.

**Failures are visible.** A method that cannot be computed (no current rows, a constant reference
for a normed distance, …) yields a row with ``error`` set, ``statistic=None`` and
``drifted=False`` — never a silent NaN.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats
from scipy.spatial import distance

from batchml.config import DriftConfig
from batchml.errors import ModelError

__all__ = [
    "CurrentAccumulator",
    "DriftReport",
    "DriftResult",
    "ReferenceProfile",
    "build_profile",
    "chi2_two_sample",
    "compute_drift",
    "domain_classifier_auc",
    "jensen_shannon",
    "ks_2sample",
    "psi",
    "wasserstein_normed",
]

PROFILE_VERSION = 1
DEFAULT_BINS = 10
PSI_EPS = 1e-4
REFERENCE_SAMPLE_SIZE = 10_000
CURRENT_SAMPLE_SIZE = 100_000
UNSEEN_SHARE_THRESHOLD = 0.05
MISSING_RATE_THRESHOLD = 0.1
DOMAIN_AUC_THRESHOLD = 0.55
MAX_UNSEEN_LEVELS = 1_000  # named individually; beyond this they are only counted (bounded memory)
SCORE_FEATURE = "__score__"
MULTIVARIATE_FEATURE = "__multivariate__"
MISSING_LABEL = "(missing)"
UNSEEN_LABEL = "(unseen)"

NumericBatch = Mapping[str, np.ndarray]
CategoricalBatch = Mapping[str, np.ndarray]


# --- statistics on arrays and count vectors -------------------------------------------------------


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
    ref, cur = _count_pair(ref_counts, cur_counts)
    return float(distance.jensenshannon(ref, cur, base=2))


def chi2_two_sample(ref_counts: Any, cur_counts: Any) -> tuple[float, float, int]:
    """Pearson chi-square test of homogeneity on the 2 × k table of reference vs current counts.

    Same as ``scipy.stats.chi2_contingency(table, correction=False)`` after dropping bins that are
    empty on both sides. Returns ``(statistic, p_value, dof)``; one non-empty bin gives ``(0, 1, 0)``.
    """
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
    result = stats.ks_2samp(_finite(ref, "reference"), _finite(cur, "current"))
    return float(result.statistic), float(result.pvalue)


def wasserstein_normed(ref: Any, cur: Any, ref_std: float | None = None) -> float:
    """First Wasserstein distance divided by the reference std (ddof 0 of ``ref`` when not given)."""
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
    import lightgbm  # lazily: only the optional multivariate check needs it

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


# --- bounded samples ------------------------------------------------------------------------------


class _Reservoir:
    """Seeded bottom-k sample of rows: keeps the ``capacity`` rows with the smallest random keys.

    Keys come from one generator in row order, so the kept rows are the same however the stream is
    cut into batches (unlike classic reservoir sampling), and rows are returned in key order.
    """

    def __init__(self, capacity: int, width: int) -> None:
        self.capacity = capacity
        self.keys = np.empty(0)
        self.rows = np.empty((0, width))
        self.bound = np.inf  # rows with a key at or above this cannot enter a full reservoir
        self._ordered: np.ndarray | None = None

    def offer(self, keys: np.ndarray, columns: list[np.ndarray]) -> None:
        if self.capacity == 0:
            return
        take = np.flatnonzero(keys < self.bound)
        if take.size == 0:
            return
        if take.size > self.capacity:  # rows beyond the batch's own bottom-k can never be kept
            take = take[np.argpartition(keys[take], self.capacity - 1)[: self.capacity]]
        rows = np.column_stack([np.asarray(c, dtype=np.float64)[take] for c in columns]) if columns else np.empty((take.size, 0))
        self.keys = np.concatenate([self.keys, keys[take]])
        self.rows = np.concatenate([self.rows, rows])
        if self.keys.size > self.capacity:
            keep = np.argpartition(self.keys, self.capacity - 1)[: self.capacity]
            self.keys, self.rows = self.keys[keep], self.rows[keep]
        if self.keys.size == self.capacity:
            self.bound = float(self.keys.max())
        self._ordered = None

    def sample(self) -> np.ndarray:
        if self._ordered is None:  # cached: a report reads one column per feature
            self._ordered = self.rows[np.argsort(self.keys, kind="stable")]
        return self._ordered


# --- reference profile ----------------------------------------------------------------------------


@dataclass
class NumericProfile:
    """Reference summary of one numeric feature (or of the model's scores)."""

    edges: np.ndarray  # inner bin edges, ascending; bin i is [edges[i-1], edges[i])
    counts: np.ndarray  # rows per bin, len(edges) + 1
    missing: int
    mean: float | None
    std: float | None  # ddof 0
    sample: np.ndarray  # reservoir sample of reference rows; NaN where the row is missing

    @property
    def n(self) -> int:
        return int(self.counts.sum()) + self.missing

    def to_dict(self) -> dict[str, Any]:
        return {"edges": self.edges.tolist(), "counts": self.counts.tolist(), "missing": self.missing,
                "mean": self.mean, "std": self.std, "sample": [None if v != v else v for v in self.sample.tolist()]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NumericProfile:
        profile = cls(np.asarray(d["edges"], dtype=np.float64), np.asarray(d["counts"], dtype=np.int64), int(d["missing"]),
                      _optional_float(d["mean"]), _optional_float(d["std"]), np.asarray(d["sample"], dtype=np.float64))
        if profile.counts.shape != (profile.edges.size + 1,):
            raise ValueError(f"{profile.edges.size} edges need {profile.edges.size + 1} counts, got {profile.counts.size}")
        return profile


@dataclass
class CategoricalProfile:
    """Reference summary of one categorical feature: level counts, most frequent first."""

    levels: list[Any]
    counts: np.ndarray
    missing: int

    @property
    def n(self) -> int:
        return int(self.counts.sum()) + self.missing

    def to_dict(self) -> dict[str, Any]:
        return {"levels": list(self.levels), "counts": self.counts.tolist(), "missing": self.missing}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CategoricalProfile:
        profile = cls(list(d["levels"]), np.asarray(d["counts"], dtype=np.int64), int(d["missing"]))
        if len(profile.levels) != profile.counts.size:
            raise ValueError(f"{len(profile.levels)} levels but {profile.counts.size} counts")
        return profile


@dataclass
class ReferenceProfile:
    """What drift runs compare against: one summary per feature, plus the holdout score distribution."""

    numeric: dict[str, NumericProfile]
    categorical: dict[str, CategoricalProfile]
    score: NumericProfile | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of lists, floats and ints (``json.dumps`` accepts it as is)."""
        return {"version": PROFILE_VERSION,
                "numeric": {name: p.to_dict() for name, p in self.numeric.items()},
                "categorical": {name: p.to_dict() for name, p in self.categorical.items()},
                "score": None if self.score is None else self.score.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReferenceProfile:
        """Inverse of :meth:`to_dict`; a malformed dict raises :class:`ModelError`."""
        try:
            if d["version"] != PROFILE_VERSION:
                raise ValueError(f"version {d['version']!r} is not {PROFILE_VERSION}")
            return cls({name: NumericProfile.from_dict(p) for name, p in d["numeric"].items()},
                       {name: CategoricalProfile.from_dict(p) for name, p in d["categorical"].items()},
                       None if d["score"] is None else NumericProfile.from_dict(d["score"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"reference profile is unreadable ({type(exc).__name__}: {exc}); retrain the model to rebuild it") from None


def build_profile(numeric: NumericBatch, categorical: CategoricalBatch, scores: np.ndarray | None = None, *,
                  bins: int = DEFAULT_BINS, sample_size: int = REFERENCE_SAMPLE_SIZE, seed: int = 0) -> ReferenceProfile:
    """Summarise the training data (and the model's holdout ``scores``) into a reference profile.

    ``numeric`` maps names to float arrays (NaN = missing); ``categorical`` to object arrays
    (None = missing). The numeric sample is one seeded sample of rows shared by all numeric features.
    """
    rng = np.random.default_rng(seed)
    sample = _Reservoir(sample_size, len(numeric))
    sample.offer(rng.random(_batch_length(numeric, categorical)), list(numeric.values()))
    rows = sample.sample()
    profile = ReferenceProfile({name: _numeric_profile(values, bins, rows[:, i]) for i, (name, values) in enumerate(numeric.items())},
                               {name: _categorical_profile(values) for name, values in categorical.items()})
    if scores is not None:
        score_sample = _Reservoir(sample_size, 1)
        score_sample.offer(rng.random(len(scores)), [scores])
        profile.score = _numeric_profile(scores, bins, score_sample.sample()[:, 0])
    return profile


def _numeric_profile(values: np.ndarray, bins: int, sample: np.ndarray) -> NumericProfile:
    values = np.asarray(values, dtype=np.float64)
    present = np.sort(values[np.isfinite(values)])  # sorted once: quantiles and bin counts both read it
    edges = np.unique(np.quantile(present, np.linspace(0, 1, bins + 1)[1:-1], method="inverted_cdf")) if present.size else np.empty(0)
    counts = np.diff(np.searchsorted(present, edges, side="left"), prepend=0, append=present.size)
    mean, std = (float(present.mean()), float(present.std())) if present.size else (None, None)
    return NumericProfile(edges, counts.astype(np.int64), int(values.size - present.size), mean, std, sample)


def _categorical_profile(values: np.ndarray) -> CategoricalProfile:
    counted = _count_levels(values)
    missing = sum(counted.pop(level) for level in [level for level in counted if _is_missing(level)])
    levels = sorted(counted.items(), key=lambda kv: (-kv[1], str(kv[0])))
    return CategoricalProfile([_plain(level) for level, _ in levels], np.array([c for _, c in levels], dtype=np.int64), missing)


def _count_levels(values: Any) -> Counter:
    # Counter runs in C; over a list it is several times faster than np.unique on object arrays.
    return Counter(values.tolist() if isinstance(values, np.ndarray) else values)


def _is_missing(level: Any) -> bool:
    return level is None or (isinstance(level, float) and level != level)


# --- current side, streamed -----------------------------------------------------------------------


@dataclass
class NumericCounts:
    """Current-side tally of one numeric feature against the reference bin edges."""

    edges: np.ndarray
    counts: np.ndarray
    missing: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations; merged per batch (Chan et al.) to avoid cancellation

    @classmethod
    def against(cls, profile: NumericProfile) -> NumericCounts:
        return cls(profile.edges, np.zeros(profile.edges.size + 1, dtype=np.int64))

    @property
    def present(self) -> int:
        return int(self.counts.sum())

    @property
    def n(self) -> int:
        return self.present + self.missing

    @property
    def std(self) -> float | None:
        return math.sqrt(self.m2 / self.present) if self.present else None

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        present = values[np.isfinite(values)]
        # One vectorised comparison per edge beats a binary search per value for the ~10 edges
        # used here (about 20× at 100k rows); bin i holds those >= edge i-1 but not >= edge i.
        at_or_above = [np.count_nonzero(present >= edge) for edge in self.edges]
        self._merge_moments(present)  # before the counts move: it needs the earlier row count
        self.counts -= np.diff([present.size, *at_or_above, 0])
        self.missing += values.size - present.size

    def _merge_moments(self, present: np.ndarray) -> None:
        if present.size == 0:
            return
        n_old, n_new = self.present, present.size
        batch_mean = float(present.mean())
        delta = batch_mean - self.mean
        self.m2 += float(np.sum((present - batch_mean) ** 2)) + delta**2 * n_old * n_new / (n_old + n_new)
        self.mean += delta * n_new / (n_old + n_new)


@dataclass
class LevelCounts:
    """Current-side tally of one categorical feature: reference levels, unseen levels, missing."""

    index: dict[Any, int]  # reference level -> position in counts
    counts: np.ndarray
    unseen: dict[Any, int] = field(default_factory=dict)
    unseen_other: int = 0  # unseen rows whose level was not named because MAX_UNSEEN_LEVELS was reached
    missing: int = 0

    @classmethod
    def against(cls, profile: CategoricalProfile) -> LevelCounts:
        return cls({level: i for i, level in enumerate(profile.levels)}, np.zeros(len(profile.levels), dtype=np.int64))

    @property
    def unseen_total(self) -> int:
        return sum(self.unseen.values()) + self.unseen_other

    @property
    def present(self) -> int:
        return int(self.counts.sum()) + self.unseen_total

    @property
    def n(self) -> int:
        return self.present + self.missing

    def add(self, values: np.ndarray) -> None:
        for level, count in _count_levels(values).items():
            if _is_missing(level):
                self.missing += count
            elif (position := self.index.get(level)) is not None:
                self.counts[position] += count
            elif level in self.unseen or len(self.unseen) < MAX_UNSEEN_LEVELS:
                self.unseen[level] = self.unseen.get(level, 0) + count
            else:
                self.unseen_other += count


class CurrentAccumulator:
    """Streams the current data batch by batch against a reference profile, in bounded memory.

    Keeps bin and level counts, missing counts, running moments and a seeded bottom-k sample of
    ``sample_size`` rows (for ks, wasserstein and the domain classifier). Cutting the same rows into
    different batches gives the same counts and the same sample.
    """

    def __init__(self, profile: ReferenceProfile, *, sample_size: int = CURRENT_SAMPLE_SIZE, seed: int = 0) -> None:
        self.profile = profile
        self.rows = 0
        self.numeric = {name: NumericCounts.against(p) for name, p in profile.numeric.items()}
        self.categorical = {name: LevelCounts.against(p) for name, p in profile.categorical.items()}
        self.score = NumericCounts.against(profile.score) if profile.score is not None else None
        self.score_rows = 0  # counted even when the profile has no score distribution to compare with
        self._rng = np.random.default_rng(seed)
        self._sample = _Reservoir(sample_size, len(self.numeric))
        self._score_sample = _Reservoir(sample_size, 1)

    def update(self, numeric: NumericBatch, categorical: CategoricalBatch, scores: np.ndarray | None = None) -> None:
        """Add one batch: every profiled feature, as equally long arrays (NaN / None = missing)."""
        _check_names(numeric, self.numeric, "numeric")
        _check_names(categorical, self.categorical, "categorical")
        keys = self._rng.random(_batch_length(numeric, categorical, scores))
        for name, counts in self.numeric.items():
            counts.add(numeric[name])
        self._sample.offer(keys, [numeric[name] for name in self.numeric])
        for name, levels in self.categorical.items():
            levels.add(categorical[name])
        if scores is not None:
            self._add_scores(np.asarray(scores, dtype=np.float64), keys)
        self.rows += keys.size

    def _add_scores(self, scores: np.ndarray, keys: np.ndarray) -> None:
        self.score_rows += scores.size
        if self.score is not None:
            self.score.add(scores)
            self._score_sample.offer(keys, [scores])

    def sample(self) -> np.ndarray:
        """The sampled current rows, one column per numeric feature in profile order (NaN = missing)."""
        return self._sample.sample()

    def numeric_sample(self, name: str) -> np.ndarray:
        """Sampled current values of one numeric feature (NaN = missing); ``__score__`` for scores."""
        if name == SCORE_FEATURE:
            return self._score_sample.sample()[:, 0]
        return self._sample.sample()[:, list(self.numeric).index(name)]


def _check_names(given: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
    if set(given) != set(expected):
        missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        raise ValueError(f"{what} features do not match the reference profile (missing: {missing}, not profiled: {extra})")


def _batch_length(*groups: Mapping[str, Any] | np.ndarray | None) -> int:
    lengths = set()
    for group in groups:
        arrays = group.values() if isinstance(group, Mapping) else [] if group is None else [group]
        lengths.update(len(a) for a in arrays)
    if len(lengths) > 1:
        raise ValueError(f"all arrays of one batch must have the same length, got lengths {sorted(lengths)}")
    return lengths.pop() if lengths else 0


# --- comparison -----------------------------------------------------------------------------------


@dataclass
class DriftResult:
    """One row of a drift report (see the module docstring for the kinds)."""

    feature: str
    method: str
    statistic: float | None
    p_value: float | None  # None unless the method is a test (ks, chi2)
    threshold: float
    drifted: bool
    n_reference: int  # values the statistic used: rows for binned methods, sample size for ks/wasserstein
    n_current: int
    kind: str  # feature | prediction | unseen_levels | missing_rate | multivariate
    error: str | None = None
    histogram: dict[str, list] | None = None  # {"labels", "reference", "current"}: proportions per bin

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["histogram"] = None if self.histogram is None else json.dumps(self.histogram)
        return {key: row[key] for key in ROW_COLUMNS}


ROW_COLUMNS = ("feature", "method", "kind", "statistic", "p_value", "threshold", "drifted", "n_reference", "n_current", "error", "histogram")


@dataclass
class DriftReport:
    """All drift rows of one run, and whether they add up to dataset drift."""

    results: list[DriftResult]
    dataset_drift_share: float = 0.3

    @property
    def feature_results(self) -> list[DriftResult]:
        """``kind="feature"`` rows that were computed (rows with an error do not count either way)."""
        return [r for r in self.results if r.kind == "feature" and r.error is None]

    @property
    def feature_count(self) -> int:
        return len(self.feature_results)

    @property
    def drifted_count(self) -> int:
        return sum(r.drifted for r in self.feature_results)

    @property
    def dataset_drift(self) -> bool:
        return self.feature_count > 0 and self.drifted_count / self.feature_count >= self.dataset_drift_share

    @property
    def errors(self) -> list[DriftResult]:
        return [r for r in self.results if r.error is not None]

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per result, columns as in ``ROW_COLUMNS``; the histogram as a JSON string."""
        return [r.to_row() for r in self.results]


@dataclass
class _Comparison:
    """One feature on both sides: counts over shared bins, and (numeric only) the samples."""

    labels: list[str]
    reference: np.ndarray
    current: np.ndarray
    reference_sample: np.ndarray | None = None
    current_sample: np.ndarray | None = None
    reference_std: float | None = None

    def histogram(self) -> dict[str, list]:
        return {"labels": self.labels, "reference": _shares(self.reference), "current": _shares(self.current)}

    def sizes(self, on_sample: bool) -> tuple[int, int]:
        if on_sample:
            return int(np.isfinite(self.reference_sample).sum()), int(np.isfinite(self.current_sample).sum())
        return int(self.reference.sum()), int(self.current.sum())


@dataclass(frozen=True)
class _Method:
    compute: Callable[[_Comparison], tuple[float, float | None]]
    is_test: bool = False  # a test flags drift when p < threshold; a distance when statistic >= threshold
    on_sample: bool = False


_METHODS = {
    "psi": _Method(lambda c: (psi(c.reference, c.current), None)),
    "jensen_shannon": _Method(lambda c: (jensen_shannon(c.reference, c.current), None)),
    "chi2": _Method(lambda c: chi2_two_sample(c.reference, c.current)[:2], is_test=True),
    "ks": _Method(lambda c: ks_2sample(c.reference_sample, c.current_sample), is_test=True, on_sample=True),
    "wasserstein": _Method(lambda c: (wasserstein_normed(c.reference_sample, c.current_sample, c.reference_std), None), on_sample=True),
}


def compute_drift(profile: ReferenceProfile, current: CurrentAccumulator, config: DriftConfig) -> DriftReport:
    """Compare the streamed current data with the reference profile; one report row per check."""
    _check_names(current.numeric, profile.numeric, "numeric")
    _check_names(current.categorical, profile.categorical, "categorical")
    results = []
    for name, ref in profile.numeric.items():
        cur = current.numeric[name]
        results.append(_feature_result(name, "feature", config.numeric_method, _numeric_comparison(ref, cur, current.numeric_sample(name)), config))
        results.append(_missing_rate(name, ref, cur))
    for name, ref in profile.categorical.items():
        cur = current.categorical[name]
        results.append(_feature_result(name, "feature", config.categorical_method, _categorical_comparison(ref, cur), config))
        results.append(_unseen_levels(name, ref, cur))
        results.append(_missing_rate(name, ref, cur))
    if current.score_rows:
        results.append(_prediction_result(profile, current, config))
    if config.multivariate:
        results.append(_multivariate_result(profile, current, config))
    return DriftReport(results, config.dataset_drift_share)


def _judge(feature: str, method: str, kind: str, threshold: float, sizes: tuple[int, int],
           compute: Callable[[], tuple[float, float | None]], drifted_if: Callable[[float, float | None], bool],
           histogram: dict | None = None) -> DriftResult:
    """Run one check; a ValueError or a non-finite value becomes the row's error, never a NaN."""
    try:
        statistic, p_value = compute()
        if not math.isfinite(statistic) or (p_value is not None and not math.isfinite(p_value)):
            raise ValueError(f"{method} gave a non-finite value ({statistic}, p={p_value})")
    except ValueError as exc:
        return DriftResult(feature, method, None, None, threshold, False, *sizes, kind, str(exc), histogram)
    return DriftResult(feature, method, statistic, p_value, threshold, bool(drifted_if(statistic, p_value)), *sizes, kind, None, histogram)


def _feature_result(name: str, kind: str, method: str, comparison: _Comparison, config: DriftConfig) -> DriftResult:
    spec, threshold = _METHODS[method], _threshold(name, method, config)
    drifted_if = (lambda s, p: p < threshold) if spec.is_test else (lambda s, p: s >= threshold)
    return _judge(name, method, kind, threshold, comparison.sizes(spec.on_sample), lambda: spec.compute(comparison), drifted_if, comparison.histogram())


def _threshold(name: str, method: str, config: DriftConfig) -> float:
    if name in config.thresholds:
        return config.thresholds[name]
    return {"psi": config.psi_threshold, "ks": config.p_value, "chi2": config.p_value,
            "wasserstein": config.wasserstein_threshold, "jensen_shannon": config.jensen_shannon_threshold}[method]


def _numeric_comparison(ref: NumericProfile, cur: NumericCounts, current_sample: np.ndarray) -> _Comparison:
    if not np.array_equal(ref.edges, cur.edges):
        raise ValueError("the current side was binned against a different reference profile")
    finite_edges = [_format(e) for e in ref.edges]
    labels = [f"[{lo}, {hi})" for lo, hi in zip(["-inf", *finite_edges], [*finite_edges, "inf"])]
    labels[0] = labels[0].replace("[", "(", 1)
    comparison = _Comparison(labels, ref.counts, cur.counts, ref.sample, current_sample, ref.std)
    return _with_extra_bin(comparison, MISSING_LABEL, ref.missing, cur.missing)


def _categorical_comparison(ref: CategoricalProfile, cur: LevelCounts) -> _Comparison:
    comparison = _Comparison([str(level) for level in ref.levels], ref.counts, cur.counts)
    comparison = _with_extra_bin(comparison, UNSEEN_LABEL, 0, cur.unseen_total)
    return _with_extra_bin(comparison, MISSING_LABEL, ref.missing, cur.missing)


def _with_extra_bin(comparison: _Comparison, label: str, ref_count: int, cur_count: int) -> _Comparison:
    if ref_count == 0 and cur_count == 0:
        return comparison  # an always-empty bin would only add eps noise to psi
    comparison.labels = [*comparison.labels, label]
    comparison.reference = np.append(comparison.reference, ref_count)
    comparison.current = np.append(comparison.current, cur_count)
    return comparison


def _missing_rate(name: str, ref: NumericProfile | CategoricalProfile, cur: NumericCounts | LevelCounts) -> DriftResult:
    change = lambda: (_rate(cur.missing, cur.n, "current") - _rate(ref.missing, ref.n, "reference"), None)  # noqa: E731
    return _judge(name, "missing_rate", "missing_rate", MISSING_RATE_THRESHOLD, (ref.n, cur.n), change,
                  lambda s, _: abs(s) > MISSING_RATE_THRESHOLD)


def _unseen_levels(name: str, ref: CategoricalProfile, cur: LevelCounts) -> DriftResult:
    top = sorted(cur.unseen.items(), key=lambda kv: -kv[1])[:20]
    histogram = {"labels": [str(level) for level, _ in top], "reference": [0.0] * len(top),
                 "current": [count / cur.present for _, count in top]} if top else None
    share = lambda: (_rate(cur.unseen_total, cur.present, "current non-missing"), None)  # noqa: E731
    return _judge(name, "unseen_share", "unseen_levels", UNSEEN_SHARE_THRESHOLD, (ref.n - ref.missing, cur.present), share,
                  lambda s, _: s > UNSEEN_SHARE_THRESHOLD, histogram)


def _prediction_result(profile: ReferenceProfile, current: CurrentAccumulator, config: DriftConfig) -> DriftResult:
    threshold = _threshold(SCORE_FEATURE, "psi", config)
    if profile.score is None or current.score is None:
        def no_reference() -> tuple[float, None]:
            raise ValueError("the reference profile holds no score distribution; retrain the model to record one")
        return _judge(SCORE_FEATURE, "psi", "prediction", threshold, (0, current.score_rows), no_reference, lambda s, p: False)
    comparison = _numeric_comparison(profile.score, current.score, current.numeric_sample(SCORE_FEATURE))
    return _feature_result(SCORE_FEATURE, "prediction", "psi", comparison, config)


def _multivariate_result(profile: ReferenceProfile, current: CurrentAccumulator, config: DriftConfig) -> DriftResult:
    threshold = config.thresholds.get(MULTIVARIATE_FEATURE, DOMAIN_AUC_THRESHOLD)
    reference = np.column_stack([p.sample for p in profile.numeric.values()]) if profile.numeric else np.empty((0, 0))
    sample = current.sample()
    return _judge(MULTIVARIATE_FEATURE, "domain_classifier_auc", "multivariate", threshold, (len(reference), len(sample)),
                  lambda: (domain_classifier_auc(reference, sample), None), lambda s, _: s >= threshold)


def _rate(part: int, whole: int, side: str) -> float:
    if whole == 0:
        raise ValueError(f"no {side} rows")
    return part / whole


def _shares(counts: np.ndarray) -> list[float]:
    total = counts.sum()
    return (counts / total).tolist() if total else [0.0] * len(counts)


def _format(value: float) -> str:
    return f"{value:.4g}"


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
