"""Tests for batchml.evaluate: metrics against scikit-learn and plain loops, bootstrap, gate, CBPE."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as sk

from batchml.models import evaluate
from batchml.config import PromotionConfig
from batchml.models.evaluate import (
    METRICS,
    compute_metrics,
    decide,
    estimate_metrics,
    estimate_roc_auc,
    improvement,
    paired_bootstrap,
)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def holdout(seed: int, n: int = 2000, noise: float = 1.0, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Labels from a latent score and a model that sees the latent score plus noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    y = (rng.random(n) < sigmoid(2 * z - 1)).astype(int)
    p = sigmoid(2 * z + noise * rng.normal(size=n) - 1)
    if ties:  # two decimals: many tied scores; kept off 0 and 1 so log loss needs no clipping
        p = np.clip(np.round(p, 2), 0.01, 0.99)
    return y, p


def champion_and_challenger(seed: int, n: int = 3000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A holdout on which the challenger (less noise) is clearly better than the champion."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    y = (rng.random(n) < sigmoid(2 * z - 1)).astype(int)
    champion = sigmoid(2 * z + 2.0 * rng.normal(size=n) - 1)
    challenger = sigmoid(2 * z + 0.5 * rng.normal(size=n) - 1)
    return y, champion, challenger


def ece_loop(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for b in range(bins):
        last = b == bins - 1
        inside = [i for i in range(len(p)) if edges[b] <= p[i] < edges[b + 1] or (last and p[i] == 1.0)]
        if inside:
            gap = abs(sum(p[i] for i in inside) / len(inside) - sum(y[i] for i in inside) / len(inside))
            total += len(inside) / len(p) * gap
    return total


def ks_loop(y: np.ndarray, p: np.ndarray) -> float:
    positives, negatives = p[y == 1], p[y == 0]
    return max(abs(np.mean(positives <= t) - np.mean(negatives <= t)) for t in np.unique(p))


# --- metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_metrics_agree_with_sklearn(seed: int, ties: bool) -> None:
    y, p = holdout(seed, ties=ties)
    assert evaluate.roc_auc(y, p) == pytest.approx(sk.roc_auc_score(y, p), abs=1e-9)
    assert evaluate.average_precision(y, p) == pytest.approx(sk.average_precision_score(y, p), abs=1e-9)
    assert evaluate.log_loss(y, p) == pytest.approx(sk.log_loss(y, p), abs=1e-9)
    assert evaluate.brier(y, p) == pytest.approx(sk.brier_score_loss(y, p), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ties", [False, True])
def test_ece_and_ks_agree_with_loops(seed: int, ties: bool) -> None:
    y, p = holdout(seed, n=500, ties=ties)
    assert evaluate.ece(y, p) == pytest.approx(ece_loop(y, p), abs=1e-12)
    assert evaluate.ks(y, p) == pytest.approx(ks_loop(y, p), abs=1e-12)


def test_ece_counts_bin_edges_and_one() -> None:
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.0, 0.1, 0.5, 0.9, 1.0])
    assert evaluate.ece(y, p) == pytest.approx(ece_loop(y, p), abs=1e-12)


def test_all_tied_scores() -> None:
    y = np.array([0, 1, 0, 1, 1, 0, 0, 0])
    p = np.full(8, 0.3)
    assert evaluate.roc_auc(y, p) == pytest.approx(0.5)
    assert evaluate.average_precision(y, p) == pytest.approx(sk.average_precision_score(y, p))
    assert evaluate.ks(y, p) == 0.0


def test_compute_metrics_gives_each_metric_as_sklearn_and_the_loops_do() -> None:
    y, p = holdout(0, n=300)
    expected = {"roc_auc": sk.roc_auc_score(y, p), "average_precision": sk.average_precision_score(y, p),
                "log_loss": sk.log_loss(y, p), "brier": sk.brier_score_loss(y, p), "ks": ks_loop(y, p), "ece": ece_loop(y, p)}

    metrics = compute_metrics(y, p)

    assert set(metrics) >= set(expected)
    for name, value in expected.items():
        assert type(metrics[name]) is float and metrics[name] == pytest.approx(value, abs=1e-9), name


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_raises_for_ranking_metrics(label: int) -> None:
    y, p = np.full(50, label), np.linspace(0.1, 0.9, 50)
    for metric in (evaluate.roc_auc, evaluate.average_precision, evaluate.ks, compute_metrics):
        with pytest.raises(ValueError, match="needs both classes"):
            metric(y, p)
    # Metrics of calibration and fit stay defined on one class.
    assert evaluate.log_loss(y, p) > 0 and evaluate.brier(y, p) > 0 and evaluate.ece(y, p) > 0


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([0, 1, 1], [0.1, 0.2], "predictions have 2 rows"),
        ([0, 2], [0.1, 0.2], "0/1 labels"),
        ([0, 1], [0.1, np.nan], "within \\[0, 1\\]"),
        ([0, 1], [0.1, 1.2], "within \\[0, 1\\]"),
        ([], [], "non-empty"),
    ],
)
def test_bad_input_raises(y: list, p: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate.brier(y, p)


@pytest.mark.parametrize("metric", METRICS)
def test_counts_as_weights_equal_the_resampled_rows(metric: str) -> None:
    """The bootstrap's shortcut: weighting rows by draw counts is the metric of the resampled rows."""
    y, p = holdout(3, n=400, ties=True)
    rng = np.random.default_rng(0)
    draws = rng.integers(0, y.size, size=(3, y.size))
    counts = np.stack([np.bincount(d, minlength=y.size) for d in draws])
    weighted = evaluate._WEIGHTED[metric](p, counts * y, counts * (1 - y))
    direct = [getattr(evaluate, metric)(y[d], p[d]) for d in draws]
    np.testing.assert_allclose(weighted, direct, rtol=0, atol=1e-12)


