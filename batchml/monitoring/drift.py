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
profile and a seeded bottom-k reservoir of ``CURRENT_SAMPLE_SIZE`` current rows (sampled only when a
method reads it: :func:`current_sample_size`), so a KS p-value
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from batchml.config import DriftConfig
from batchml.monitoring.profiles import (
    CURRENT_SAMPLE_SIZE,
    REFERENCE_SAMPLE_SIZE,  # noqa: F401 (re-exported, as above)
    SCORE_FEATURE,
    CategoricalProfile,
    CurrentAccumulator,
    LevelCounts,
    NumericCounts,
    NumericProfile,
    ReferenceProfile,
    _check_names,
    build_profile,
)
from batchml.monitoring.statistics import (
    PSI_EPS,  # noqa: F401 (re-exported, as above)
    chi2_two_sample,
    domain_classifier_auc,
    jensen_shannon,
    ks_2sample,
    psi,
    wasserstein_normed,
)

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

UNSEEN_SHARE_THRESHOLD = 0.05
MISSING_RATE_THRESHOLD = 0.1
DOMAIN_AUC_THRESHOLD = 0.55
MULTIVARIATE_FEATURE = "__multivariate__"
MISSING_LABEL = "(missing)"
UNSEEN_LABEL = "(unseen)"


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
        row["histogram"] = None if self.histogram is None else json.dumps(
            {**self.histogram, "labels": [stored_label(label) for label in self.histogram["labels"]]})
        return {key: row[key] for key in ROW_COLUMNS}


# A level name is stored with every run's drift rows: a 10 MB category value (a stack trace in a
# "category" column) must not be copied into batchml.drift night after night
MAX_LABEL_CHARS = 200


def stored_label(label: str) -> str:
    """``label`` as stored in ``batchml.monitoring.drift.histogram``: cut to ``MAX_LABEL_CHARS`` with a marker saying how much was cut."""
    label = str(label)
    if len(label) <= MAX_LABEL_CHARS:
        return label
    return f"{label[:MAX_LABEL_CHARS]}…(+{len(label) - MAX_LABEL_CHARS} chars)"


ROW_COLUMNS = ("feature", "method", "kind", "statistic", "p_value", "threshold", "drifted", "n_reference", "n_current", "error", "histogram")


@dataclass
class DriftReport:
    """All drift rows of one run, and whether they add up to dataset drift."""

    results: list[DriftResult]
    dataset_drift_share: float = 0.3
    too_few_rows: bool = False  # the current side is below drift.min_rows: measured and stored, never flagged

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
        return not self.too_few_rows and self.feature_count > 0 and self.drifted_count / self.feature_count >= self.dataset_drift_share

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


def current_sample_size(config: DriftConfig) -> int:
    """How many current rows a :class:`CurrentAccumulator` should sample for ``config``: only ks,
    wasserstein and the domain classifier read the sample; psi, jensen_shannon and chi2 (the
    default suite) compare bin counts. Not sampling spares the default night 0.33 CPU-s over 2M
    rows of 31 numeric features (the results are the same: nothing read the sample)."""
    return CURRENT_SAMPLE_SIZE if _METHODS[config.numeric_method].on_sample or config.multivariate else 0


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
    too_few = max(current.rows, current.score_rows) < config.min_rows
    if too_few:  # on a handful of rows every statistic is noise: keep the figures, flag nothing
        results = [replace(result, drifted=False) for result in results]
    return DriftReport(results, config.dataset_drift_share, too_few)


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

