"""LightGBM, imported without the scikit-learn and pandas integrations batchml does not use
(:mod:`batchml.models.imports`): its core (``Booster``, ``Dataset``, ``train``) is all a run uses.

lightgbm.dask needs the estimators: :func:`with_estimators` imports lightgbm afresh, with them, for
``training.engine: dask`` (the modules that imported the core keep it; ``Booster`` objects of either
are the same library underneath). Dask workers import dask before any task, so they never hide.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from batchml.models.imports import INTEGRATIONS, without_integrations

lgb = without_integrations("lightgbm")


def with_estimators() -> ModuleType:
    """lightgbm with its scikit-learn estimators (``lightgbm.dask`` is built on them); imported
    afresh if this process imported the core without them."""
    current = sys.modules["lightgbm"]
    if current.compat.SKLEARN_INSTALLED and current.compat.PANDAS_INSTALLED:
        return current
    if any(importlib.util.find_spec(name) is None for name in INTEGRATIONS):
        return current  # not installed: lightgbm.dask says what it needs
    for name in [name for name in sys.modules if name == "lightgbm" or name.startswith("lightgbm.")]:
        del sys.modules[name]
    return importlib.import_module("lightgbm")
