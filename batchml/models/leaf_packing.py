"""Leaf indices as lleaves can compute them: several trees' leaves packed into one double.

Reason codes need the leaf each tree sends a row to (``Booster.predict(pred_leaf=True)``). lleaves
compiles scores, not leaves, so :func:`leaf_model_text` rewrites ``model.txt`` as a multiclass model
whose leaf values are bit fields (:class:`LeafPacking`); :mod:`batchml.models.compiled` compiles that
text as its ``leaves`` kind of library and unpacks what it returns. Pure text and numpy: no IO.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LeafPacking:
    """How the leaves library returns leaf indices: several trees' leaves in one double.

    lleaves computes a multiclass model by loading, adding and storing every class's sum for each
    row once per block of trees, so one class per tree (300 of them) cost 5x a scores predict.
    Instead each class sums ``fields`` trees whose leaf ``i`` is worth ``i << (bits * field)``:
    bit fields that never overlap, in integers below 2**53, which doubles add exactly. Tree ``t``
    is class ``t % classes`` (LightGBM's order) in field ``t // classes``; the model gains
    zero-valued copies of tree 0 up to a whole number of trees per class (lleaves requires it).
    """

    trees: int
    bits: int  # per leaf index: enough for the largest tree

    @classmethod
    def of_text(cls, text: str) -> LeafPacking:
        leaves = [int(line[11:]) for line in text.splitlines() if line.startswith("num_leaves=")]
        if not leaves:
            raise ValueError("model.txt holds no trees")
        return cls(len(leaves), max(1, (max(leaves) - 1).bit_length()))

    @property
    def classes(self) -> int:
        return -(-self.trees // (53 // self.bits))

    @property
    def fields(self) -> int:
        return -(-self.trees // self.classes)

    def shift(self, tree: int) -> int:
        return self.bits * (tree // self.classes)

    def pack(self, leaves: np.ndarray) -> np.ndarray:
        """(rows, trees) leaf indices -> (rows, classes) doubles, as the library computes them."""
        padded = np.zeros((len(leaves), self.fields * self.classes), dtype=np.int64)
        padded[:, : self.trees] = leaves
        shifts = np.arange(self.fields, dtype=np.int64)[None, :, None] * self.bits
        return (padded.reshape(len(leaves), self.fields, self.classes) << shifts).sum(axis=1).astype(np.float64)

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        """The library's (rows, classes) doubles -> (rows, trees) int32 leaf indices."""
        ints = packed.reshape(len(packed), self.classes).astype(np.int64)
        leaves = np.empty((len(packed), self.fields * self.classes), dtype=np.int32)
        for field in range(self.fields):  # field by field: 8x faster than one broadcast shift
            leaves[:, field * self.classes:(field + 1) * self.classes] = ints & ((1 << self.bits) - 1)
            ints >>= self.bits
        return leaves[:, : self.trees]


def leaf_model_text(text: str) -> str:
    """``model.txt`` rewritten so that lleaves computes packed leaf indices (:class:`LeafPacking`)
    instead of scores: a multiclass model, compiled to raw scores, whose leaf values are bit
    fields. ``average_output`` (random forests) would divide the sums: dropped.
    """
    packing = LeafPacking.of_text(text)
    blocks = text.split("\n\n")
    first = next(i for i, block in enumerate(blocks) if block.lstrip("\n").startswith("Tree="))
    last = first + packing.trees
    head, trees, rest = blocks[first - 1], blocks[first:last], blocks[last:]
    if not all(block.lstrip("\n").startswith("Tree=") for block in trees) or not rest[0].lstrip("\n").startswith("end of trees"):
        raise ValueError("model.txt: unexpected layout of the tree blocks")
    for field, value in [("num_class", packing.classes), ("num_tree_per_iteration", packing.classes),
                         ("objective", f"multiclass num_class:{packing.classes}")]:
        head, found = re.subn(rf"^{field}=.*$", f"{field}={value}", head, flags=re.MULTILINE)
        if found != 1:
            raise ValueError(f"model.txt has {found} '{field}=' header lines, expected 1")
    head = re.sub(r"^average_output\s*\n", "", head, flags=re.MULTILINE)
    padding = [re.sub(r"^Tree=0$", f"Tree={t}", trees[0].lstrip("\n"), flags=re.MULTILINE)
               for t in range(packing.trees, packing.fields * packing.classes)]
    trees = [_leaf_values(block, packing.shift(t)) for t, block in enumerate(trees)]
    trees += [_leaf_values(block, None) for block in padding]
    return "\n\n".join([*blocks[: first - 1], head, *trees, *rest])


def _leaf_values(block: str, shift: int | None) -> str:
    """A tree block whose leaf ``i`` is worth ``i << shift`` (``None``: 0)."""
    def values(match: re.Match) -> str:
        n = len(match[1].split())
        return "leaf_value=" + " ".join(str(0 if shift is None else i << shift) for i in range(n))
    return re.sub(r"^leaf_value=(.*)$", values, block, count=1, flags=re.MULTILINE)
