"""Parquet copies of committed results, so analysts never block a run (nor get blocked by one).

DuckDB lets one process write a file and refuses it while any other process holds the file open,
even read-only. So after each commit the run's new rows are written to Parquet under
``<warehouse dir>/published/`` and analysts open ``catalog.duckdb`` — a small file of views over
those Parquet files — with ``duckdb -readonly warehouse/catalog.duckdb``. Many readers may hold it
for as long as they like; the run only writes new Parquet files (atomically: temp file + rename,
one file per run id, so publishing twice is harmless). When a view has to be added, the new catalog
is built in a temp file and renamed over the old one: open sessions keep reading the old file, new
ones see the new views.

    published/scores/<job>/<run_id>.parquet        append-only, one file per run
    published/batchml/<table>/<run_id>.parquet     drift, quarantine, performance: per run
    published/batchml/<table>.parquet              runs, models, model_events, watermarks,
                                                   notifications: small, replaced whole
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from batchml.config import JobConfig
from batchml.errors import BatchMLError
from batchml.project import Project
from batchml.storage.warehouse import CHAMPION_HISTORY_SQL, open_connection, quote_ident, quote_literal, quote_table, table_exists

log = logging.getLogger("batchml")

PER_RUN = ("drift", "quarantine", "performance")
SNAPSHOTS = ("runs", "models", "model_events", "watermarks", "notifications")


def _copy(con: duckdb.DuckDBPyConnection, query: str, target: Path) -> None:
    """COPY a query to ``target`` atomically: readers see the old file or the new one, never half."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    con.execute(f"COPY ({query}) TO {quote_literal(str(temp))} (FORMAT parquet)")
    os.replace(temp, target)


def _of_run(table: str, run_id: str) -> str:
    """The rows of one run. COPY cannot bind parameters, so the run id (batchml's own, quoted) is
    written into the query: filtering a temp copy of the rows instead wrote every score twice."""
    return f"SELECT * FROM {table} WHERE run_id = {quote_literal(run_id)}"


def publish_pending(project: Project, config: JobConfig, own: dict[str, Path | tuple[Path, ...]] | None = None) -> int:
    """Publish every finished run of ``config.job`` that has no published file yet — the run just
    committed, and any whose process died between its commit and publishing — then refresh the
    small snapshots and the catalog. Idempotent. ``own``: run id -> the Parquet scores file that
    run committed, moved into place instead of written a second time from the table; or the
    Dask engine's lake files the run committed, linked into place (they stay in the lake)."""
    with project.connect() as con:
        run_ids = [r[0] for r in con.execute(
            "SELECT run_id FROM batchml.runs WHERE job = ? AND status NOT IN ('running') ORDER BY started_at", [config.job]
        ).fetchall()]
        done = 0
        for run_id in run_ids:
            if not _marker(project, config, run_id).exists():
                _publish_run_files(con, project, config, run_id, (own or {}).get(run_id))
                done += 1
        publish_snapshots(con, project)
    ensure_catalog(project, [config])
    return done


def publish_snapshots(con: duckdb.DuckDBPyConnection, project: Project, tables: tuple[str, ...] = SNAPSHOTS) -> None:
    """Replace the published copies of the small whole tables (``runs``, ``models``, ...) with their rows now."""
    for table in tables:
        _copy(con, f"SELECT * FROM batchml.{table}", project.published / "batchml" / f"{table}.parquet")


def publish_change(con: duckdb.DuckDBPyConnection, project: Project, job: str, tables: tuple[str, ...]) -> None:
    """After a change made outside a run's publishing step (a promotion or rollback by hand, a
    report mail recorded after the run published), refresh the snapshots it touched, so analysts
    see it now rather than after the next run. Never raises: the change itself is committed."""
    try:
        publish_snapshots(con, project, tables)
    except (BatchMLError, duckdb.Error, OSError) as exc:
        log.warning("%s: publishing for analysts failed (the change itself is committed): %s", job, exc)


def _marker(project: Project, config: JobConfig, run_id: str) -> Path:
    return project.published / "batchml" / "performance" / f"{config.job}__{run_id}.parquet"


def _publish_run_files(con: duckdb.DuckDBPyConnection, project: Project, config: JobConfig, run_id: str,
                       scores_file: Path | tuple[Path, ...] | None = None) -> None:
    if table_exists(con, config.scores_table):
        target = project.published / "scores" / config.job / f"{run_id}.parquet"
        if not target.exists():
            for leftover in target.parent.glob(f"{glob.escape(target.stem)}~*.parquet"):  # links of a publish cut short
                leftover.unlink()
            placed = _linked(scores_file, target) if isinstance(scores_file, tuple) else _moved(scores_file, target)
            if not placed:
                _copy(con, _of_run(quote_table(config.scores_table), run_id), target)
    # performance last: its file marks the run as fully published
    for table in PER_RUN:
        target = project.published / "batchml" / table / f"{config.job}__{run_id}.parquet"
        if not target.exists():
            _copy(con, _of_run(f"batchml.{table}", run_id), target)


