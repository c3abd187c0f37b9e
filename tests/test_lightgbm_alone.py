"""LightGBM imported without scikit-learn and pandas (``batchml.models.lightgbm_alone``): the same
models and predictions as with them, both still importable afterwards, and not done for a job that
trains on Dask (``lightgbm.dask`` needs the estimators)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from batchml.config import JobConfig
from conftest import job_config

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


def test_lightgbm_alone_trains_and_predicts_the_same() -> None:
    alone = _child("from batchml.models.lightgbm_alone import import_lightgbm_alone\nassert import_lightgbm_alone()")
    usual = _child("")
    assert alone["imported"] == [] and alone["flags"] == [False, False]
    assert usual["flags"] == [True, True]  # the usual import takes them when installed (the dev extras install them)
    assert max(abs(a - b) for a, b in zip(alone["scores"], usual["scores"])) <= 1e-12


@pytest.mark.parametrize("engine, hidden", [("local", True), ("dask", False)])
def test_only_jobs_that_train_locally_hide_them(engine: str, hidden: bool) -> None:
    config = JobConfig.model_validate(job_config(training={**job_config()["training"], "engine": engine}))
    code = ("import sys, json\nfrom batchml.config import JobConfig\nfrom batchml.models.lightgbm_alone import for_job\n"
            f"done = for_job(JobConfig.model_validate_json({config.model_dump_json()!r}))\n"
            "import lightgbm.compat\nprint(json.dumps([done, lightgbm.compat.SKLEARN_INSTALLED]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [hidden, not hidden]
