"""Errors a user can cause, each mapped to one line and one exit code.

    BatchMLError                 exit 1  a run failed
    ├── ConfigError              exit 2  bad YAML, unknown key, wrong type, bad usage
    ├── DataError                exit 1  unreadable source, missing column
    │   └── RejectedError        exit 3  too many rows quarantined: batch rejected
    ├── WarehouseError           exit 1  DuckDB refused (locked, corrupt, ...)
    ├── ModelError               exit 1  missing or tampered artifact
    ├── ClusterError             exit 1  the Dask scheduler unreachable, a task failed
    ├── NotifyError              (never fails a run; recorded in batchml.notifications)
    ├── GateFailed               exit 4  ``batchml try``: the candidate would not pass the gate
    └── LockError                exit 75 another run of the job holds the lock

Third-party errors are translated where they enter (``raise WarehouseError(...) from exc``), so the
CLI only has to print ``str(error)``; every message names the thing involved and the next step.
"""

from __future__ import annotations

import errno
import re


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


class ClusterError(BatchMLError):
    """The Dask scheduler cannot be reached, or the cluster failed a task for good."""


class NotifyError(BatchMLError):
    """A report could not be delivered; recorded, never fatal for a run."""


class GateFailed(BatchMLError):
    """``batchml try``: the gate would keep the champion (the message names the failing condition)."""

    exit_code = 4


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


def os_errno(exc: OSError) -> int | None:
    """The errno of ``exc``; pyarrow's OSErrors carry it only in their text ("[errno 28] ...")."""
    if exc.errno is not None:
        return exc.errno
    found = re.search(r"\[errno (\d+)\]", str(exc), flags=re.IGNORECASE)
    return int(found[1]) if found else None


_FILE_FIXES = {
    errno.ENOSPC: "free space on that disk (or move the warehouse to one with room: --warehouse / BATCHML_WAREHOUSE), then rerun",
    errno.EDQUOT: "free space within the user's disk quota (or move the warehouse: --warehouse / BATCHML_WAREHOUSE), then rerun",
    errno.EACCES: "let the user running batchml write there (or move the warehouse: --warehouse / BATCHML_WAREHOUSE), then rerun",
    errno.EPERM: "let the user running batchml write there (or move the warehouse: --warehouse / BATCHML_WAREHOUSE), then rerun",
    errno.EROFS: "the file system is read-only: move the warehouse to a writable one (--warehouse / BATCHML_WAREHOUSE), then rerun",
    errno.ELOOP: "it is a symbolic link where batchml keeps a file of its own: remove the link, then rerun",
}


def file_error(exc: OSError, doing: str = "write") -> BatchMLError:
    """One line for a file the operating system refused: which file, why, and the fix.

    >>> str(file_error(PermissionError(13, "Permission denied", "/w/locks/toy.lock")))
    'cannot write /w/locks/toy.lock: Permission denied; let the user running batchml write there (...)'
    """
    code = os_errno(exc)
    where = f" {exc.filename}" if exc.filename else ""
    reason = exc.strerror or re.sub(r"^.*\[errno \d+\]\s*", "", str(exc), flags=re.IGNORECASE) or type(exc).__name__
    fix = _FILE_FIXES.get(code, "check the path, its permissions and the free space, then rerun")
    return BatchMLError(f"cannot {doing}{where}: {reason}; {fix}")


def did_you_mean(name: str, known) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known`` to a misspelled ``name``, else ``""``."""
    from difflib import get_close_matches

    close = get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