def _linked(parts: tuple[Path, ...], target: Path) -> bool:
    """Hard-link a run's lake files as ``<run>.parquet`` (the first, linked last: its name marks the
    run's scores as published) and ``<run>~<n>.parquet``, instead of writing every score again
    (1.4 s of the client's time per 2M rows); False when one is missing or links cannot be made
    (another file system): then written from the table instead."""
    if not parts:
        return False
    names = [target.with_name(f"{target.stem}~{n}.parquet") for n in range(1, len(parts))] + [target]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for part, name in zip((*parts[1:], parts[0]), names):
            temp = name.with_name(f".{name.name}.{os.getpid()}.tmp")
            temp.unlink(missing_ok=True)
            os.link(part, temp)
            os.replace(temp, name)
    except OSError:
        for name in names:
            name.unlink(missing_ok=True)
        return False
    return True


def _moved(scores_file: Path | None, target: Path) -> bool:
    """Move the run's committed scores file into place (a rename: atomic, no second write of every
    score); False when there is none, or it lies on another file system."""
    if scores_file is None or not scores_file.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(scores_file, target)
    except OSError:  # e.g. tmp/ on another device: written from the table instead
        return False
    return True


def catalog_views(project: Project, configs: list[JobConfig]) -> dict[str, str]:
    """View name -> SELECT over the published files."""
    root = project.published
    views = {f"batchml.{t}": f"SELECT * FROM read_parquet({quote_literal(str(root / 'batchml' / t / '*.parquet'))}, union_by_name = true)" for t in PER_RUN}
    views |= {f"batchml.{t}": f"SELECT * FROM read_parquet({quote_literal(str(root / 'batchml' / f'{t}.parquet'))})" for t in SNAPSHOTS}
    views["batchml.champion_history"] = CHAMPION_HISTORY_SQL
    from batchml.storage.writeback import latest_sql  # it imports scoring, and LightGBM: not for commands that only read

    for config in configs:
        files = root / "scores" / config.job
        if not any(files.glob("*.parquet")):
            continue
        scores = config.scores_table
        views[scores] = f"SELECT * FROM read_parquet({quote_literal(str(files / '*.parquet'))}, union_by_name = true)"
        views[f"{scores}_latest"] = latest_sql(quote_table(scores), config)
    return views


def ensure_catalog(project: Project, configs: list[JobConfig]) -> None:
    """Add any missing view to ``catalog.duckdb``.

    DuckDB cannot write a file that readers hold open, so the catalog is never changed in place: a
    copy is changed and renamed over it. Open sessions keep the old file (the old views still work:
    they read the published Parquet); a crash mid-way leaves the old catalog as it was.
    """
    views = catalog_views(project, configs)
    if _catalog_has(project, views):
        return
    with _catalog_lock(project):
        if _catalog_has(project, views):  # another run built it while we waited
            return
        _rebuild_catalog(project, views)


@contextmanager
def _catalog_lock(project: Project) -> Iterator[None]:
    """One catalog build at a time: two jobs renaming their copies would lose one's views."""
    project.locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(project.locks / "catalog.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)  # mode: the umask's
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed, or when the process dies
        yield
    finally:
        os.close(fd)


def _rebuild_catalog(project: Project, views: dict[str, str]) -> None:
    temp = project.catalog.with_name(f".{project.catalog.name}.{os.getpid()}.tmp")
    try:
        if project.catalog.exists():
            # a copy keeps the other jobs' views and the file's storage version (readable by the duckdb CLI)
            shutil.copyfile(project.catalog, temp)
        con = open_connection(temp, lock_timeout=0)  # a new file gets batchml's storage compatibility
        try:
            for name, sql in views.items():
                schema = name.split(".")[0]
                con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
                con.execute(f"CREATE OR REPLACE VIEW {quote_table(name)} AS {sql}")
            con.execute("CHECKPOINT")  # everything in the file itself, nothing left in a .wal beside it
        finally:
            con.close()
        os.replace(temp, project.catalog)
    finally:
        for leftover in (temp, temp.with_name(temp.name + ".wal")):
            leftover.unlink(missing_ok=True)


def _catalog_has(project: Project, views: dict[str, str]) -> bool:
    if not project.catalog.exists():
        return False
    try:
        con = duckdb.connect(str(project.catalog), read_only=True)
    except duckdb.Error:
        return True  # someone holds it for writing; leave it
    try:
        present = {f"{s}.{n}".lower(): sql for s, n, sql in con.execute(
            "SELECT schema_name, view_name, sql FROM duckdb_views() WHERE NOT internal").fetchall()}
    finally:
        con.close()
    # a view over another directory's files (the project was copied or moved) counts as missing
    home = str(project.published)
    # a _latest view from before it ordered by event time (one row per entity's newest event) is stale
    from batchml.storage.writeback import LATEST_ORDER

    stale = [name for name in present if name.endswith("_latest") and LATEST_ORDER not in present[name]]
    # names compared as DuckDB resolves them: case-insensitively (scoring.table Scores.Toy_Mixed)
    return not stale and all(name.lower() in present and (home not in sql or home in present[name.lower()])
                             for name, sql in views.items())
