"""LightGBM's core imported without scikit-learn and pandas (``batchml.models.lgbm``): the same
models and predictions as with them, and both still importable afterwards. That lightgbm.dask gets
them back is tested in tests/test_cluster_training.py."""

from __future__ import annotations

import json
import subprocess
import sys

TRAIN_AND_PREDICT = """
import json, sys
{before}
import numpy as np, lightgbm as lgb
rng = np.random.default_rng(7)
x = rng.normal(size=(2000, 5)); x[rng.random((2000, 5)) < 0.05] = np.nan
y = (x[:, 0] + rng.normal(size=2000) > 0).astype(float)
booster = lgb.train({{"objective": "binary", "verbose": -1, "num_threads": 1, "deterministic": True}}, lgb.Dataset(x, y), 20)
hidden = [name for name in ("sklearn", "pandas") if name in sys.modules]
import lightgbm.compat
flags = [lightgbm.compat.SKLEARN_INSTALLED, lightgbm.compat.PANDAS_INSTALLED]
import sklearn, pandas  # still importable by everything else
print(json.dumps({{"scores": booster.predict(x).tolist(), "imported": hidden, "flags": flags}}))
"""


def _child(before: str) -> dict:
    result = subprocess.run([sys.executable, "-c", TRAIN_AND_PREDICT.format(before=before)], capture_output=True, text=True,
                            timeout=120, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_lightgbm_core_trains_and_predicts_as_the_usual_import() -> None:
    alone = _child("import batchml.models.lgbm")
    usual = _child("")
    assert alone["imported"] == [] and alone["flags"] == [False, False]
    assert usual["flags"] == [True, True]  # the usual import takes them when installed (the dev extras install them)
    assert max(abs(a - b) for a, b in zip(alone["scores"], usual["scores"])) <= 1e-12