def test_improvement_is_oriented_so_positive_is_better() -> None:
    assert improvement("roc_auc", 0.80, 0.82) == pytest.approx(0.02)
    assert improvement("log_loss", 0.40, 0.38) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="unknown metric"):
        improvement("accuracy", 0.1, 0.2)


# --- paired bootstrap ---------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_bootstrap_of_identical_predictions_is_zero(metric: str) -> None:
    y, p = holdout(0, n=500, ties=True)
    result = paired_bootstrap(y, p, p.copy(), metric, resamples=200)
    assert (result.diff, result.low, result.high) == (0.0, 0.0, 0.0)
    assert result.resamples == 200


@pytest.mark.parametrize("metric", ["roc_auc", "log_loss", "brier"])
def test_bootstrap_of_clearly_better_challenger_excludes_zero(metric: str) -> None:
    y, champion, challenger = champion_and_challenger(0)
    result = paired_bootstrap(y, champion, challenger, metric)
    assert 0 < result.low < result.diff < result.high
    worse = paired_bootstrap(y, challenger, champion, metric)
    assert worse.high < 0 and worse.diff == pytest.approx(-result.diff)


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    y, champion, challenger = champion_and_challenger(1, n=1000)
    first = paired_bootstrap(y, champion, challenger, "roc_auc", resamples=300, seed=7)
    assert paired_bootstrap(y, champion, challenger, "roc_auc", resamples=300, seed=7) == first
    assert paired_bootstrap(y, champion, challenger, "roc_auc", resamples=300, seed=8) != first


def test_bootstrap_skips_single_class_resamples() -> None:
    y = np.zeros(40, dtype=int)
    y[0] = 1  # a resample misses the one positive with chance (39/40)^40, about 36%
    p = np.linspace(0.05, 0.95, 40)
    result = paired_bootstrap(y, p, p[::-1], "roc_auc", resamples=500)
    assert 200 < result.resamples < 450
    with pytest.raises(ValueError, match="all 0"):
        paired_bootstrap(np.zeros(40, dtype=int), p, p, "roc_auc")


# --- the promotion gate -------------------------------------------------------------------------


def test_clearly_better_challenger_is_promoted() -> None:
    y, champion, challenger = champion_and_challenger(0)
    decision = decide(y, champion, challenger, PromotionConfig(), 1.0, 1.1)
    assert decision.outcome == "promoted", decision.reason
    assert all(decision.checks.values())
    assert set(decision.checks) == {"min_holdout_rows", "both_classes", "min_improvement", "significance", "guard_log_loss", "latency"}
    assert decision.reason.startswith("roc_auc improved by +0.")
    assert decision.latency_ratio == pytest.approx(1.1)


