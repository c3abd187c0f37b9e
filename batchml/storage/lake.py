"""The Parquet lake of the Dask engine: workers write files, the client alone makes them visible.

Workers never open the warehouse (DuckDB allows one writing process). Each task writes its rows
as a Parquet file whose name carries the run id, the partition and the attempt, first under a
temp name and then renamed, and returns a :class:`PartFile` (path, rows, checksum). The client
then commits, in the run's one DuckDB transaction, a manifest row per file it accepted
(``batchml.manifests``) and re-creates ``scores.<job>`` / ``scores.<job>_latest`` as views over
exactly the files committed manifests list — never a glob. A retried task's other attempt, a
stray attempt or the files of a run that died before its commit are therefore invisible; the
next run sweeps them (:func:`sweep`).

    <warehouse dir>/lake/<job>/scores/run=<run_id>/part-<p>-<attempt>.parquet
    <warehouse dir>/lake/<job>/quarantine/run=<run_id>/part-<p>-<attempt>.parquet
    <warehouse dir>/lake/<job>/staging/run=<run_id>/part-<p>-<attempt>.arrow   (pulled rows, deleted after the run)

On a cluster of several machines the lake must be a folder every worker and the client see at
the same path (a shared filesystem).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from batchml.config import JobConfig
from batchml.errors import DataError
from batchml.data.extract import ENTITY, REASON, RECORD, RULE
from batchml.storage.warehouse import quote_ident, quote_literal, quote_table, registered, table_exists
from batchml.storage.writeback import latest_sql

SCORES, QUARANTINE, SHADOW, STAGING = "scores", "quarantine", "shadow", "staging"
KINDS = (SCORES, QUARANTINE, SHADOW)  # committed kinds; staging files never are

MANIFESTS_SQL = """
CREATE TABLE IF NOT EXISTS batchml.manifests (
    run_id VARCHAR NOT NULL, job VARCHAR NOT NULL, kind VARCHAR NOT NULL, partition INTEGER,
    path VARCHAR NOT NULL, rows BIGINT, checksum VARCHAR, committed_at TIMESTAMP
)
"""


@dataclass(frozen=True)
class PartFile:
    """What a task returns for a file it wrote: the client commits exactly these."""

    kind: str
    partition: int
    path: str
    rows: int
    checksum: str  # sha256 of the file's bytes


def job_root(lake: Path, job: str) -> Path:
    return lake / job


def part_path(lake: Path, job: str, kind: str, run_id: str, partition: int, suffix: str = ".parquet") -> Path:
    """A new file name for one attempt at one partition: a retried task never overwrites (nor is
    overwritten by) the attempt whose result the client received."""
    attempt = uuid.uuid4().hex[:8]
    return job_root(lake, job) / kind / f"run={run_id}" / f"part-{partition:05d}-{attempt}{suffix}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_part(batches: Iterable[pa.RecordBatch], schema: pa.Schema, path: Path, kind: str, partition: int) -> PartFile:
    """Write ``batches`` as one Parquet file at ``path``, atomically (temp name, then rename): a
    worker killed mid-write leaves a temp file, never a half file under a real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    rows = 0
    with pq.ParquetWriter(str(temp), schema) as writer:
        for batch in batches:
            if batch.num_rows:
                writer.write_batch(batch)
                rows += batch.num_rows
    os.replace(temp, path)
    return PartFile(kind, partition, str(path), rows, sha256_file(path))


# ---------------------------------------------------------------------------------------------
# The client's side: inside the run's commit transaction
# ---------------------------------------------------------------------------------------------


def ensure_manifests(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(MANIFESTS_SQL)


def accepted(parts: Iterable[PartFile]) -> list[PartFile]:
    """The parts as committed: each must still be there with the rows its task reported (Parquet
    footers only, no data read); a lost file fails the commit rather than hiding rows."""
    checked = []
    for part in parts:
        try:
            rows = pq.ParquetFile(part.path).metadata.num_rows
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"lake file {part.path} of partition {part.partition} is unreadable ({exc}); "
                            f"rerun the job (the night is done again)") from exc
        if rows != part.rows:
            raise DataError(f"lake file {part.path} holds {rows} rows, its task reported {part.rows}; rerun the job")
        checked.append(part)
    return checked


