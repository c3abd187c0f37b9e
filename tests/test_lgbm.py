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


LLEAVES = """
import json, sys, threading
import numpy as np
from batchml.models import compiled
{call}
imported = "pandas" in sys.modules
import lleaves, lightgbm as lgb
rng = np.random.default_rng(3)
x = rng.normal(size=(500, 4))
booster = lgb.train({{"objective": "binary", "verbose": -1, "num_threads": 1}}, lgb.Dataset(x, x[:, 0] > 0), 5)
booster.save_model("model.txt")
model = lleaves.Model(model_file="model.txt")
model.compile()
import pandas  # still importable by everything else
print(json.dumps({{"available": ok[0], "pandas": imported, "diff": float(np.abs(model.predict(x, n_jobs=1) - booster.predict(x)).max())}}))
"""


def test_lleaves_is_imported_without_pandas_from_the_main_thread_only(tmp_path) -> None:
    """The compiled engine's first import hides pandas (0.31 s of a start) in the main thread; from
    another thread, where a concurrent `import pandas` could see it hidden, it imports as usual."""
    results = {}
    for where, call in (("main", "ok = [compiled.available()]"),
                        ("thread", "ok = []\nt = threading.Thread(target=lambda: ok.append(compiled.available())); t.start(); t.join()")):
        done = subprocess.run([sys.executable, "-c", LLEAVES.format(call=call)], capture_output=True, text=True, timeout=120,
                              check=True, cwd=tmp_path)
        results[where] = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["main"]["available"] and results["main"]["pandas"] is False
    assert results["thread"]["available"] and results["thread"]["pandas"] is True  # the dev extras install pandas
    assert results["main"]["diff"] <= 1e-12 and results["thread"]["diff"] <= 1e-12
