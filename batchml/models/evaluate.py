"""Model evaluation: metrics, the paired bootstrap, the promotion gate and label-free estimates.

Pure statistics on numpy arrays: no IO, no DuckDB. ``y`` is a 0/1 label array, ``p`` the
probability of the positive class; both one-dimensional and of the same length.

One implementation, three uses. Every metric is computed from per-row *positive and negative
weights* instead of labels, for a batch of weightings at once (arrays of shape ``(B, n)``):

* realised metrics weigh row i as ``(y_i, 1 - y_i)``;
* a bootstrap resample weighs it as ``(c_i * y_i, c_i * (1 - y_i))``, ``c_i`` being how often the
  row was drawn, so 1000 resamples are a few matrix operations rather than 1000 re-sorts;
* confidence-based performance estimation (CBPE) weighs it as ``(p_i, 1 - p_i)``: the expected
  confusion counts if the probabilities are calibrated.

Labels and bootstrap counts stay integers, so their sums are exact and numpy's integer cumsum is
several times faster than the float one.

Degenerate input: ``roc_auc``, ``average_precision`` and ``ks`` are undefined when ``y`` holds one
class only and raise ``ValueError`` saying so (so does :func:`compute_metrics`); ``log_loss``,
``brier`` and ``ece`` stay defined. No function returns NaN.

Example::

    >>> decision = decide(y, p_champion, p_challenger, PromotionConfig(), 1.2, 1.3)
    >>> decision.outcome, decision.reason
    ('rejected', 'roc_auc improvement +0.0011 is below min_improvement 0.002')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import numpy as np

from batchml.config import PromotionConfig

__all__ = [
    "HIGHER_IS_BETTER",
    "METRICS",
    "BootstrapResult",
    "GateDecision",
    "average_precision",
    "brier",
    "calibration_ok",
    "compute_metrics",
    "decide",
    "ece",
    "estimate_metric",
    "estimate_metrics",
    "estimate_roc_auc",
    "improvement",
    "ks",
    "log_loss",
    "paired_bootstrap",
    "roc_auc",
    "undecided",
]

HIGHER_IS_BETTER = {
    "roc_auc": True,
    "average_precision": True,
    "ks": True,
    "log_loss": False,
    "brier": False,
    "ece": False,
}
METRICS = tuple(HIGHER_IS_BETTER)
# Metrics that compare positives with negatives: undefined when the labels hold one class.
TWO_CLASS_METRICS = frozenset({"roc_auc", "average_precision", "ks"})
LOG_LOSS_EPS = 1e-15
ECE_BINS = 10
# Bootstrap weightings are built in chunks of about this many cells, to bound memory (~16 MB).
_CHUNK_CELLS = 2_000_000

Weighted = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# --- input checks -------------------------------------------------------------------------------


def _probabilities(p: object, what: str = "p", allow_empty: bool = False) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or (p.size == 0 and not allow_empty):
        raise ValueError(f"{what} must be a non-empty one-dimensional array, got shape {p.shape}")
    if p.size and (not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1):
        raise ValueError(f"{what} must hold probabilities within [0, 1] (no NaN or inf)")
    return p


def _labels(y: object, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"y has shape {y.shape} but the predictions have {n} rows")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y must hold 0/1 labels only")
    return y.astype(np.int64)


def _labelled(y: object, p: object, what: str = "p", allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(y, p)``: int64 labels, float64 probabilities."""
    p = _probabilities(p, what, allow_empty)
    return _labels(y, p.size), p


