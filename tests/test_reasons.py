"""Reason codes: both methods are additive; path attributions agree with SHAP on the leading feature.

Path contributions are one sparse product over every tree's table; they must equal the per-tree sum.
"""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest

from batchml.models import reasons
from batchml.models.reasons import PathExplainer, leaf_indices, shap_contributions, top_reasons


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
    contributions = explainer.contributions(leaf_indices(booster, X[:500]))
    raw = booster.predict(X[:500], raw_score=True)
    assert np.max(np.abs(explainer.bias + contributions.sum(axis=1) - raw)) < 1e-9


def test_the_sparse_product_equals_the_sum_over_trees_in_any_chunk_size(monkeypatch):
    booster, X = model_and_data()
    explainer = PathExplainer.from_booster(booster)
    leaves = leaf_indices(booster, X)
    by_tree = np.zeros((len(X), booster.num_feature()))
    for t, offset in enumerate(explainer.offsets):
        by_tree += explainer.table[offset + leaves[:, t]]

    assert leaves.shape == (len(X), booster.num_trees()) and len(explainer.offsets) == booster.num_trees()
    assert np.max(np.abs(explainer.contributions(leaves) - by_tree)) < 1e-12
    monkeypatch.setattr(reasons, "CHUNK_CELLS", 7 * booster.num_trees() + 3)  # 7 rows at a time, the last chunk short
    assert np.max(np.abs(explainer.contributions(leaves) - by_tree)) < 1e-12
    assert explainer.contributions(leaves[:0]).shape == (0, booster.num_feature())


def test_leaf_indices_out_of_range_are_refused():
    booster, X = model_and_data()
    explainer = PathExplainer.from_booster(booster)
    leaves = leaf_indices(booster, X[:10])
    with pytest.raises(ValueError, match="out of range"):
        explainer.contributions(leaves + len(explainer.table))
    with pytest.raises(ValueError, match="trees"):
        explainer.contributions(leaves[:, 1:])


def test_a_tree_without_splits_adds_to_the_bias_only():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 3))
    booster = lgb.train({"objective": "binary", "verbosity": -1, "min_data_in_leaf": 500, "num_threads": 1},
                        lgb.Dataset(X, (X[:, 0] > 0).astype(float)), 3)
    explainer = PathExplainer.from_booster(booster)
    contributions = explainer.contributions(leaf_indices(booster, X))
    assert not contributions.any() and explainer.bias == pytest.approx(booster.predict(X[:1], raw_score=True)[0])


def test_path_and_shap_mostly_agree_on_the_top_feature():
    booster, X = model_and_data(1)
    path = PathExplainer.from_booster(booster).contributions(leaf_indices(booster, X[:1000]))
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
