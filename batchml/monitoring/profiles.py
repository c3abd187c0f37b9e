"""Both sides of a drift comparison: the reference profile stored with a model, the streamed current side.

:func:`build_profile` summarises training data into a JSON-serialisable :class:`ReferenceProfile`;
:class:`CurrentAccumulator` tallies new rows against it batch by batch in bounded memory.
:func:`batchml.monitoring.drift.compute_drift` compares the two (see :mod:`batchml.monitoring.drift` for the binning).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchml.errors import ModelError

__all__ = [
    "CategoricalProfile",
    "CurrentAccumulator",
    "LevelCounts",
    "NumericCounts",
    "NumericProfile",
    "ReferenceProfile",
    "build_profile",
]

PROFILE_VERSION = 1
DEFAULT_BINS = 10
REFERENCE_SAMPLE_SIZE = 10_000
CURRENT_SAMPLE_SIZE = 100_000
MAX_UNSEEN_LEVELS = 1_000  # named individually; beyond this they are only counted (bounded memory)
SCORE_FEATURE = "__score__"

NumericBatch = Mapping[str, np.ndarray]
CategoricalBatch = Mapping[str, np.ndarray]


# --- bounded samples ------------------------------------------------------------------------------


class _Reservoir:
    """Seeded bottom-k sample of rows: keeps the ``capacity`` rows with the smallest random keys.

    Keys come from one generator in row order, so the kept rows are the same however the stream is
    cut into batches (unlike classic reservoir sampling), and rows are returned in key order.
    """

    def __init__(self, capacity: int, width: int) -> None:
        self.capacity = capacity
        # room for twice the sample: cut back to the bottom-k only when full, not after every batch
        # (cutting per batch copied the whole sample each time: 0.7 s over 2M rows of 31 features)
        self._keys = np.empty(2 * capacity)
        # one row per column, every copy a take along one contiguous column: into a row-major
        # sample each value landed a row apart (0.20 vs 0.11 CPU-s over 2M rows of 31 features)
        self._columns = np.empty((width, 2 * capacity))
        self.size = 0
        self.bound = np.inf  # rows with a key at or above this cannot be among the bottom-k
        self._ordered: np.ndarray | None = None

    def offer(self, keys: np.ndarray, columns: list[np.ndarray]) -> None:
        if self.capacity == 0:
            return
        take = np.flatnonzero(keys < self.bound)
        if take.size > self.capacity:  # rows beyond the batch's own bottom-k can never be kept
            take = take[np.argpartition(keys[take], self.capacity - 1)[: self.capacity]]
        if take.size == 0:
            return
        if self.size + take.size > self._keys.size:
            self._cut()
        end = self.size + take.size
        self._keys[self.size:end] = keys[take]
        for column, kept in zip(columns, self._columns):
            _take(np.asarray(column, dtype=np.float64), take, kept[self.size:end])
        self.size = end
        self._ordered = None

    def _cut(self) -> None:
        """Keep the ``capacity`` smallest keys at the front; what is kept sets the bound."""
        if self.size > self.capacity:
            keep = np.argpartition(self._keys[: self.size], self.capacity - 1)[: self.capacity]
            self._keys[: self.capacity] = self._keys[keep]
            self._columns[:, : self.capacity] = self._rearranged(keep)
            self.size = self.capacity
        if self.size == self.capacity > 0:
            self.bound = float(self._keys[: self.size].max())

    def _rearranged(self, order: np.ndarray) -> np.ndarray:
        """The kept columns' rows at positions ``order``, one column at a time (a fancy index along
        the second axis of the 2-D array walks it value by value: several times slower)."""
        out = np.empty((len(self._columns), order.size))
        for column, row in zip(self._columns, out):
            _take(column[: self.size], order, row)
        return out

    def __getstate__(self) -> dict:
        # a partition's tally travels back from a Dask worker: only the filled rows, not the spare room
        state = dict(self.__dict__)
        state["_keys"], state["_columns"], state["_ordered"] = self._keys[: self.size].copy(), self._columns[:, : self.size].copy(), None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        keys, columns = self._keys, self._columns
        self._keys, self._columns = np.empty(2 * self.capacity), np.empty((len(columns), 2 * self.capacity))
        self._keys[: self.size], self._columns[:, : self.size] = keys, columns

    def merge(self, other: _Reservoir) -> None:
        """Add another reservoir's rows: with independently seeded keys, the bottom-k of the union
        is a uniform sample of both streams (all rows while they hold fewer than ``capacity``)."""
        self.offer(other._keys[: other.size], list(other._columns[:, : other.size]))

    def kept(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows) kept so far, in no particular order: what another reservoir can be offered."""
        return self._keys[: self.size].copy(), self._columns[:, : self.size].T.copy()

    def sample(self) -> np.ndarray:
        """The kept rows in key order, one column per offered column."""
        if self._ordered is None:  # cached: a report reads one column per feature
            self._cut()
            self._ordered = self._rearranged(np.argsort(self._keys[: self.size], kind="stable")).T
        return self._ordered


