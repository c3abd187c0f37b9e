"""What the log lines of a run are about — ``job``, ``run_id``, ``step`` — as fields of every record.

A run sets them once (:func:`fields`); :class:`ContextFilter` copies them onto each record its
handler sees, so ``--log-format json`` carries them without every call naming them. Counts go in
through ``extra=`` where they are logged (``rows_extracted``, ``rows_quarantined``, ``rows_scored``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

FIELDS = ("job", "run_id", "step", "rows_extracted", "rows_quarantined", "rows_scored", "model_version")
_current: ContextVar[dict] = ContextVar("batchml_log_fields", default={})


@contextmanager
def fields(**values) -> Iterator[None]:
    """Inside the block, every log record carries ``values`` (added to the fields already set)."""
    token = _current.set({**_current.get(), **values})
    try:
        yield
    finally:
        _current.reset(token)


class ContextFilter(logging.Filter):
    """Puts the current fields on a record, unless the call passed its own through ``extra=``."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _current.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def record_fields(record: logging.LogRecord) -> dict:
    """The fields of :data:`FIELDS` a record carries."""
    return {name: getattr(record, name) for name in FIELDS if getattr(record, name, None) is not None}
