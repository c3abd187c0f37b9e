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

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from batchml.data.arrays import from_numpy, strings
from batchml.models.lgbm import lgb
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
    classes: int = 1  # multiclass: tree t adds to class t % classes (LightGBM's order)

    @classmethod
    def from_booster(cls, booster: lgb.Booster) -> PathExplainer:
        return cls.from_model_text(booster.model_to_string(), booster.num_feature(), booster.num_model_per_iteration())

    @classmethod
    def from_model_text(cls, text: str, n_features: int, classes: int = 1) -> PathExplainer:
        """The tables of a model in LightGBM's text format (``model.txt``, whose sha256 the registry
        checks: tables derived from it need no cache of their own that could be tampered with).

        Walks each tree from its root: moving to a child credits the change in node value to the
        split feature. 0.06 s for 300 trees x 63 leaves (``Booster.dump_model`` alone takes 0.3 s).
        """
        tables, bias = [], 0.0
        for block in text.split("\nTree=")[1:]:
            fields = dict(line.split("=", 1) for line in block.split("\n\n")[0].splitlines()[1:] if "=" in line)
            leaf_value = np.array(fields["leaf_value"].split(), dtype=np.float64)
            table = np.zeros((int(fields["num_leaves"]), n_features))
            if len(table) == 1:  # a one-leaf tree: a constant, no split to credit
                bias += leaf_value[0]
            else:
                bias += _walk(fields, leaf_value, table)
            tables.append(table)
        sizes = [len(table) for table in tables]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
        return cls(np.vstack(tables) if tables else np.zeros((0, n_features)), offsets, bias, classes)

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

    def contributions(self, leaves: np.ndarray, towards: np.ndarray | None = None) -> np.ndarray:
        """(rows, features) contributions for the (rows, trees) leaf indices of :func:`leaf_indices`;
        ``towards`` (multiclass): per row, the class whose trees are summed (its predicted class).

        >>> explainer.contributions(leaf_indices(booster, matrix))   # doctest: +SKIP
        """
        if towards is None or self.classes == 1:
            return self._summed(self.table, leaves)
        out = np.zeros((len(leaves), self.table.shape[1]))
        tree_of_row = np.repeat(np.arange(len(self.offsets)), np.diff(np.r_[self.offsets, len(self.table)]))
        for cls in np.unique(towards):  # the other classes' trees count as zero
            rows = towards == cls
            out[rows] = self._summed(self.table * (tree_of_row % self.classes == cls)[:, None], leaves[rows])
        return out

    def _summed(self, table: np.ndarray, leaves: np.ndarray) -> np.ndarray:
        """Per row, the sum of ``table``'s rows of its leaves."""
        # imported on use (0.2-0.5 s), as the drift statistics do
        from scipy import sparse

        rows, trees = leaves.shape
        if trees != len(self.offsets):
            raise ValueError(f"leaf indices for {trees} trees given to an explainer of {len(self.offsets)} trees")
        out = np.zeros((rows, table.shape[1]))
        if trees == 0:
            return out
        step = max(1, CHUNK_CELLS // trees)
        for start in range(0, rows, step):
            # one 1 per (row, tree) at the row of table holding that tree's leaf: indicator @ table sums them
            columns = (leaves[start:start + step] + self.offsets).astype(np.int32, copy=False).ravel()
            if columns.min() < 0 or columns.max() >= len(table):  # scipy would read past the table
                raise ValueError(f"leaf index out of range for a model of {len(table)} leaves")
            indicator = sparse.csr_matrix((np.ones(len(columns)), columns, np.arange(0, len(columns) + 1, trees)),
                                          shape=(len(columns) // trees, len(table)))
            out[start:start + step] = indicator @ table
        return out


def _walk(fields: dict[str, str], leaf_value: np.ndarray, table: np.ndarray) -> float:
    """Fill ``table`` (leaves x features) for one tree of ``model.txt``; returns its root value.
    Child ``c`` of an internal node is internal node ``c`` when ``c >= 0``, else leaf ``~c``."""
    feature = np.array(fields["split_feature"].split(), dtype=np.int64)
    left = np.array(fields["left_child"].split(), dtype=np.int64)
    right = np.array(fields["right_child"].split(), dtype=np.int64)
    internal = np.array(fields["internal_value"].split(), dtype=np.float64)
    stack = [(0, np.zeros(table.shape[1]))]  # iterative: trees can be deep, recursion limits are not worth the risk
    while stack:
        node, path = stack.pop()
        for child in (left[node], right[node]):
            step = path.copy()
            step[feature[node]] += (leaf_value[~child] if child < 0 else internal[child]) - internal[node]
            if child < 0:
                table[~child] = step
            else:
                stack.append((child, step))
    return float(internal[0])


def shap_contributions(booster: lgb.Booster, matrix: np.ndarray, towards: np.ndarray | None = None) -> np.ndarray:
    """TreeSHAP contributions (without the bias column); ``towards`` (multiclass): per row, the class
    whose block of LightGBM's per-class output (features + bias per class) is taken."""
    contributions = booster.predict(matrix, pred_contrib=True, num_threads=thread_count(len(matrix)))
    if towards is None:
        return contributions[:, :-1]
    blocks = np.asarray(contributions).reshape(len(matrix), -1, booster.num_feature() + 1)
    return blocks[np.arange(len(matrix)), towards, :-1]


def top_reasons(contributions: np.ndarray, features: list[str], rows: np.ndarray, n: int, k: int) -> pa.Array:
    """A list of the top-``k`` positive-first contributions for ``rows`` of an ``n``-row batch; null elsewhere."""
    if k == 0 or len(rows) == 0:
        return pa.nulls(n, REASON_TYPE)
    k = min(k, contributions.shape[1])
    top = _largest(contributions, k)
    values = np.take_along_axis(contributions, top, axis=1)
    names = pa.DictionaryArray.from_arrays(from_numpy(top.ravel().astype(np.int32)), strings(features)).dictionary_decode()
    structs = pa.StructArray.from_arrays([names, from_numpy(values.ravel())], ["feature", "contribution"])
    counts = np.zeros(n, dtype=np.int32)
    counts[rows] = k
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    wanted = np.zeros(n, dtype=bool)
    wanted[rows] = True
    return pa.ListArray.from_arrays(from_numpy(offsets), structs, mask=from_numpy(~wanted))


def _largest(contributions: np.ndarray, k: int) -> np.ndarray:
    """Per row, the columns of the ``k`` largest values, largest first and equal values in column
    order (as a stable descending sort ranks them): ``k`` argmax passes instead of sorting every
    row (74,000 rows x 35 features, k=3: 0.06 -> 0.03 s with the names built below)."""
    remaining = contributions.copy()
    top = np.empty((len(contributions), k), dtype=np.intp)
    every_row = np.arange(len(contributions))
    for j in range(k):  # argmax returns the first of equal values
        top[:, j] = np.argmax(remaining, axis=1)
        remaining[every_row, top[:, j]] = -np.inf
    return top