@pytest.mark.parametrize("seed", range(10))
def test_noise_is_never_promoted(seed: int) -> None:
    y, champion = holdout(seed, n=2000)
    rng = np.random.default_rng(100 + seed)
    challenger = np.clip(champion + rng.normal(0, 0.002, size=y.size), 0, 1)
    decision = decide(y, champion, challenger, PromotionConfig(), 1.0, 1.0, seed=seed)
    assert decision.outcome == "rejected"
    assert not decision.checks["min_improvement"]
    assert decision.reason.startswith("roc_auc improvement ") and "below min_improvement 0.002" in decision.reason


def test_guard_violation_rejects_and_names_the_guard() -> None:
    y, champion, better = champion_and_challenger(0)
    # Same ranking as the better model (so a higher AUC) but overconfident: log loss gets worse.
    overconfident = sigmoid(4 * np.log(better / (1 - better)))
    decision = decide(y, champion, overconfident, PromotionConfig(), 1.0, 1.0)
    assert decision.outcome == "rejected"
    assert decision.checks["min_improvement"] and decision.checks["significance"]
    assert not decision.checks["guard_log_loss"]
    assert decision.reason.startswith("guard log_loss worsened by ")
    assert "allowance 0.01" in decision.reason


def test_higher_is_better_guard_is_oriented() -> None:
    y, champion, challenger = champion_and_challenger(0)
    config = PromotionConfig(metric="log_loss", guard={"roc_auc": 0.0})
    # The challenger is better at both, so a zero allowance on AUC holds ...
    assert decide(y, champion, challenger, config, 1.0, 1.0).outcome == "promoted"
    # ... and swapping the models fails both the primary metric and the AUC guard; the first is named.
    swapped = decide(y, challenger, champion, config, 1.0, 1.0)
    assert swapped.outcome == "rejected" and not swapped.checks["guard_roc_auc"]
    assert swapped.reason.startswith("log_loss improvement -")


def test_slow_challenger_is_rejected() -> None:
    y, champion, challenger = champion_and_challenger(0)
    decision = decide(y, champion, challenger, PromotionConfig(), 1.0, 2.0)
    assert decision.outcome == "rejected"
    assert [name for name, passed in decision.checks.items() if not passed] == ["latency"]
    assert "2.00x" in decision.reason and "max_latency_ratio 1.5" in decision.reason


def test_a_latency_floor_lets_a_fast_challenger_pass_whatever_its_ratio() -> None:
    """20 trees against an early-stopped champion of 10: twice the time, but 4 µs a row."""
    y, champion, challenger = champion_and_challenger(0)
    by_default = decide(y, champion, challenger, PromotionConfig(), 0.01, 0.02, timed_rows=5_000)
    assert by_default.outcome == "rejected" and not by_default.checks["latency"]  # the contract: the ratio applies
    assert "(4.0 µs a row on one thread; promotion.latency_floor_us 0)" in by_default.reason
    floor = PromotionConfig(latency_floor_us=10)
    fast = decide(y, champion, challenger, floor, 0.01, 0.02, timed_rows=5_000)
    assert fast.outcome == "promoted" and fast.checks["latency"] and fast.latency_ratio == pytest.approx(2.0)
    slow = decide(y, champion, challenger, floor, 1.0, 2.0, timed_rows=5_000)  # 400 µs a row
    assert slow.outcome == "rejected" and not slow.checks["latency"]


def test_first_failing_condition_is_the_reason_but_all_are_checked() -> None:
    y, champion = holdout(0, n=1000)
    decision = decide(y, champion, champion, PromotionConfig(), 1.0, 3.0)
    assert decision.reason.startswith("roc_auc improvement +0.0000 is below min_improvement")
    assert decision.checks["latency"] is False and decision.checks["guard_log_loss"] is True


def test_significance_check_is_optional() -> None:
    y, champion, challenger = champion_and_challenger(0)
    decision = decide(y, champion, challenger, PromotionConfig(require_significance=False), 1.0, 1.0)
    assert decision.outcome == "promoted" and "significance" not in decision.checks


def test_too_few_rows_is_no_decision() -> None:
    y, champion, challenger = champion_and_challenger(0, n=150)
    decision = decide(y, champion, challenger, PromotionConfig(), 1.0, 1.0)
    assert decision.outcome == "no_decision"
    assert decision.reason.startswith("holdout has 150 rows < min_holdout_rows 200")
    assert decision.bootstrap is None and decision.checks == {"min_holdout_rows": False, "both_classes": True}
    assert set(decision.metrics_challenger) == set(METRICS)


