"""Third-party packages imported without the pandas and scikit-learn integrations batchml does not use.

``import lightgbm`` imports scikit-learn (and with it scipy.stats) and pandas whenever they are
installed, for its estimators and DataFrame input; ``import lleaves`` imports pandas for DataFrame
input. batchml hands both numpy arrays only. Hiding the integrations while such a package is first
imported saves 1.8-1.9 s of a process start for lightgbm (0.4 s for its core) and 0.31 s for lleaves
(0.16 s without pandas) on the 2-core machine. Nothing else changes: the packages import normally
afterwards for anyone who asks.
"""

from __future__ import annotations

import importlib
import sys
import threading
from types import ModuleType

INTEGRATIONS = ("sklearn", "pandas")


def without_integrations(name: str, hidden: tuple[str, ...] = INTEGRATIONS) -> ModuleType:
    """Module ``name``, imported with ``hidden`` unimportable meanwhile, unless the process imported
    one of them (or dask, which brings them) already: then as usual. Hidden only in the main
    thread: another thread importing one of them meanwhile would get an ImportError."""
    if (name in sys.modules or any(h in sys.modules for h in (*hidden, "dask"))
            or threading.current_thread() is not threading.main_thread()):
        return importlib.import_module(name)
    try:
        for h in hidden:
            sys.modules[h] = None  # type: ignore[assignment]  # `import h` raises ImportError meanwhile
        return importlib.import_module(name)
    finally:
        for h in hidden:
            del sys.modules[h]
