"""The rows compiled trees are checked on before a run trusts them, and a model's size.

:func:`verification_matrix` builds rows to compare a compiled library with LightGBM on: the model's
golden rows, the same with missing cells, then rows drawn from every split threshold (and its
nearest floats), every categorical level and the golden values. Reads the model's files; no IO
besides, no lleaves.
"""

from __future__ import annotations

import numpy as np

from batchml.models.registry import MODEL_FILE, LoadedModel, golden_matrix

VERIFY_ROWS = 2_000
NAN_SHARE = 0.1  # of the cells of the verification rows left missing


def total_leaves(model: LoadedModel) -> int:
    """Leaves over all trees, read from model.txt (cached on the model)."""
    if "total_leaves" not in model.cache:
        text = (model.path / MODEL_FILE).read_text()
        model.cache["total_leaves"] = sum(int(line[11:]) for line in text.splitlines() if line.startswith("num_leaves="))
    return model.cache["total_leaves"]


def _numeric_thresholds(model: LoadedModel) -> list[np.ndarray]:
    """Per feature, every numeric split threshold of the model (categorical splits are skipped)."""
    found: list[list[float]] = [[] for _ in model.spec.features]
    categorical = set(model.spec.categorical_indices)
    features: list[int] = []
    for line in (model.path / MODEL_FILE).read_text().splitlines():
        if line.startswith("split_feature="):
            features = [int(v) for v in line[14:].split()]
        elif line.startswith("threshold=") and features:
            for feature, value in zip(features, line[10:].split()):
                if feature not in categorical:
                    found[feature].append(float(value))
            features = []
    return [np.unique(np.asarray(values, dtype=np.float64)) for values in found]


def _pools(model: LoadedModel, golden: np.ndarray) -> list[np.ndarray]:
    """Values worth trying per feature: where the trees split, and what real rows hold."""
    pools = []
    for j, thresholds in enumerate(_numeric_thresholds(model)):
        if j in model.spec.categorical_indices:
            levels = len(model.spec.categories.get(model.spec.features[j], []))
            pool = np.arange(levels, dtype=np.float64)  # every level batchml can encode (unseen: NaN)
        else:
            edges = [thresholds, np.nextafter(thresholds, -np.inf), np.nextafter(thresholds, np.inf), [0.0]]
            pool = np.concatenate([*edges, golden[:, j]])
        pools.append(pool[~np.isnan(pool)])
    return pools


def verification_matrix(model: LoadedModel, rows: int = VERIFY_ROWS, seed: int = 0) -> np.ndarray:
    """``rows`` rows to compare compiled and LightGBM scores on (float64, model feature order).

    The golden set as stored, the golden set with ``NAN_SHARE`` of its cells missing, then rows
    whose every cell is drawn independently from that feature's split thresholds, their nearest
    floats on either side, 0, every categorical level and the golden values — with NaNs too.
    """
    rng = np.random.default_rng(seed)
    golden = golden_matrix(model)
    holed = golden.copy()
    holed[rng.random(holed.shape) < NAN_SHARE] = np.nan
    fixed = np.vstack([golden, holed])[:rows]
    mixed = np.column_stack([rng.choice(pool, rows - len(fixed)) if len(pool) else np.full(rows - len(fixed), np.nan)
                             for pool in _pools(model, golden)])
    mixed[rng.random(mixed.shape) < NAN_SHARE] = np.nan
    return np.ascontiguousarray(np.vstack([fixed, mixed]), dtype=np.float64)