def _take(values: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
    """``out[:] = values[positions]`` without a temporary (positions are in range: "clip" only
    spares numpy the buffered copy its bounds check makes)."""
    np.take(values, positions, out=out, mode="clip")


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

    def restricted(self, numeric: list[str], categorical: list[str]) -> ReferenceProfile:
        """The profile of only those of ``numeric`` and ``categorical`` it holds (scores kept): after
        a change of the feature list, drift is measured on the features both sides have."""
        return ReferenceProfile({n: self.numeric[n] for n in numeric if n in self.numeric},
                                {n: self.categorical[n] for n in categorical if n in self.categorical}, self.score)

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
    if isinstance(values, (pa.Array, pa.ChunkedArray)):  # Arrow counts in C++: 10x a Counter over Python strings
        counted = pc.value_counts(values)
        return Counter(dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist())))
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
        total = values.sum()  # NaN or inf when a value is (or when the sum overflows): most columns need no mask
        present = values if np.isfinite(total) else values[np.isfinite(values)]
        # One vectorised comparison per edge beats a binary search per value for the ~10 edges
        # used here (about 20× at 100k rows); bin i holds those >= edge i-1 but not >= edge i.
        above = np.empty(present.size, dtype=bool)  # one buffer for every edge's comparison
        at_or_above = [np.count_nonzero(np.greater_equal(present, edge, out=above)) for edge in self.edges]
        self._merge_moments(present, total if present is values else present.sum())  # before the counts move
        self.counts -= np.diff([present.size, *at_or_above, 0])
        self.missing += values.size - present.size

    def _merge_moments(self, present: np.ndarray, total: float) -> None:
        """Merge the batch's mean and sum of squared deviations (``total``: the sum of ``present``)."""
        n = present.size
        if n == 0:
            return
        mean = total / n  # what present.mean() returns, without summing again
        # The squared deviations from one pass and no copy: sum(x²) - n·mean², whose rounding error is
        # ~2e-16·(1 + mean²/variance) of the result; where the mean dwarfs the spread (or the spread is
        # nil) that error could show, and the deviations are summed as they are.
        # (einsum: np.dot would wake BLAS threads on cores the scoring keeps busy)
        m2 = float(np.einsum("i,i->", present, present)) - total * mean
        if not m2 > 1e-6 * mean * mean * n:
            deviations = present - mean
            m2 = float(np.einsum("i,i->", deviations, deviations))
        self._combine(n, float(mean), m2)

    def _combine(self, n_new: int, batch_mean: float, batch_m2: float) -> None:
        n_old = self.present
        delta = batch_mean - self.mean
        self.m2 += batch_m2 + delta**2 * n_old * n_new / (n_old + n_new)
        self.mean += delta * n_new / (n_old + n_new)

    def merge(self, other: NumericCounts) -> None:
        """Add the tally of another part of the same batch (same edges): counts are sums."""
        if other.present:
            self._combine(other.present, other.mean, other.m2)  # before the counts move
        self.counts += other.counts
        self.missing += other.missing


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

    def merge(self, other: LevelCounts) -> None:
        """Add the tally of another part of the same batch: counts are sums."""
        self.counts += other.counts
        self.missing += other.missing
        self.unseen_other += other.unseen_other
        for level, count in other.unseen.items():
            if level in self.unseen or len(self.unseen) < MAX_UNSEEN_LEVELS:
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

    def merge(self, other: CurrentAccumulator) -> CurrentAccumulator:
        """Add what ``other`` (another part of the batch, against the same profile) tallied: bin,
        level and missing counts are sums, so statistics computed from them (PSI, chi², JS) equal
        one pass over all rows; moments merge exactly up to rounding. The samples (ks,
        wasserstein, the domain classifier) are the union's bottom-k: all rows up to
        ``sample_size``, beyond it a uniform sample of the same size (parts need distinct seeds)."""
        for name, counts in self.numeric.items():
            counts.merge(other.numeric[name])
        for name, levels in self.categorical.items():
            levels.merge(other.categorical[name])
        if self.score is not None and other.score is not None:
            self.score.merge(other.score)
            self._score_sample.merge(other._score_sample)
        self.score_rows += other.score_rows
        self._sample.merge(other._sample)
        self.rows += other.rows
        return self

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


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