def _paired(y: object, p_champion: object, p_challenger: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated ``(y, p_champion, p_challenger)`` scored on the same rows (an empty holdout is valid)."""
    y, p_champion = _labelled(y, p_champion, "p_champion", allow_empty=True)
    p_challenger = _probabilities(p_challenger, "p_challenger", allow_empty=True)
    if p_challenger.size != y.size:
        raise ValueError(f"p_challenger has {p_challenger.size} rows but p_champion has {y.size}")
    return y, p_champion, p_challenger


def _one_class(y: np.ndarray) -> str | None:
    """Why ``y`` cannot rank (a message), or None when it holds both classes."""
    positives = int(y.sum())
    if y.size == 0:
        return "there are no labels"
    if positives == 0:
        return f"the {y.size} labels are all 0 (no positives)"
    if positives == y.size:
        return f"the {y.size} labels are all 1 (no negatives)"
    return None


# --- weighted metrics: pos and neg have shape (B, n), one weighting per row; return shape (B,) ----


def _by_score(p: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight of each distinct score, highest score first: shape (B, groups).

    Tied rows are summed into one group, so a tie is one threshold: that is what gives tied
    positive/negative pairs half credit in the AUC, as average ranks do.
    """
    order = np.argsort(-p, kind="stable")
    ranked = p[order]
    pos, neg = np.take(pos, order, axis=1), np.take(neg, order, axis=1)
    if ranked.size > 1 and np.any(ranked[1:] == ranked[:-1]):  # summing singletons would only cost time
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        pos, neg = np.add.reduceat(pos, starts, axis=1), np.add.reduceat(neg, starts, axis=1)
    return pos, neg


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product of two (B, k) arrays."""
    return np.einsum("ij,ij->i", a, b)


def _roc_auc_w(p: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    pos, neg = _by_score(p, pos, neg)
    # Mann-Whitney: a negative is beaten by every positive scored higher and by half of those tied
    # with it; cumsum counts the tied ones (same group) in full, so half of them is taken back.
    beaten = _dot(neg, np.cumsum(pos, axis=1)) - _dot(neg, pos) / 2
    return beaten / (pos.sum(axis=1) * neg.sum(axis=1))


def _average_precision_w(p: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    pos, neg = _by_score(p, pos, neg)
    tps = np.cumsum(pos, axis=1)
    predicted = tps + np.cumsum(neg, axis=1)
    precision = np.divide(tps, predicted, out=np.zeros(tps.shape), where=predicted > 0)
    # sklearn's definition: sum over thresholds of (recall gained) * (precision there).
    return _dot(pos, precision) / tps[:, -1]


def _ks_w(p: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    pos, neg = _by_score(p, pos, neg)
    tpr = np.cumsum(pos, axis=1) / pos.sum(axis=1, keepdims=True)
    fpr = np.cumsum(neg, axis=1) / neg.sum(axis=1, keepdims=True)
    # Share of positives above a threshold minus that of negatives = the gap of their CDFs below it.
    return np.max(np.abs(tpr - fpr), axis=1)


def _log_loss_w(p: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    clipped = np.clip(p, LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
    total = pos @ np.log(clipped) + neg @ np.log1p(-clipped)
    return -total / (pos.sum(axis=1) + neg.sum(axis=1))


def _brier_w(p: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    return (pos @ (1 - p) ** 2 + neg @ p**2) / (pos.sum(axis=1) + neg.sum(axis=1))


def _ece_bins(p: np.ndarray) -> np.ndarray:
    """Indicator matrix (n, ECE_BINS) of equal-width bins on [0, 1]; 1.0 falls in the last bin."""
    edges = np.linspace(0, 1, ECE_BINS + 1)
    index = np.searchsorted(edges[1:-1], p, side="right")
    return np.eye(ECE_BINS)[index]


def _ece_w(p: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    bins = _ece_bins(p)
    weight = pos + neg
    # Per bin, count * |mean(p) - mean(y)| = |sum(p) - sum(y)|; dividing by n weighs bins by count.
    gap = np.abs((weight * p) @ bins - pos @ bins)
    return gap.sum(axis=1) / weight.sum(axis=1)


_WEIGHTED: dict[str, Weighted] = {
    "roc_auc": _roc_auc_w,
    "average_precision": _average_precision_w,
    "log_loss": _log_loss_w,
    "brier": _brier_w,
    "ece": _ece_w,
    "ks": _ks_w,
}


def _metric_name(metric: str) -> str:
    if metric not in _WEIGHTED:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return metric


def _realised(metric: str, y: object, p: object) -> float:
    y, p = _labelled(y, p)
    problem = _one_class(y) if metric in TWO_CLASS_METRICS else None
    if problem:
        raise ValueError(f"{metric} needs both classes but {problem}")
    return float(_WEIGHTED[metric](p, y[None, :], 1 - y[None, :])[0])


# --- public metrics -----------------------------------------------------------------------------


def roc_auc(y: object, p: object) -> float:
    """Area under the ROC curve; tied scores get half credit (average ranks). Raises on one class."""
    return _realised("roc_auc", y, p)


def average_precision(y: object, p: object) -> float:
    """Average precision, as sklearn defines it: sum of (recall gained) x precision per threshold."""
    return _realised("average_precision", y, p)


def log_loss(y: object, p: object) -> float:
    """Mean negative log-likelihood, with p clipped to [1e-15, 1 - 1e-15]."""
    return _realised("log_loss", y, p)


def brier(y: object, p: object) -> float:
    """Mean squared difference between p and the 0/1 label."""
    return _realised("brier", y, p)


def ece(y: object, p: object) -> float:
    """Expected calibration error: |mean p - positive rate| over 10 equal-width bins, weighted by count."""
    return _realised("ece", y, p)


def ks(y: object, p: object) -> float:
    """Kolmogorov-Smirnov statistic: largest gap between the score CDFs of positives and negatives."""
    return _realised("ks", y, p)


def compute_metrics(y: object, p: object) -> dict[str, float]:
    """Every metric in :data:`METRICS`; raises ``ValueError`` if ``y`` holds one class only."""
    return {metric: _realised(metric, y, p) for metric in METRICS}


def improvement(metric: str, champion: float, challenger: float) -> float:
    """How much better the challenger's figure is, oriented so that positive means better.

    Works elementwise on arrays too. ``improvement("log_loss", 0.40, 0.38)`` is ``+0.02``.
    """
    delta = challenger - champion
    return delta if HIGHER_IS_BETTER[_metric_name(metric)] else -delta


# --- paired bootstrap ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    """Improvement of the challenger over the champion (positive = better) and its interval."""

    diff: float
    """Improvement on the full holdout."""
    low: float
    """Lower bound of the percentile interval."""
    high: float
    """Upper bound of the percentile interval."""
    resamples: int
    """Resamples used (those holding a single class are skipped)."""


def _resample_counts(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """How often each row is drawn, for ``size`` resamples of n rows with replacement: (size, n)."""
    draws = rng.integers(0, n, size=(size, n)) + n * np.arange(size)[:, None]
    return np.bincount(draws.ravel(), minlength=size * n).reshape(size, n)


def paired_bootstrap(
    y: object,
    p_champion: object,
    p_challenger: object,
    metric: str,
    resamples: int = 1000,
    seed: int = 42,
    confidence: float = 0.95,
) -> BootstrapResult:
    """Percentile interval of the challenger's improvement, both models scored on the same resamples.

    Pairing removes the variance the two models share (the same hard rows), so the interval is
    much narrower than comparing two independent intervals. Resamples with a single class are
    skipped; if every one is, ``ValueError`` is raised.
    """
    metric = _metric_name(metric)
    y, p_champion, p_challenger = _paired(y, p_champion, p_challenger)
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and resamples >= 1, got {confidence} and {resamples}")
    problem = _one_class(y)
    if problem:
        raise ValueError(f"cannot bootstrap {metric}: {problem}")
    diffs = _bootstrap_diffs(y, p_champion, p_challenger, metric, resamples, seed)
    if diffs.size == 0:
        raise ValueError(f"cannot bootstrap {metric}: every resample held a single class")
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    diff = _improvements(metric, p_champion, p_challenger, y[None, :], 1 - y[None, :])[0]
    return BootstrapResult(float(diff), float(low), float(high), int(diffs.size))


def _improvements(
    metric: str, p_champion: np.ndarray, p_challenger: np.ndarray, pos: np.ndarray, neg: np.ndarray
) -> np.ndarray:
    """Challenger's improvement under each weighting (row of pos/neg)."""
    fn = _WEIGHTED[metric]
    return improvement(metric, fn(p_champion, pos, neg), fn(p_challenger, pos, neg))


def _bootstrap_diffs(
    y: np.ndarray, p_champion: np.ndarray, p_challenger: np.ndarray, metric: str, resamples: int, seed: int
) -> np.ndarray:
    """Improvement on each resample holding both classes."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // y.size)
    diffs = []
    for start in range(0, resamples, chunk):
        counts = _resample_counts(rng, y.size, min(chunk, resamples - start))
        pos = counts * y
        neg = counts - pos
        both = (pos.sum(axis=1) > 0) & (neg.sum(axis=1) > 0)
        if not both.all():  # boolean indexing copies; the common case needs none
            pos, neg = pos[both], neg[both]
        diffs.append(_improvements(metric, p_champion, p_challenger, pos, neg))
    return np.concatenate(diffs)


# --- the promotion gate -------------------------------------------------------------------------

Outcome = Literal["promoted", "rejected", "no_decision"]


@dataclasses.dataclass(frozen=True)
class GateDecision:
    """Whether the challenger replaces the champion, and why."""

    outcome: Outcome
    """promoted | rejected | no_decision (holdout too small or single-class: the champion stays)."""
    reason: str
    """One sentence naming the deciding condition and its figures."""
    metric: str
    """The primary metric."""
    metrics_champion: dict[str, float]
    """Champion's metrics on the holdout (empty when the holdout holds one class)."""
    metrics_challenger: dict[str, float]
    """Challenger's metrics on the holdout (empty when the holdout holds one class)."""
    bootstrap: BootstrapResult | None
    """Paired bootstrap of the primary metric; None for no_decision."""
    latency_ratio: float | None
    """Challenger scoring work (or seconds) / champion's; None if the champion's was 0 (nothing timed)."""
    checks: dict[str, bool]
    """Every condition evaluated, in order, and whether it passed."""

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-able dict (for batchml.model_events and the report)."""
        return dataclasses.asdict(self)


def decide(
    y: object,
    p_champion: object,
    p_challenger: object,
    config: PromotionConfig,
    champion_seconds: float,
    challenger_seconds: float,
    seed: int = 42,
    timed_rows: int | None = None,
    work: tuple[float, float] | None = None,
    objective=None,
) -> GateDecision:
    """Compare champion and challenger on the same holdout and apply the promotion gate.

    Promotes only when every check passes: the primary metric improves by at least
    ``min_improvement``; with ``require_significance``, the bootstrap lower bound is above 0; no
    guard metric worsens by more than its allowance; the latency ratio is within
    ``max_latency_ratio`` (or, given ``timed_rows``, the challenger's time per row is under
    ``latency_floor_us``: an early-stopped champion of a few trees must not lock out every larger
    model over milliseconds). A holdout with fewer than ``min_holdout_rows`` rows or a single class
    gives ``no_decision``. The reason names the first failing check; all are in ``checks``.

    ``work`` (champion, challenger): a measure of the scoring work per row that does not depend on
    the machine's load (``retrain.scoring_work``); given, the latency ratio is its ratio and the
    seconds only give the time per row.
    """
    if objective is None:  # binary: the functions of this module
        from batchml.models.objectives import OBJECTIVES

        objective = OBJECTIVES["binary"]
    y, p_champion, p_challenger = objective.paired(y, p_champion, p_challenger)
    ratio = _latency_ratio(*work) if work is not None else _latency_ratio(champion_seconds, challenger_seconds)
    unknown = sorted(set(config.guard) - set(objective.metrics))
    if unknown:
        raise ValueError(f"promotion.guard names unknown metrics {unknown}; known: {', '.join(objective.metrics)}")

    undecided = _holdout_problem(y, config, objective)
    if undecided:
        checks, reason = undecided
        # Metrics are still worth reporting for a small holdout, but are undefined for a single class.
        both = checks[objective.check_name]
        champion = objective.compute_metrics(y, p_champion) if both else {}
        challenger = objective.compute_metrics(y, p_challenger) if both else {}
        return GateDecision("no_decision", reason, config.metric, champion, challenger, None, ratio, checks)
    champion, challenger = objective.compute_metrics(y, p_champion), objective.compute_metrics(y, p_challenger)
    boot = objective.paired_bootstrap(y, p_champion, p_challenger, config.metric, config.bootstrap_resamples, seed)
    per_row_us = challenger_seconds / timed_rows * 1e6 if timed_rows else None
    checks, failures = _gate_checks(config, champion, challenger, boot, ratio, per_row_us, objective)
    outcome: Outcome = "rejected" if failures else "promoted"
    reason = failures[0] if failures else _promotion_reason(config, boot, ratio)
    return GateDecision(outcome, reason, config.metric, champion, challenger, boot, ratio, checks)


def undecided(config: PromotionConfig, reason: str) -> GateDecision:
    """``no_decision`` without a comparison: the champion could not be scored on the holdout."""
    return GateDecision("no_decision", reason, config.metric, {}, {}, None, None, {"champion_scorable": False})


def _latency_ratio(champion_seconds: float, challenger_seconds: float) -> float | None:
    if not (np.isfinite(champion_seconds) and np.isfinite(challenger_seconds)) or min(champion_seconds, challenger_seconds) < 0:
        raise ValueError(f"scoring times must be finite and >= 0; got {champion_seconds} and {challenger_seconds}")
    # A zero champion time (an empty holdout timed nothing) has no ratio; the gate then fails on it.
    return float(challenger_seconds / champion_seconds) if champion_seconds > 0 else None


def _holdout_problem(y: np.ndarray, config: PromotionConfig, objective) -> tuple[dict[str, bool], str] | None:
    """Checks and reason when the holdout cannot decide anything, else None."""
    problem = objective.problem(y)
    checks = {"min_holdout_rows": y.size >= config.min_holdout_rows, objective.check_name: problem is None}
    if not checks["min_holdout_rows"]:
        return checks, f"holdout has {y.size} rows < min_holdout_rows {config.min_holdout_rows}; the champion stays"
    if problem:
        return checks, f"holdout cannot compare models: {problem}; the champion stays"
    return None


def _gate_checks(
    config: PromotionConfig,
    champion: dict[str, float],
    challenger: dict[str, float],
    boot: BootstrapResult,
    ratio: float | None,
    per_row_us: float | None = None,
    objective=None,
) -> tuple[dict[str, bool], list[str]]:
    """Every check (name -> passed) and the failure reasons, in the order the gate applies them."""
    metric = config.metric
    gate = [(
        "min_improvement",
        boot.diff >= config.min_improvement,
        f"{metric} improvement {boot.diff:+.4f} is below min_improvement {config.min_improvement:g}",
    )]
    if config.require_significance:
        gate.append((
            "significance",
            boot.low > 0,
            f"{metric} improvement {boot.diff:+.4f} is not significant: "
            f"bootstrap interval [{boot.low:+.4f}, {boot.high:+.4f}] reaches 0",
        ))
    for name, allowance in config.guard.items():
        worsening = -(objective.improvement if objective else improvement)(name, champion[name], challenger[name])
        gate.append((
            f"guard_{name}",
            worsening <= allowance,
            f"guard {name} worsened by {worsening:.4f} > allowance {allowance:g} "
            f"(champion {champion[name]:.4f}, challenger {challenger[name]:.4f})",
        ))
    gate.append(_latency_check(ratio, config, per_row_us))
    comparable = objective.check_name if objective else "both_classes"
    checks = {"min_holdout_rows": True, comparable: True} | {name: bool(passed) for name, passed, _ in gate}
    return checks, [failure for _, passed, failure in gate if not passed]


def _latency_check(ratio: float | None, config: PromotionConfig, per_row_us: float | None) -> tuple[str, bool, str]:
    if per_row_us is not None and per_row_us < config.latency_floor_us:
        return "latency", True, ""
    if ratio is None:
        return "latency", False, "the champion's scoring time was 0 s, so the latency ratio cannot be checked"
    reason = f"challenger scoring takes {ratio:.2f}x the champion's work > max_latency_ratio {config.max_latency_ratio:g}"
    if per_row_us is not None:  # the time itself: a few µs a row may not matter to the job, which latency_floor_us can say
        reason += f" ({per_row_us:.1f} µs a row on one thread; promotion.latency_floor_us {config.latency_floor_us:g})"
    return "latency", ratio <= config.max_latency_ratio, reason


def _promotion_reason(config: PromotionConfig, boot: BootstrapResult, ratio: float) -> str:
    return (
        f"{config.metric} improved by {boot.diff:+.4f} (bootstrap interval [{boot.low:+.4f}, {boot.high:+.4f}]) "
        f">= min_improvement {config.min_improvement:g}, guards held and latency ratio is "
        + (f"{ratio:.2f}" if ratio is not None else "n/a")
    )


# --- confidence-based performance estimation (no labels) ----------------------------------------


def estimate_metrics(p: object) -> dict[str, float]:
    """Expected metrics on rows whose labels have not arrived, as NannyML's CBPE estimates them.

    If the model is calibrated, row i is positive with probability p_i, so the expected confusion
    counts at any threshold are sums of p (true positives) and 1 - p (false positives) over the
    rows scored at or above it; the metrics follow from those expected counts. Returns
    ``roc_auc``, ``average_precision``, ``ks``, ``log_loss`` and ``brier`` (the expected
    p(1 - p)) estimates plus ``positive_rate`` (mean p). ECE is left out: calibration is the
    assumption, so its estimate would be 0 by construction.

    Reliability: the estimate is only as good as the calibration. Check it with
    :func:`calibration_ok` on the latest labelled holdout. It follows covariate shift (the model
    sees the new inputs), but it cannot see concept drift: when P(y | x) changes, the
    probabilities stop being calibrated and the estimate keeps reporting the old performance.
    """
    p = _probabilities(p)
    estimates = {metric: _expected(metric, p) for metric in METRICS if metric != "ece"}
    return {**estimates, "positive_rate": float(p.mean())}


def estimate_metric(metric: str, p: object) -> float | None:
    """One of :func:`estimate_metrics`' figures (None for ``ece``): a run estimates only the metric
    its gate uses, one ranking of the scores instead of three (0.03 s vs 0.1 s at 200,000 scores)."""
    if metric == "ece":
        return None
    p = _probabilities(p)
    return float(p.mean()) if metric == "positive_rate" else _expected(metric, p)


def estimate_roc_auc(p: object) -> float:
    """Expected ROC AUC from calibrated probabilities alone (see :func:`estimate_metrics`)."""
    return estimate_metric("roc_auc", p)


def _expected(metric: str, p: np.ndarray) -> float:
    if metric in TWO_CLASS_METRICS and (p.max() == 0 or p.min() == 1):
        raise ValueError(f"cannot estimate {metric}: every p is {p[0]:g}, so no row is expected to be of the other class")
    # Each row counts as p positive and 1 - p negative: the expected confusion counts.
    return float(_WEIGHTED[metric](p, p[None, :], 1 - p[None, :])[0])


def calibration_ok(y_holdout: object, p_holdout: object, max_ece: float = 0.05) -> bool:
    """Whether the probabilities are calibrated enough (ECE <= max_ece) to trust label-free estimates.

    ECE itself is noisy on a few hundred rows; use a holdout of at least a thousand where possible.
    """
    return ece(y_holdout, p_holdout) <= max_ece