def test_empty_holdout_is_no_decision() -> None:
    decision = decide(np.array([], dtype=int), [], [], PromotionConfig(), 0.0, 0.0)
    assert decision.outcome == "no_decision" and decision.latency_ratio is None
    assert decision.reason.startswith("holdout has 0 rows < min_holdout_rows 200")
    assert json.loads(json.dumps(decision.to_dict()))["latency_ratio"] is None


def test_untimed_champion_is_never_promoted() -> None:
    y, champion, challenger = champion_and_challenger(0)
    decision = decide(y, champion, challenger, PromotionConfig(), 0.0, 1.0)
    assert decision.outcome == "rejected" and decision.latency_ratio is None
    assert decision.reason.startswith("the champion's scoring time was 0 s")


def test_single_class_holdout_is_no_decision() -> None:
    p = np.linspace(0.01, 0.5, 300)
    decision = decide(np.zeros(300, dtype=int), p, p, PromotionConfig(), 1.0, 1.0)
    assert decision.outcome == "no_decision"
    assert "all 0" in decision.reason
    assert decision.metrics_champion == {} and decision.bootstrap is None


def test_decision_to_dict_is_json() -> None:
    y, champion, challenger = champion_and_challenger(0)
    for decision in (
        decide(y, champion, challenger, PromotionConfig(), 1.0, 1.0),
        decide(y[:100], champion[:100], challenger[:100], PromotionConfig(), 1.0, 1.0),
    ):
        loaded = json.loads(json.dumps(decision.to_dict()))
        assert loaded["outcome"] == decision.outcome and loaded["checks"] == decision.checks
    assert loaded["bootstrap"] is None


def test_bad_gate_input_raises() -> None:
    y, champion, challenger = champion_and_challenger(0, n=300)
    with pytest.raises(ValueError, match="unknown metrics \\['accuracy'\\]"):
        # the config model refuses such a guard already; decide() keeps its own check as a backstop
        decide(y, champion, challenger, PromotionConfig.model_construct(**{**PromotionConfig().__dict__, "guard": {"accuracy": 0.1}}), 1.0, 1.0)
    with pytest.raises(ValueError, match="scoring times must be finite and >= 0"):
        decide(y, champion, challenger, PromotionConfig(), -1.0, 1.0)
    with pytest.raises(ValueError, match="p_challenger has 299 rows"):
        decide(y, champion, challenger[1:], PromotionConfig(), 1.0, 1.0)


# --- confidence-based performance estimation ----------------------------------------------------


def calibrated(seed: int, n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = sigmoid(1.5 * rng.normal(size=n) - 1)
    return (rng.random(n) < p).astype(int), p


@pytest.mark.parametrize("seed", range(5))
def test_estimated_auc_matches_realised_auc_when_calibrated(seed: int) -> None:
    y, p = calibrated(seed)
    assert abs(estimate_roc_auc(p) - evaluate.roc_auc(y, p)) < 0.02


def test_estimated_metrics_match_realised_ones_when_calibrated() -> None:
    y, p = calibrated(0)
    estimated, realised = estimate_metrics(p), compute_metrics(y, p)
    assert set(estimated) == {"roc_auc", "average_precision", "ks", "log_loss", "brier", "positive_rate"}
    assert estimated["roc_auc"] == estimate_roc_auc(p)
    assert {metric: evaluate.estimate_metric(metric, p) for metric in estimated} == estimated  # one at a time: the same figures
    assert evaluate.estimate_metric("ece", p) is None  # calibration is the assumption: no estimate
    assert estimated["positive_rate"] == pytest.approx(y.mean(), abs=0.01)
    for metric in ("average_precision", "ks", "log_loss", "brier"):
        assert estimated[metric] == pytest.approx(realised[metric], abs=0.02), metric


def test_calibration_ok_separates_calibrated_from_skewed() -> None:
    y, p = calibrated(0)
    assert evaluate.calibration_ok(y, p)
    assert not evaluate.calibration_ok(y, p**2)


def test_estimates_need_uncertain_probabilities() -> None:
    with pytest.raises(ValueError, match="every p is 0"):
        estimate_roc_auc(np.zeros(10))
    with pytest.raises(ValueError, match="every p is 1"):
        estimate_metrics(np.ones(10))
