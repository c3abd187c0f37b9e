"""Reason codes: which features pushed a score up.

Two ways to split a score (in log-odds) into per-feature contributions, both exactly additive
(``bias + sum(contributions) == raw score``):

- ``shap``: LightGBM's ``pred_contrib`` (TreeSHAP). Measured here: 100-150x the cost of a plain
  predict (5,000 rows x 100 trees: 2.0-3.6 s vs 0.02 s), so it is only affordable on few rows.
- ``path`` (default): tree-path attributions (Saabas, as ``treeinterpreter`` does): along the path a
  row takes through each tree, the change in node value is credited to the split feature. It needs
  the leaf each tree sends a row to (:func:`leaf_indices`, LightGBM's ``pred_leaf``, or a compiled
  leaves library, see ``compiled``) and then sums one table row per tree, as one sparse product.
  It can favour features split near the root, where SHAP averages over orderings; for "top 3
  reasons" the two agree on the leading feature for most rows (see tests/test_reasons.py).

Measured on 74,000 rows of a 300-tree x 63-leaf, 35-feature model, on one thread (batchml's choice
below 100,000 rows): ``pred_leaf`` 0.9 s (as much as a plain predict), the packed compiled leaves
library 0.06-0.09 s + 0.05 s to unpack; summing the tables as one sparse product 0.3-0.45 s, where
a loop over the trees takes 1.0-1.2 s. In all: ~0.5 s with compiled leaves, 1.2-1.3 s with
``pred_leaf`` (``pred_leaf`` and the loop: 1.9-2.1 s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pyarrow as pa

from batchml.config import thread_count

REASON_TYPE = pa.list_(pa.struct([("feature", pa.string()), ("contribution", pa.float64())]))
# Cells (rows x trees) per sparse product: bounds the temporary index arrays (~50 MB) whatever the batch size.
CHUNK_CELLS = 4_000_000


def leaf_indices(booster: lgb.Booster, matrix: np.ndarray) -> np.ndarray:
    """Per row, the leaf each tree sends it to: LightGBM's ``pred_leaf``, (rows, trees) int32."""
    leaves = booster.predict(matrix, pred_leaf=True, num_threads=thread_count(len(matrix)))
    return np.asarray(leaves).reshape(len(matrix), -1)


@dataclass
class PathExplainer:
    """For every leaf of every tree, the contributions along the path to it.

    ``table`` stacks the trees' (leaves x features) tables; tree ``t``'s leaf ``i`` is row
    ``offsets[t] + i``. A row's contributions are the sum of its leaves' rows.
    """

    table: np.ndarray
    offsets: np.ndarray
    bias: float

    @classmethod
    def from_booster(cls, booster: lgb.Booster) -> PathExplainer:
        n_features = booster.num_feature()
        tables, bias = [], 0.0
        for tree in booster.dump_model()["tree_info"]:
            table = np.zeros((max(tree["num_leaves"], 1), n_features))
            root = tree["tree_structure"]
            bias += _value(root)
            _walk(root, np.zeros(n_features), table)
            tables.append(table)
        sizes = [len(table) for table in tables]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
        return cls(np.vstack(tables) if tables else np.zeros((0, n_features)), offsets, bias)

    def save(self, path: Path) -> None:
        """Write the tables as ``.npz`` (plain arrays, no pickle), atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(temp, "wb") as out:
            np.savez(out, table=self.table, offsets=self.offsets, bias=np.array([self.bias]))
        os.replace(temp, path)

    @classmethod
    def load(cls, path: Path) -> PathExplainer:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["table"], data["offsets"], float(data["bias"][0]))

    def explains(self, booster: lgb.Booster, matrix: np.ndarray, tolerance: float = 1e-9) -> bool:
        """Whether these tables fit ``booster``: shapes match and, on ``matrix``, bias + contributions
        give LightGBM's raw scores (path attributions are exactly additive)."""
        if self.table.shape[1] != booster.num_feature() or len(self.offsets) != booster.num_trees():
            return False
        if len(matrix) == 0:
            return True
        try:
            contributions = self.contributions(leaf_indices(booster, matrix))
        except ValueError:
            return False
        raw = booster.predict(matrix, raw_score=True, num_threads=1)
        return bool(np.max(np.abs(self.bias + contributions.sum(axis=1) - raw)) <= tolerance)

    def contributions(self, leaves: np.ndarray) -> np.ndarray:
        """(rows, features) contributions for the (rows, trees) leaf indices of :func:`leaf_indices`.

        >>> explainer.contributions(leaf_indices(booster, matrix))   # doctest: +SKIP
        """
        # imported on use (0.2-0.5 s), as the drift statistics do
        from scipy import sparse

        rows, trees = leaves.shape
        if trees != len(self.offsets):
            raise ValueError(f"leaf indices for {trees} trees given to an explainer of {len(self.offsets)} trees")
        out = np.zeros((rows, self.table.shape[1]))
        if trees == 0:
            return out
        step = max(1, CHUNK_CELLS // trees)
        for start in range(0, rows, step):
            # one 1 per (row, tree) at the row of table holding that tree's leaf: indicator @ table sums them
            columns = (leaves[start:start + step] + self.offsets).astype(np.int32, copy=False).ravel()
            if columns.min() < 0 or columns.max() >= len(self.table):  # scipy would read past the table
                raise ValueError(f"leaf index out of range for a model of {len(self.table)} leaves")
            indicator = sparse.csr_matrix((np.ones(len(columns)), columns, np.arange(0, len(columns) + 1, trees)),
                                          shape=(len(columns) // trees, len(self.table)))
            out[start:start + step] = indicator @ self.table
        return out


def _is_leaf(node: dict) -> bool:
    return "split_feature" not in node  # a one-leaf tree's root has neither a split nor a leaf_index


def _value(node: dict) -> float:
    return float(node["leaf_value"] if _is_leaf(node) else node["internal_value"])


def _walk(node: dict, path: np.ndarray, table: np.ndarray) -> None:
    # iterative walk: trees can be deep, recursion limits are not worth the risk
    stack = [(node, path)]
    while stack:
        current, acc = stack.pop()
        if _is_leaf(current):
            table[current.get("leaf_index", 0)] = acc
            continue
        parent = _value(current)
        for side in ("left_child", "right_child"):
            child = current[side]
            step = acc.copy()
            step[current["split_feature"]] += _value(child) - parent
            stack.append((child, step))


def shap_contributions(booster: lgb.Booster, matrix: np.ndarray) -> np.ndarray:
    """TreeSHAP contributions (without the bias column)."""
    return booster.predict(matrix, pred_contrib=True, num_threads=thread_count(len(matrix)))[:, :-1]


def top_reasons(contributions: np.ndarray, features: list[str], rows: np.ndarray, n: int, k: int) -> pa.Array:
    """A list of the top-``k`` positive-first contributions for ``rows`` of an ``n``-row batch; null elsewhere."""
    if k == 0 or len(rows) == 0:
        return pa.nulls(n, REASON_TYPE)
    k = min(k, contributions.shape[1])
    top = np.argsort(-contributions, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(contributions, top, axis=1)
    names = np.asarray(features, dtype=object)[top]
    structs = pa.StructArray.from_arrays([pa.array(names.ravel(), pa.string()), pa.array(values.ravel())], ["feature", "contribution"])
    counts = np.zeros(n, dtype=np.int32)
    counts[rows] = k
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    wanted = np.zeros(n, dtype=bool)
    wanted[rows] = True
    return pa.ListArray.from_arrays(pa.array(offsets), structs, mask=pa.array(~wanted))
