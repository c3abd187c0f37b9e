"""Parquet copies of committed results, so analysts never block a run (nor get blocked by one).

DuckDB lets one process write a file and refuses it while any other process holds the file open,
even read-only. So after each commit the run's new rows are written to Parquet under
``<warehouse dir>/published/`` and analysts open ``catalog.duckdb`` — a small file of views over
those Parquet files — with ``duckdb -readonly warehouse/catalog.duckdb``. Many readers may hold it
for as long as they like; the run only writes new Parquet files (atomically: temp file + rename,
one file per run id, so publishing twice is harmless) and never needs the catalog's lock unless a
new view has to be added.

    published/scores/<job>/<run_id>.parquet        append-only, one file per run
    published/batchml/<table>/<run_id>.parquet     drift, quarantine, performance: per run
    published/batchml/<table>.parquet              runs, models, model_events, watermarks,
                                                   notifications: small, replaced whole
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import duckdb

from batchml.config import JobConfig
from batchml.project import Project
from batchml.warehouse import open_connection, quote_ident, quote_literal, quote_table, table_exists

log = logging.getLogger("batchml")

PER_RUN = ("drift", "quarantine", "performance")
SNAPSHOTS = ("runs", "models", "model_events", "watermarks", "notifications")


def _copy(con: duckdb.DuckDBPyConnection, query: str, target: Path, params: list | None = None) -> None:
    """COPY a query to ``target`` atomically: readers see the old file or the new one, never half."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    sql = f"COPY ({query}) TO {quote_literal(str(temp))} (FORMAT parquet)"
    if params:
        # COPY cannot bind parameters: materialise the filtered rows as a temp table first
        con.execute(f"CREATE OR REPLACE TEMP TABLE __publish AS {query}", params)
        sql = f"COPY __publish TO {quote_literal(str(temp))} (FORMAT parquet)"
    con.execute(sql)
    os.replace(temp, target)


def publish_pending(project: Project, config: JobConfig) -> int:
    """Publish every finished run of ``config.job`` that has no published file yet — the run just
    committed, and any whose process died between its commit and publishing — then refresh the
    small snapshots and the catalog. Idempotent."""
    with project.connect() as con:
        run_ids = [r[0] for r in con.execute(
            "SELECT run_id FROM batchml.runs WHERE job = ? AND status NOT IN ('running') ORDER BY started_at", [config.job]
        ).fetchall()]
        done = 0
        for run_id in run_ids:
            if not _marker(project, config, run_id).exists():
                _publish_run_files(con, project, config, run_id)
                done += 1
        for table in SNAPSHOTS:
            _copy(con, f"SELECT * FROM batchml.{table}", project.published / "batchml" / f"{table}.parquet")
    ensure_catalog(project, [config])
    return done


def _marker(project: Project, config: JobConfig, run_id: str) -> Path:
    return project.published / "batchml" / "performance" / f"{config.job}__{run_id}.parquet"


def _publish_run_files(con: duckdb.DuckDBPyConnection, project: Project, config: JobConfig, run_id: str) -> None:
    if table_exists(con, config.scores_table):
        target = project.published / "scores" / config.job / f"{run_id}.parquet"
        if not target.exists():
            _copy(con, f"SELECT * FROM {quote_table(config.scores_table)} WHERE run_id = ?", target, [run_id])
    # performance last: its file marks the run as fully published
    for table in PER_RUN:
        target = project.published / "batchml" / table / f"{config.job}__{run_id}.parquet"
        if not target.exists():
            _copy(con, f"SELECT * FROM batchml.{table} WHERE run_id = ?", target, [run_id])


def catalog_views(project: Project, configs: list[JobConfig]) -> dict[str, str]:
    """View name -> SELECT over the published files."""
    root = project.published
    views = {f"batchml.{t}": f"SELECT * FROM read_parquet({quote_literal(str(root / 'batchml' / t / '*.parquet'))}, union_by_name = true)" for t in PER_RUN}
    views |= {f"batchml.{t}": f"SELECT * FROM read_parquet({quote_literal(str(root / 'batchml' / f'{t}.parquet'))})" for t in SNAPSHOTS}
    views["batchml.champion_history"] = (
        "SELECT job, version, event, reason, actor, recorded_at AS champion_from, "
        "lead(recorded_at) OVER (PARTITION BY job ORDER BY recorded_at) AS champion_until "
        "FROM batchml.model_events WHERE event IN ('promoted', 'manual_promote', 'rollback')"
    )
    for config in configs:
        files = root / "scores" / config.job
        if not any(files.glob("*.parquet")):
            continue
        scores = config.scores_table
        views[scores] = f"SELECT * FROM read_parquet({quote_literal(str(files / '*.parquet'))}, union_by_name = true)"
        entity = quote_ident(config.source.entity_id)
        views[f"{scores}_latest"] = (
            f"SELECT * FROM {quote_table(scores)} "
            f"QUALIFY row_number() OVER (PARTITION BY {entity} ORDER BY scored_at DESC, run_id DESC) = 1"
        )
    return views


def ensure_catalog(project: Project, configs: list[JobConfig]) -> None:
    """Create any missing view in ``catalog.duckdb``; if analysts hold it open, try again next run."""
    views = catalog_views(project, configs)
    if _catalog_has(project, views):
        return
    try:
        con = open_connection(project.catalog, lock_timeout=2.0)
    except Exception as exc:  # held by a reader: the views appear after a later run
        log.warning("catalog %s is in use; new views will be added by a later run (%s)", project.catalog, exc)
        return
    try:
        for name, sql in views.items():
            schema = name.split(".")[0]
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
            con.execute(f"CREATE OR REPLACE VIEW {quote_table(name)} AS {sql}")
    finally:
        con.close()


def _catalog_has(project: Project, views: dict[str, str]) -> bool:
    if not project.catalog.exists():
        return False
    try:
        con = duckdb.connect(str(project.catalog), read_only=True)
    except duckdb.Error:
        return True  # someone holds it for writing; leave it
    try:
        present = {f"{s}.{n}": sql for s, n, sql in con.execute(
            "SELECT schema_name, view_name, sql FROM duckdb_views() WHERE NOT internal").fetchall()}
    finally:
        con.close()
    # a view over another directory's files (the project was copied or moved) counts as missing
    home = str(project.published)
    return all(name in present and (home not in sql or home in present[name]) for name, sql in views.items())
