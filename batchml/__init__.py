"""batchml: scheduled batch scoring with continuous training, in one embedded DuckDB warehouse.

The public API is what the ``batchml`` command calls, one function per command::

    import batchml

    run = batchml.run("vuln_risk", project="/srv/batchml")          # batchml run vuln_risk
    batchml.backfill("vuln_risk", "2026-10-01", "2026-10-31")        # batchml backfill ...
    batchml.replay("vuln_risk", "2026-11-01", "2026-11-07")          # ... --replay
    batchml.drift("vuln_risk")                                       # batchml drift
    batchml.list_models("vuln_risk"); batchml.promote("vuln_risk", 3, reason="...")
    batchml.rollback("vuln_risk", reason="..."); batchml.report("vuln_risk")
    batchml.check("vuln_risk")                                       # batchml check
    batchml.list_runs("vuln_risk"); batchml.show_run(run_id)         # batchml runs list / show

Each raises a :class:`BatchMLError` subclass on failure; its ``exit_code`` is the command's.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from batchml.errors import (
    BatchMLError,
    ConfigError,
    DataError,
    LockError,
    ModelError,
    NotifyError,
    RejectedError,
    WarehouseError,
)

__all__ = [
    "run", "backfill", "replay", "drift", "list_models", "promote", "rollback", "report", "history", "check", "list_runs", "show_run", "prune",
    "open_project", "cutoff", "Project",
    "BatchMLError", "ConfigError", "DataError", "RejectedError", "WarehouseError", "ModelError", "NotifyError", "LockError",
]

# The API loads on first use: importing the package (as the command does before it parses its
# arguments) imports no numpy, so ``batchml.cli`` can set how numpy's BLAS starts first. The
# functions (lower case) come from ``api``, ``Project`` from ``project``; the errors are here.
_LAZY = {name: "batchml.api" for name in __all__ if name.islower()} | {"Project": "batchml.project"}

if TYPE_CHECKING:
    from batchml.api import (backfill, check, cutoff, drift, history, list_models, list_runs, open_project, promote, prune,
                             replay, report, rollback, run, show_run)
    from batchml.project import Project


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'batchml' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
