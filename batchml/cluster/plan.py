"""Which files and row groups each Dask task reads: the night's share of each task, planned once.

The client lists the source's files (the same glob DuckDB would read), drops the hive folders that
``source.watermark_partition`` rules out, reads the footers' row-group statistics of the watermark
column and keeps only the row groups that can hold a row in ``[watermark_from, upper)``. What is
left is cut into one contiguous run of row groups per partition, balanced by row count, so each
task reads its own share of the night and nothing else (DuckDB skips the other row groups of a
file by ``file_row_number``).

Pruning here only spares reading: every task still applies the batch's own filter, so a row group
kept by mistake costs time, never a row. Statistics that cannot be trusted (no statistics, a
watermark that is not a plain TIMESTAMP in that file) keep the row group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime

from batchml.config import JobConfig
from batchml.data.extract import quote_source_column
from batchml.storage.source import row_group_watermarks, source_files
from batchml.storage.warehouse import quote_literal

PLAIN_TIMESTAMPS = ("TIMESTAMP", "TIMESTAMP_NS", "TIMESTAMP_MS", "TIMESTAMP_S")


@dataclass(frozen=True)
class Unit:
    """Rows ``[first, end)`` of one Parquet file: whole row groups."""

    file: str
    first: int
    end: int
    whole: bool  # every row of the file: no row-number filter needed
    groups: tuple[int, ...] = field(default=(), compare=False)  # its row groups' rows, in order: where a share may cut it

    @property
    def rows(self) -> int:
        return self.end - self.first


@dataclass(frozen=True)
class Bounds:
    """The watermarks a batch can hold, and whether its filter includes the hive folders' days."""

    lower: datetime | None
    upper: datetime
    hive_days: bool


def plan(con, config: JobConfig, location: str, bounds: Bounds) -> list[Unit]:
    """The row groups of ``location``'s files that can hold the batch, as units in file order."""
    files = source_files(con, location)
    if bounds.hive_days and config.source.watermark_partition:
        files = [f for f in files if _day_may_hold(f, config.source.watermark_partition, bounds)]
    if not files:
        return []
    units: list[Unit] = []
    totals: dict[str, int] = {}
    for file, rows, low, high in row_group_watermarks(con, files, config.source.watermark, PLAIN_TIMESTAMPS):
        start = totals.get(file, 0)
        totals[file] = start + rows
        if _may_hold(low, high, bounds):
            units.append(Unit(file, start, start + rows, False, (rows,)))
    return [Unit(u.file, u.first, u.end, u.first == 0 and u.end == totals[u.file], u.groups) for u in _joined(units)]


def _may_hold(low: datetime | None, high: datetime | None, bounds: Bounds) -> bool:
    if low is None or high is None:
        return True  # no usable statistics
    return low < bounds.upper and (bounds.lower is None or high >= bounds.lower)


def _day_may_hold(file: str, key: str, bounds: Bounds) -> bool:
    """Whether ``file``'s ``key=YYYY-MM-DD`` folder can hold the batch (``extract._partition_filter``'s days)."""
    found = re.search(rf"(?:^|/){re.escape(key)}=([^/]+)/", file)
    if not found:
        return True
    try:
        day = date.fromisoformat(found.group(1)[:10])
    except ValueError:
        return True
    return day <= bounds.upper.date() and (bounds.lower is None or day >= bounds.lower.date())


def _joined(units: list[Unit]) -> list[Unit]:
    """Adjacent row groups of a file as one unit (fewer ranges for DuckDB to test)."""
    joined: list[Unit] = []
    for unit in units:
        if joined and joined[-1].file == unit.file and joined[-1].end == unit.first:
            joined[-1] = Unit(unit.file, joined[-1].first, unit.end, False, joined[-1].groups + unit.groups)
        else:
            joined.append(unit)
    return joined


