"""Progress bars on a terminal, nothing otherwise (cron and log shippers get plain log lines)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def interactive() -> bool:
    return sys.stderr.isatty()


def track(items: Iterable[T], *, total: float | None, description: str, weight=lambda item: 1) -> Iterator[T]:
    """Yield ``items``, advancing a rich progress bar by ``weight(item)`` when stderr is a terminal."""
    if not interactive():
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task, weight(item))
