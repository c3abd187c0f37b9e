"""LightGBM, imported without the scikit-learn and pandas integrations batchml does not use.

``import lightgbm`` imports scikit-learn (and with it scipy.stats) and pandas whenever they are
installed, for its scikit-learn estimators and DataFrame input: 1.8-1.9 s of every process start on
the 2-core machine, against 0.4 s for the core (``Booster``, ``Dataset``, ``train``), which is all a
run uses (numpy in, numpy out). So the first import hides both packages from lightgbm, unless the
process has imported one of them (or dask) already: then lightgbm is imported as usual. Nothing else
changes: scikit-learn and pandas import normally afterwards for anyone who asks.

lightgbm.dask needs the estimators: :func:`with_estimators` imports lightgbm afresh, with them, for
``training.engine: dask`` (the modules that imported the core keep it; ``Booster`` objects of either
are the same library underneath). Dask workers import dask before any task, so they never hide.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

_INTEGRATIONS = ("sklearn", "pandas")
_ALREADY_THERE = (*_INTEGRATIONS, "dask")


def _import_core() -> ModuleType:
    if "lightgbm" in sys.modules or any(name in sys.modules for name in _ALREADY_THERE):
        return importlib.import_module("lightgbm")
    try:
        for name in _INTEGRATIONS:
            sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError meanwhile
        return importlib.import_module("lightgbm")
    finally:
        for name in _INTEGRATIONS:
            del sys.modules[name]


lgb = _import_core()


def with_estimators() -> ModuleType:
    """lightgbm with its scikit-learn estimators (``lightgbm.dask`` is built on them); imported
    afresh if this process imported the core without them."""
    current = sys.modules["lightgbm"]
    if current.compat.SKLEARN_INSTALLED and current.compat.PANDAS_INSTALLED:
        return current
    if any(importlib.util.find_spec(name) is None for name in _INTEGRATIONS):
        return current  # not installed: lightgbm.dask says what it needs
    for name in [name for name in sys.modules if name == "lightgbm" or name.startswith("lightgbm.")]:
        del sys.modules[name]
    return importlib.import_module("lightgbm")