def record_manifest(con: duckdb.DuckDBPyConnection, run_id: str, job: str, parts: Iterable[PartFile], at: datetime) -> None:
    ensure_manifests(con)
    for part in accepted(parts):
        con.execute("INSERT INTO batchml.manifests VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [run_id, job, part.kind, part.partition, part.path, part.rows, part.checksum, at])


def committed_paths(con: duckdb.DuckDBPyConnection, job: str, kind: str | None = None) -> list[str]:
    ensure_manifests(con)
    where, params = ("job = ?", [job]) if kind is None else ("job = ? AND kind = ?", [job, kind])
    return [row[0] for row in con.execute(f"SELECT path FROM batchml.manifests WHERE {where} ORDER BY committed_at, path",
                                          params).fetchall()]


def refresh_scores_views(con: duckdb.DuckDBPyConnection, config: JobConfig) -> None:
    """``scores.<job>`` and its ``_latest`` view over exactly the committed score files (and, with
    ``promotion.shadow``, ``scores.<job>_shadow`` and ``_shadow_latest`` over the shadow files)."""
    _refresh_views(con, config, SCORES, "")
    _refresh_views(con, config, SHADOW, "_shadow")


def _refresh_views(con: duckdb.DuckDBPyConnection, config: JobConfig, kind: str, suffix: str) -> None:
    name = config.scores_table + suffix
    paths = committed_paths(con, config.job, kind)
    if not paths:
        return
    refuse_local_table(con, config, suffix)
    files = "[" + ", ".join(quote_literal(p) for p in paths) + "]"
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(name.split('.')[0])}")
    # hive_partitioning off: the files' folders (run=<run_id>) would add a column the local engine's table lacks
    con.execute(f"CREATE OR REPLACE VIEW {quote_table(name)} AS SELECT * FROM read_parquet({files}, hive_partitioning = false, "
                f"union_by_name = true)")
    con.execute(f"CREATE OR REPLACE VIEW {quote_table(name + '_latest')} AS {latest_sql(quote_table(name), config)}")


def refuse_local_table(con: duckdb.DuckDBPyConnection, config: JobConfig, suffix: str = "") -> None:
    """A job switched from the local engine keeps its scores in a table of the same name: the lake's
    view cannot take its place without hiding that history."""
    name = config.scores_table + suffix
    schema, _, table = name.rpartition(".")
    kind = con.execute("SELECT table_type FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
                       [schema, table]).fetchall()
    if kind and kind[0][0] == "BASE TABLE":
        raise DataError(f"{name} is a table written by the local engine; the dask engine serves scores as a view over its "
                        f"lake files: export it (COPY {name} TO '<warehouse dir>/lake/{config.job}/{'shadow' if suffix else 'scores'}/local.parquet') "
                        f"and drop it, or set scoring.table to a new name, or keep execution.engine local")


QUARANTINE_SCHEMA = pa.schema([("entity_id", pa.string()), ("rule", pa.string()), ("reason", pa.string()), ("record", pa.string())])


def quarantine_rows(con: duckdb.DuckDBPyConnection, rejected: pa.Table) -> pa.Table:
    """A partition's rejected run-file rows as ``batchml.quarantine`` stores them (the id cast by
    DuckDB on a worker's in-memory connection, as the local engine does)."""
    with registered(con, "__rejected", rejected):
        return con.sql(f"SELECT CAST({ENTITY} AS VARCHAR) AS entity_id, {RULE} AS rule, {REASON} AS reason, "
                       f"{RECORD} AS record FROM __rejected").to_arrow_table().cast(QUARANTINE_SCHEMA)


def insert_quarantine(con: duckdb.DuckDBPyConnection, run_id: str, job: str, parts: Iterable[PartFile], at: datetime) -> None:
    """The run's quarantined rows, from its quarantine files, into ``batchml.quarantine``."""
    paths = [p.path for p in parts if p.rows]
    if not paths:
        return
    files = "[" + ", ".join(quote_literal(p) for p in paths) + "]"
    con.execute(f"INSERT INTO batchml.quarantine SELECT ?, ?, entity_id, rule, reason, record, ? FROM read_parquet({files})",
                [run_id, job, at])


def scores_exist(con: duckdb.DuckDBPyConnection, config: JobConfig) -> bool:
    return table_exists(con, config.scores_table)


# ---------------------------------------------------------------------------------------------
# Sweeping what no manifest lists
# ---------------------------------------------------------------------------------------------


def sweep(con: duckdb.DuckDBPyConnection, lake: Path, job: str, before: datetime, keep_run: str) -> int:
    """Delete the job's lake files no committed manifest lists and that are older than ``before``
    (the start of the run that sweeps): a crashed run's files, a retried task's other attempt.
    Staging files of any run but ``keep_run`` go too. Returns the files removed."""
    root = job_root(lake, job)
    if not root.exists():
        return 0
    listed = set(committed_paths(con, job))
    cutoff = (before if before.tzinfo else before.replace(tzinfo=timezone.utc)).timestamp()  # runs keep naive UTC
    removed = 0
    for path in root.rglob("*"):
        if not path.is_file() or str(path) in listed or f"run={keep_run}" in path.parts:
            continue
        if path.stat().st_mtime < cutoff:
            path.unlink(missing_ok=True)
            removed += 1
    for folder in sorted((p for p in root.rglob("run=*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    return removed


def remove_staging(lake: Path, job: str, run_id: str) -> None:
    shutil.rmtree(job_root(lake, job) / STAGING / f"run={run_id}", ignore_errors=True)
