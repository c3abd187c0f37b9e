"""One run of a job at a time, with an OS file lock that dies with its process (kill -9 included)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from batchml.errors import LockError, file_error


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "unknown process"
    pid, _, started = text.partition(" ")
    return f"pid {pid}, started {started}" if pid else "unknown process"


@contextmanager
def job_lock(locks_dir: Path, job: str) -> Iterator[None]:
    """Hold ``<locks_dir>/<job>.lock`` for the duration; a second holder gets :class:`LockError`."""
    path = locks_dir / f"{job}.lock"
    try:
        locks_dir.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a link planted in a shared folder must not make the run truncate another file
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)  # the umask decides who may read it
    except OSError as exc:
        raise file_error(exc, "create the lock file") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockError(
                f"job {job} is already running ({_holder(path)}); wait for it to finish — "
                f"the lock frees itself when that process ends"
            ) from None
        started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        holder = f"{os.getpid()} {started}\n".encode()
        try:
            os.pwrite(fd, holder, 0)
            os.ftruncate(fd, len(holder))
        except OSError as exc:  # a full disk: the lock is held all the same, only its note is missing
            raise file_error(exc, f"write the lock file {path}") from exc
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