def balance(units: list[Unit], count: int) -> list[tuple[Unit, ...]]:
    """At most ``count`` shares of about equal rows, each a contiguous run of the units in order,
    cut at row-group boundaries (a unit that knows its row groups may be cut inside; a share is
    within one row group of its fair size: 10 files cut whole into 4 shares would give 3, 2, 3 and
    2 of them, and a worker with two of those shares a third more work than the other)."""
    pieces = [piece for unit in units for piece in _pieces(unit)]
    total = sum(piece.rows for piece, _ in pieces)
    if not pieces:
        return []
    count = max(1, min(count, total))
    shares: list[list[tuple[Unit, Unit]]] = [[] for _ in range(count)]
    done = 0
    for piece, unit in pieces:
        share = min(count - 1, done * count // max(total, 1))
        shares[share].append((piece, unit))
        done += piece.rows
    return [_rejoined(share) for share in shares if share]


def _pieces(unit: Unit) -> list[tuple[Unit, Unit]]:
    """The unit's row groups as (piece, the unit), or the unit itself when it has one or knows none."""
    if len(unit.groups) <= 1:
        return [(unit, unit)]
    pieces, start = [], unit.first
    for rows in unit.groups:
        pieces.append((Unit(unit.file, start, start + rows, False, (rows,)), unit))
        start += rows
    return pieces


def _rejoined(share: list[tuple[Unit, Unit]]) -> tuple[Unit, ...]:
    """A share's adjacent pieces of one unit as one unit again; whole when it is all of a whole unit."""
    joined: list[tuple[Unit, Unit]] = []
    for piece, unit in share:
        if joined and joined[-1][1] is unit:
            last = joined[-1][0]
            joined[-1] = (Unit(unit.file, last.first, piece.end, False, last.groups + piece.groups), unit)
        else:
            joined.append((piece, unit))
    return tuple(Unit(p.file, p.first, p.end, u.whole and (p.first, p.end) == (u.first, u.end), p.groups) for p, u in joined)


def units_sql(units: tuple[Unit, ...], columns: dict[str, str]) -> str:
    """SELECT * over the units' rows, with every column of the whole source (``columns``, as the
    client described it): a share of files may lack a column the others have (read as NULL, as
    ``union_by_name`` reads it), and ``__file`` / ``__row`` to order exact copies the same way in every task."""
    def scan(files: list[str], rows: str = "") -> str:
        listed = "[" + ", ".join(quote_literal(f) for f in files) + "]"
        return (f"SELECT * EXCLUDE (file_row_number), file_row_number AS __row FROM read_parquet({listed}, "
                f"filename = '__file', file_row_number = true, union_by_name = true){rows}")

    whole = [unit.file for unit in units if unit.whole]
    selects = [scan(whole)] if whole else []  # one scan of every whole file: a share may hold thousands
    selects += [scan([unit.file], f" WHERE file_row_number >= {unit.first} AND file_row_number < {unit.end}")
                for unit in units if not unit.whole]
    typed = [f"CAST(NULL AS {kind}) AS {quote_source_column(name)}" for name, kind in columns.items()]
    typed += ["CAST(NULL AS VARCHAR) AS __file", "CAST(NULL AS BIGINT) AS __row"]
    selects.append(f"SELECT {', '.join(typed)} WHERE false")
    return "\nUNION ALL BY NAME\n".join(selects)


def disjoint_keys(shares: list[tuple[Unit, ...]], groups: dict[str, list[tuple]]) -> bool:
    """Whether no entity id can lie in two shares: each share's ids span a range (from its row
    groups' statistics: ``groups``, per file one ``(rows, min, max)`` per row group in order, as
    ``source.row_group_ranges`` reads them) that no other share's range meets. Then the duplicate
    rule needs no keys step: each share ranks its own copies, as one pass would (the common
    append-only source: ids that grow with time). A row group without statistics, ids of two
    types: no."""
    spans = []
    for share in shares:
        bounds = [bound for unit in share for bound in _bounds(unit, groups.get(unit.file, []))]
        if not bounds or any(low is None for low, _ in bounds) or len({type(low) for low, _ in bounds}) > 1:
            return False
        spans.append((min(low for low, _ in bounds), max(high for _, high in bounds)))
    if len({type(low) for low, _ in spans}) > 1:
        return False
    spans.sort()
    return all(earlier[1] < later[0] for earlier, later in zip(spans, spans[1:]))


def _bounds(unit: Unit, row_groups: list[tuple]) -> list[tuple]:
    """(min, max) of each row group the unit covers (units are whole row groups of one file)."""
    found, start = [], 0
    for rows, low, high in row_groups:
        if unit.first <= start < unit.end:
            found.append((low, high))
        start += rows
    return found
