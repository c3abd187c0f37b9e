"""The run's rows into the warehouse's tables, inside the commit transaction: scores (with the
``_latest`` view analysts read), quarantined rows, drift and performance rows. Each function takes the open connection; none commits."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from batchml.models import registry
from batchml.config import JobConfig
from batchml.errors import DataError
from batchml.data.extract import ENTITY, REASON, RECORD, RULE
from batchml.models.reasons import REASON_TYPE
from batchml.models.scoring import score_rows
from batchml.storage.warehouse import quote_ident, quote_literal, quote_table, registered, setting


DRIFT_COLUMNS = pl.Schema({
    "run_id": pl.String, "job": pl.String, "feature": pl.String, "method": pl.String, "kind": pl.String,
    "statistic": pl.Float64, "p_value": pl.Float64, "threshold": pl.Float64, "drifted": pl.Boolean,
    "n_reference": pl.Int64, "n_current": pl.Int64, "error": pl.String, "histogram": pl.String,
    "model_version": pl.Int32, "computed_at": pl.Datetime("us"),
})


def write_drift_rows(con, run_id: str, job: str, version: int | None, rows: list[dict]) -> None:
    """One INSERT of every row (a statement per row took 48 ms for a night of 37 features)."""
    if not rows:
        return
    shared = {"run_id": run_id, "job": job, "model_version": version, "computed_at": registry.utcnow()}
    # polars, not pa.Table.from_pylist: that imports pandas (batchml.data.arrays)
    table = pl.DataFrame([{**row, **shared} for row in rows], schema=DRIFT_COLUMNS).to_arrow()
    with registered(con, "__drift", table):
        con.execute(f"INSERT INTO batchml.drift BY NAME SELECT {', '.join(DRIFT_COLUMNS.names())} FROM __drift")


def write_quarantine(con, run_id: str, job: str, rejected: pa.Table) -> None:
    """The run's rejected rows (run-file columns: entity, rule, reason, raw record) into batchml.quarantine."""
    with registered(con, "__rejected", rejected):
        con.execute(
            f"INSERT INTO batchml.quarantine SELECT ?, ?, CAST({ENTITY} AS VARCHAR), {RULE}, {REASON}, {RECORD}, ? FROM __rejected",
            [run_id, job, registry.utcnow()],
        )


def write_performance(con, run_id: str, job: str, rows: list[dict]) -> None:
    """Realised and estimated metric rows (``monitoring.performance``) into batchml.performance."""
    for row in rows:
        con.execute(
            "INSERT INTO batchml.performance VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [run_id, job, row["model_version"], row["event_day"], row["metric"], row["value"],
             row["n"], row["positives"], row["estimated"], registry.utcnow()],
        )


def write_scores(con, config: JobConfig, path: Path, suffix: str = "") -> None:
    """Append a run's scores (from its Parquet scores file, in the run's folder, which its
    connections may read) and keep the ``_latest`` view in place."""
    import pyarrow.parquet as pq

    table = ensure_scores_table(con, config, pq.read_schema(str(path)), suffix)
    # DuckDB reads the file with all its threads, in whatever order they finish them (readers sort anyway)
    with setting(con, "preserve_insertion_order", False):
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet({quote_literal(str(path))})")


def ensure_scores_table(con, config: JobConfig, schema: pa.Schema, suffix: str = "") -> str:
    """The scores table (quoted) and its ``_latest`` view, created from ``schema`` if missing."""
    name = config.scores_table + suffix
    table, entity = quote_table(name), quote_ident(config.source.entity_id)
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(name.split('.')[0])}")
    with registered(con, "__scores", pa.Table.from_batches([], schema=schema)):  # not schema.empty_table(): it imports pandas
        con.execute(f"CREATE TABLE IF NOT EXISTS {table} AS SELECT * FROM __scores")
        require_entity_type(con, config, name, con.execute(f"DESCRIBE SELECT {entity} FROM __scores").fetchall()[0][1])
    con.execute(f"CREATE OR REPLACE VIEW {quote_table(name + '_latest')} AS {latest_sql(table, config)}")
    return table


# A row is (entity, event time): an entity's newest event, and of that event's scores the latest one.
# A backfill of older events never wins; a backfill of the newest event with another model does.
LATEST_ORDER = "event_time DESC NULLS LAST, scored_at DESC, run_id DESC"


def latest_sql(table: str, config: JobConfig) -> str:
    """SELECT of one row per entity from the scores ``table`` (quoted): the ``_latest`` view, here and in the catalog."""
    entity = quote_ident(config.source.entity_id)
    return f"SELECT * FROM {table} QUALIFY row_number() OVER (PARTITION BY {entity} ORDER BY {LATEST_ORDER}) = 1"


def require_entity_type(con, config: JobConfig, name: str, source_type: str) -> None:
    """Scores table ``name`` keeps the entity id type of its first run; a source whose id type
    changed since (BIGINT -> VARCHAR) would fail the insert with a bare conversion error. Also run
    by ``batchml check``, before a run trains and scores for nothing."""
    entity = config.source.entity_id
    stored = con.execute(f"DESCRIBE SELECT {quote_ident(entity)} FROM {quote_table(name)}").fetchall()[0][1]
    if stored != source_type:
        raise DataError(f"{name}.{entity} is {stored} but the source's {entity} is now {source_type}; change the table to "
                        f"match (ALTER TABLE {quote_table(name)} ALTER {quote_ident(entity)} TYPE {source_type}, and the same "
                        f"for its _shadow table if any), then rerun")


def scores_schema(batch_schema: pa.Schema, config: JobConfig) -> pa.Schema:
    """What a scores run file holds for batches of ``batch_schema`` (a pull's normalised rows)."""
    empty = pa.RecordBatch.from_arrays([pa.nulls(0, field.type) for field in batch_schema], schema=batch_schema)
    return score_rows(empty, np.empty(0), pa.nulls(0, pa.string()), pa.nulls(0, REASON_TYPE), config, 0, "", datetime(1970, 1, 1)).schema


def scored_between(con, config: JobConfig, start: datetime, end: datetime) -> list[dict]:
    """Score rows already stored for events in ``[start, end)``, per model version: ``model_version``,
    ``rows``, ``entities`` and ``runs`` (how many runs wrote them). Empty before the first scores."""
    from batchml.storage.warehouse import fetch_dicts, table_exists

    if not table_exists(con, config.scores_table):
        return []
    return fetch_dicts(con, f"SELECT model_version, count(*) AS rows, count(DISTINCT run_id) AS runs "
                            f"FROM {quote_table(config.scores_table)} WHERE event_time >= ? AND event_time < ? "
                            f"GROUP BY model_version ORDER BY model_version", [start, end])
