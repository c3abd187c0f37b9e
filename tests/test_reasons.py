"""Reason codes: both methods are additive; path attributions agree with SHAP on the leading feature."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np

from batchml.reasons import PathExplainer, shap_contributions, top_reasons


def model_and_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(4000, 6))
    X[:, 5] = rng.integers(0, 4, size=4000)  # a categorical, encoded as level index
    X[rng.random(X.shape) < 0.05] = np.nan
    logit = 1.5 * np.nan_to_num(X[:, 0]) - np.nan_to_num(X[:, 1]) + (X[:, 5] == 2) * 1.2
    y = (rng.random(4000) < 1 / (1 + np.exp(-logit))).astype(float)
    booster = lgb.train({"objective": "binary", "verbosity": -1, "num_leaves": 15, "num_threads": 1},
                        lgb.Dataset(X, y, categorical_feature=[5]), 60)
    return booster, X


def test_path_contributions_add_up_to_the_raw_score():
    booster, X = model_and_data()
    explainer = PathExplainer.from_booster(booster)
    contributions = explainer.contributions(booster, X[:500])
    raw = booster.predict(X[:500], raw_score=True)
    assert np.max(np.abs(explainer.bias + contributions.sum(axis=1) - raw)) < 1e-9


def test_path_and_shap_mostly_agree_on_the_top_feature():
    booster, X = model_and_data(1)
    path = PathExplainer.from_booster(booster).contributions(booster, X[:1000])
    shap = shap_contributions(booster, X[:1000])
    agreement = np.mean(path.argmax(axis=1) == shap.argmax(axis=1))
    assert agreement > 0.8, agreement


def test_top_reasons_are_positive_first_and_null_outside_the_chosen_rows():
    contributions = np.array([[0.1, 0.5, -0.2], [0.3, -0.1, 0.2], [0.0, 0.0, 0.9]])
    rows = np.array([0, 2])
    reasons = top_reasons(contributions[rows], ["a", "b", "c"], rows, 3, 2).to_pylist()
    assert reasons[0] == [{"feature": "b", "contribution": 0.5}, {"feature": "a", "contribution": 0.1}]
    assert reasons[1] is None
    assert reasons[2][0] == {"feature": "c", "contribution": 0.9}
