"""Errors a user can cause, each mapped to one line and one exit code.

    BatchMLError                 exit 1  a run failed
    ├── ConfigError              exit 2  bad YAML, unknown key, wrong type, bad usage
    ├── DataError                exit 1  unreadable source, missing column
    │   └── RejectedError        exit 3  too many rows quarantined: batch rejected
    ├── WarehouseError           exit 1  DuckDB refused (locked, corrupt, ...)
    ├── ModelError               exit 1  missing or tampered artifact
    ├── NotifyError              (never fails a run; recorded in batchml.notifications)
    └── LockError                exit 75 another run of the job holds the lock

Third-party errors are translated where they enter (``raise WarehouseError(...) from exc``), so the
CLI only has to print ``str(error)``; every message names the thing involved and the next step.
"""

from __future__ import annotations


class BatchMLError(Exception):
    """Base of every error batchml raises on purpose."""

    exit_code = 1


class ConfigError(BatchMLError):
    """A config file, CLI argument or setting is wrong."""

    exit_code = 2


class DataError(BatchMLError):
    """The source data cannot be read or does not have the expected shape."""


class RejectedError(DataError):
    """Validation quarantined more rows than the job allows; nothing was scored."""

    exit_code = 3


class WarehouseError(BatchMLError):
    """DuckDB refused an operation (lock conflict, corrupt file, bad SQL)."""


class ModelError(BatchMLError):
    """A model artifact is missing, tampered with or cannot be loaded."""


class NotifyError(BatchMLError):
    """A report could not be delivered; recorded, never fatal for a run."""


class LockError(BatchMLError):
    """Another run of the same job is in progress."""

    exit_code = 75


def interrupted(exc: BaseException | None) -> bool:
    """Whether ``exc`` is Ctrl-C: Python's KeyboardInterrupt, or the error DuckDB raises instead when
    the signal lands inside a query (``RuntimeError: Query interrupted``), also when wrapped."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, RuntimeError) and str(exc) == "Query interrupted"):
            return True
        exc = exc.__cause__
    return False


def did_you_mean(name: str, known) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known`` to a misspelled ``name``, else ``""``."""
    from difflib import get_close_matches

    close = get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
