"""LightGBM imported without its scikit-learn and pandas wrappers, in processes that do not need them.

``import lightgbm`` imports scikit-learn (and with it scipy.stats) and pandas whenever they are
installed, for its sklearn-style and Dask estimators: 1.3-1.7 s of a 1.6-2.0 s import on the
benchmark machine, against 0.33-0.47 s without them, paid by every ``batchml run`` and ``batchml
backfill`` process before it reads a row. batchml trains with ``lgb.train``, predicts with
``Booster`` and passes numpy arrays, never DataFrames; only ``lightgbm.dask`` (``training.engine:
dask``) needs the estimators. So a run or backfill of a job that trains locally imports LightGBM
with the two hidden from it: LightGBM's ``compat`` then takes them as not installed, and both stay
importable by everything else afterwards.
"""

from __future__ import annotations

import sys

from batchml.config import JobConfig

HIDDEN = ("sklearn", "pandas")


def import_lightgbm_alone() -> bool:
    """Import lightgbm with scikit-learn and pandas hidden from it; False (nothing done) when it, or
    one of them, is imported already: what is in the process stays as it is."""
    if "lightgbm" in sys.modules or any(name in sys.modules for name in HIDDEN):
        return False
    for name in HIDDEN:
        sys.modules[name] = None  # `import sklearn` raises ImportError, which lightgbm's compat catches
    try:
        import lightgbm  # noqa: F401
    finally:
        for name in HIDDEN:
            sys.modules.pop(name, None)
    return True


def for_job(config: JobConfig) -> bool:
    """Before a run or backfill of ``config``'s job: LightGBM alone unless the job trains on Dask."""
    return config.training.engine != "dask" and import_lightgbm_alone()
