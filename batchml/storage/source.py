"""Reading the job's source: its SQL checked and run on a restricted connection, batches pulled into run files.

The SQL text comes from ``batchml.data.extract`` (pure builders); this module runs it, maps DuckDB's
errors to one-line ``DataError`` / ``ConfigError`` messages where they enter, and streams the checked
rows into an Arrow IPC run file. Parquet sources in an object store are read through an fsspec
filesystem registered on the connection (see ``batchml.data.sources``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from pyarrow import ipc

from batchml.config import BATCHML_SCHEMA, SCORE_SUFFIXES, JobConfig, config_dir, feature_sql, job_names, load_job_config
from batchml.data.extract import (
    PullResult,
    PullSummary,
    as_of_cutoff,
    check_columns,
    job_directories,
    labeled,
    normalised_sql,
    raw_sql,
    source_label,
    split_batch,
    ts_literal,
)
from batchml.data.sources import OBJECT_STORES, protocol, storage_options
from batchml.models.objectives import objective_of
from batchml.errors import ConfigError, DataError, WarehouseError, file_error, os_errno
from batchml.storage.warehouse import is_restricted, quote_ident, quote_literal, restrict_external_access, setting, size_bytes


def set_cutoff(con: duckdb.DuckDBPyConnection, as_of: datetime) -> None:
    con.execute(f"SET VARIABLE batchml_as_of = {ts_literal(as_of)}")



def restrict(con: duckdb.DuckDBPyConnection, config: JobConfig, project: Path, also: tuple[Path, ...] = ()) -> None:
    """Restrict ``con`` for the job's SQL: no file outside the job's source folder (and ``also``:
    the job's own lake folder on the Dask engine, whose views read its files), no download."""
    restrict_external_access(con, [*job_directories(config, project), *also])


# Table functions that run a query given as text: its tables cannot be checked before it runs
TEXT_QUERY_FUNCTIONS = frozenset({"query", "query_table"})


def _reached_tables(con: duckdb.DuckDBPyConnection, sql: str, config: JobConfig) -> tuple[list[tuple[str, str]], list[str]]:
    """((schema, table) of every table ``sql`` names, the table functions it calls), from DuckDB's parse tree."""
    parsed = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])
    if parsed.get("error"):
        try:
            con.extract_statements(sql)
        except duckdb.ParserException:
            return [], []  # not SQL at all: DuckDB's own message, when it runs, names the mistake
        raise ConfigError(f"{config.features.sql}: DuckDB cannot check this SQL ({parsed.get('error_message', 'unknown error')}); "
                          f"write it as one SELECT over `source`")
    tables, functions = [], []

    def walk(node) -> None:
        if isinstance(node, dict):
            if node.get("type") == "BASE_TABLE":
                tables.append((str(node.get("schema_name") or ""), str(node.get("table_name") or "")))
            elif node.get("type") == "TABLE_FUNCTION" and isinstance(node.get("function"), dict):
                functions.append(str(node["function"].get("function_name") or ""))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(parsed["statements"])
    return tables, functions


def _refuse_protected_tables(con: duckdb.DuckDBPyConnection, sql: str, config: JobConfig, project: Path) -> None:
    """Feature SQL may join other warehouse tables, but not batchml's own (runs, quarantine, ...) nor
    any job's scores: those are not inputs, and reading them would leak one job's results into another."""
    protected = {config_scores.lower() for config_scores in _scores_tables(config, project)}
    tables, functions = _reached_tables(con, sql, config)
    for schema, table in tables:
        name = f"{schema}.{table}".lower()
        if schema.lower() in (BATCHML_SCHEMA, "scores") or name in protected:
            raise ConfigError(f"{config.features.sql} reads {schema}.{table}: a job's SQL may not read batchml's own tables "
                              f"or scores tables; read the source as `source` (and other source tables) instead")
    for function in functions:
        if function.lower() in TEXT_QUERY_FUNCTIONS:
            raise ConfigError(f"{config.features.sql} calls {function}(): a query given as text cannot be checked; "
                              f"write the tables into the SELECT itself")


def _scores_tables(config: JobConfig, project: Path) -> set[str]:
    """Every scores table of the project's jobs (and their views), this job's own included."""
    names = {config.scores_table}
    for job in job_names(project):
        try:
            names.add(load_job_config(config_dir(project) / f"{job}.yaml").scores_table)
        except ConfigError:
            continue
    return {name + suffix for name in names for suffix in ("", *SCORE_SUFFIXES)}



def source_sql(con: duckdb.DuckDBPyConnection, config: JobConfig, project: Path) -> str:
    """SELECT over the raw source (table or Parquet glob), with the job's feature SQL applied.

    The job's SQL runs only on a connection restricted by :func:`restrict`, and only when it names
    none of batchml's tables nor any scores table."""
    register_object_store(con, config.source.parquet)
    raw = raw_sql(config, project)
    derived = feature_sql(project, config)
    if derived is None:
        return raw
    if not is_restricted(con):  # a programming error, not the user's: every caller restricts first
        raise WarehouseError(f"internal error: {config.features.sql} would run with access to every file; please report it")
    _refuse_protected_tables(con, derived, config, project)
    # the user's SELECT reads a relation called `source`; a nested query may carry its own WITH.
    # Own lines: a trailing -- comment ends there.
    sql = f"WITH source AS ({as_of_cutoff(config, raw, _raw_columns(con, config, raw))}) SELECT * FROM (\n{derived}\n)"
    _one_select(sql, config)
    return sql


def _raw_columns(con: duckdb.DuckDBPyConnection, config: JobConfig, raw: str) -> set[str]:
    try:
        return {row[0] for row in con.execute(f"DESCRIBE {raw}").fetchall()}
    except duckdb.Error as exc:
        raise DataError(_source_error(config, exc)) from exc


def uncut_columns(con: duckdb.DuckDBPyConnection, config: JobConfig, project: Path) -> list[str]:
    """The watermark / label / available_at columns that feature SQL derives rather than reads from
    the source: ``source`` cannot be cut off at the run's cut-off by them (see ``extract.as_of_cutoff``)."""
    if config.features.sql is None:
        return []
    register_object_store(con, config.source.parquet)
    columns = _raw_columns(con, config, raw_sql(config, project))
    wanted = (config.source.watermark, config.label.column, config.label.available_at)
    return [name for name in wanted if name not in columns]


def _one_select(sql: str, config: JobConfig) -> None:
    """Refuse feature SQL that closes the wrapping query and runs statements of its own
    (``...) ; CREATE TABLE ...``): it must be one SELECT. Unparsable SQL is left to DuckDB's message."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error:
        return
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        kinds = ", ".join(statement.type.name for statement in statements)
        raise ConfigError(f"{config.features.sql} must hold one SELECT over `source`, but makes {len(statements)} statement(s) "
                          f"({kinds}); fix the SQL in {config.features.sql}")



def describe_source(con: duckdb.DuckDBPyConnection, config: JobConfig, project: Path) -> dict[str, str]:
    """Column name -> DuckDB type of the source; a missing required column, or a time or label
    column of the wrong type, is a clear error."""
    try:
        sql = source_sql(con, config, project)
        described = con.execute(f"DESCRIBE {sql}").fetchall()
    except duckdb.Error as exc:
        raise DataError(_source_error(config, exc)) from exc
    columns = {row[0]: row[1] for row in described}
    check_columns(config, columns)
    return columns



def _source_error(config: JobConfig, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, duckdb.OutOfMemoryException):
        fix = "; give DuckDB more memory with BATCHML_MEMORY_LIMIT (e.g. 1GB)"
    elif isinstance(exc, duckdb.ParserException) and config.features.sql:
        fix = f"; fix the SQL in {config.features.sql}"
    elif isinstance(exc, duckdb.CatalogException):
        fix = (f"; fix the SQL in {config.features.sql} (it reads the source as `source`)" if config.features.sql
               else f"; create it in the warehouse, or fix source.table in configs/{config.job}.yaml")
    elif isinstance(exc, (duckdb.BinderException, duckdb.ConversionException)) or first.startswith(("Conversion Error", "Binder Error")):
        where = f"the SQL in {config.features.sql}" if config.features.sql else f"configs/{config.job}.yaml"
        fix = (f"; a source column no longer fits {where} (renamed, or its type changed, e.g. text where a number "
               f"was{', in some Parquet files' if config.source.parquet else ''}): compare DESCRIBE of the source with it")
    elif config.source.parquet and "No files found" in first:
        fix = f"; fix source.parquet in configs/{config.job}.yaml (a relative pattern starts at the project directory)"
    elif config.source.parquet and isinstance(exc, duckdb.InvalidInputException):
        fix = "; replace or remove the damaged file (a pull reads every file the pattern matches)"
    else:
        fix = ""
    through = f" through {config.features.sql}" if config.features.sql else ""
    return f"cannot read source {source_label(config)}{through} for job {config.job}: {first}{fix}"



def null_watermarks(con: duckdb.DuckDBPyConnection, config: JobConfig, project: Path) -> int:
    """Source rows without a watermark: a batch is a watermark interval, so they are in none."""
    sql = f"SELECT count(*) FROM ({source_sql(con, config, project)}) WHERE {quote_ident(config.source.watermark)} IS NULL"
    return int(con.execute(sql).fetchone()[0])


def odd_labels(con: duckdb.DuckDBPyConnection, config: JobConfig, project: Path, where: str) -> tuple[int, list[float]]:
    """(rows matching ``where`` whose label is present but not one the objective takes (binary: 0/1), a few of those values)."""
    label = quote_ident(config.label.column)
    value = objective_of(config.label.objective).odd_value_sql(label)
    sql = (f"SELECT {value} AS v FROM ({source_sql(con, config, project)}) "
           f"WHERE {where} AND {label} IS NOT NULL AND NOT coalesce({labeled(config)}, false)")
    count, values = con.execute(f"SELECT count(*), list(DISTINCT v ORDER BY v)[:5] FROM ({sql})").fetchone()
    return int(count), list(values or [])



def count_rows(con: duckdb.DuckDBPyConnection, config: JobConfig, project: Path, where: str,
               source: str | None = None, repeated: bool | None = None) -> tuple[int, bool]:
    """(rows matching ``where``, whether an (entity id, event time) key occurs twice among them).

    A check over the keys alone spares the common, duplicate-free batch the ranking query, which
    costs more than the rest of the pull (1.5 s vs 0.6 s at 2M rows). ``source``: a SELECT to read
    instead of the job's whole source. ``repeated``: the answer, when the caller knows it already
    (then only the rows are counted)."""
    entity, event = quote_ident(config.source.entity_id), quote_ident(config.source.event_time)
    batch = f"(SELECT * FROM ({source or source_sql(con, config, project)}) WHERE {where})"
    try:  # fetch to the end: an unfinished result blocks the connection
        rows = con.execute(f"SELECT count(*) FROM {batch}").fetchall()[0][0]
        if repeated is None:
            # the key's 64-bit hash, not the key (string ids: 0.29 s vs 0.50 s at 2M rows); a collision
            # (~1e-7 at 2M keys) only sends the batch through the ranking query, which is exact
            keys = f"SELECT hash({entity}, {event}) AS key FROM {batch} WHERE {entity} IS NOT NULL"
            repeated = _sorted_repeats(con, keys) if rows <= SORTED_KEYS else _grouped_repeats(con, keys)
    except duckdb.Error as exc:
        raise DataError(_source_error(config, exc)) from exc
    return rows, repeated


# Batches up to this many rows look for a repeated key by sorting the keys' hashes in memory (8 bytes
# a row: 32 MB at most; 2M rows: 0.03 s and 0.04 CPU-s); larger ones by a GROUP BY in DuckDB, which
# can spill to disk (0.10 s and 0.20 CPU-s at 2M rows; count(DISTINCT) runs out of a small memory_limit).
SORTED_KEYS = 4_000_000


def _sorted_repeats(con: duckdb.DuckDBPyConnection, keys: str) -> bool:
    hashes = con.execute(keys).fetchnumpy()["key"]
    hashes.sort()  # in place: the array is this process's own (a sorted copy would double the 32 MB)
    return bool(np.any(hashes[1:] == hashes[:-1]))


def _grouped_repeats(con: duckdb.DuckDBPyConnection, keys: str) -> bool:
    # under the streaming pass's memory limit: the hash table spills instead of growing with the batch
    # (10M keys: +27 MB of peak RSS in 1.55 s, against +200 MB in 1.91 s under 256MB; a Dask worker's
    # peak grew 534/536 -> 626/642 MB from 10M to 40M rows per night, two shares per worker)
    with _memory_limit_at_most(con, STREAM_MEMORY_LIMIT):
        return bool(con.execute(f"SELECT 1 FROM ({keys}) GROUP BY key HAVING count(*) > 1 LIMIT 1").fetchall())


ValidRows = Callable[[Iterator[pa.RecordBatch], int], None]  # (valid batches, rows pulled in all)


def pull(con: duckdb.DuckDBPyConnection, config: JobConfig, project: Path, where: str, path: Path,
         valid_rows: ValidRows | None = None, columns: dict[str, str] | None = None,
         source: str | None = None, others: str | None = None, repeated: bool | None = None) -> PullResult:
    """Write the checked rows matching ``where`` to the run file ``path`` and summarise them.

    With ``valid_rows``, the run file keeps only the rejected rows (for the quarantine) and the
    valid ones are handed to ``valid_rows`` batch by batch as DuckDB reads them (with the count of
    rows to come, valid or not): a backfill scores them in the same pass instead of writing 2M rows
    to disk and reading them back (0.7-1 s).

    Run files are Arrow IPC: read back once or twice within minutes by this process, so they are
    stored as they are held in memory (writing lz4 Parquet took 2 s more at 2M rows, reading it
    back 0.6 s more per pass). ``columns``: the source's, when the caller has just described it.
    ``source`` / ``others``: a Dask task's share of the files, and the rows of other shares that
    rank against its own (``extract.normalised_sql``); ``repeated``: whether the share holds a key
    twice itself, when the Dask engine's keys step found it (spares grouping every key here: memory
    that grows with the share's rows)."""
    columns = columns or describe_source(con, config, project)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, repeated = count_rows(con, config, project, where, source, repeated)
    sql = normalised_sql(config, source or source_sql(con, config, project), where, columns,
                         dedupe=repeated or others is not None, others=others)
    summary = PullSummary(config)
    try:
        with _streaming(con, config, repeated) if valid_rows is not None else nullcontext():
            reader = con.sql(sql).to_arrow_reader(config.scoring.batch_size)
            with ipc.new_file(str(path), reader.schema) as writer:
                if valid_rows is None:
                    for batch in reader:
                        writer.write_batch(batch)
                        summary.add(batch, split_batch(batch)[0])
                else:
                    valid_rows(_valid_part(reader, writer, summary), rows)
    except duckdb.Error as exc:
        raise DataError(_source_error(config, exc)) from exc
    except OSError as exc:
        if os_errno(exc) is not None:  # writing the run file: a full disk, a read-only tmp/
            raise file_error(exc) from exc
        # DuckDB's own error, raised while Arrow's reader pulls the next batch: it arrives as an OSError
        raise DataError(_source_error(config, exc)) from exc
    return summary.result(path)


# DuckDB memory while a plain scan streams into scoring: it needs none to work, and what it keeps
# is a cache of table blocks the pass will not read again (2M rows: 64MB instead of 256MB saves
# ~120 MB of peak RSS at the same speed)
STREAM_MEMORY_LIMIT = 64 * 2**20


@contextmanager
def _streaming(con: duckdb.DuckDBPyConnection, config: JobConfig, dedupe: bool) -> Iterator[None]:
    """DuckDB settings while its rows are scored as they come: one thread (the model's workers keep
    every core busy already; a second scan thread only reads further ahead: 70 MB more peak RSS at
    2M rows, same speed) and, for a plain scan, a smaller cache. Ranking duplicates or the job's
    feature SQL may need working memory: they keep the configured limit."""
    with ExitStack() as stack:
        stack.enter_context(setting(con, "threads", 1))
        if not dedupe and config.features.sql is None:
            stack.enter_context(_memory_limit_at_most(con, STREAM_MEMORY_LIMIT))
        yield


@contextmanager
def _memory_limit_at_most(con: duckdb.DuckDBPyConnection, most: int) -> Iterator[None]:
    """DuckDB's memory_limit lowered to ``most`` bytes inside the block (never raised)."""
    limit = size_bytes(con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0])
    with setting(con, "memory_limit", f"{most // 2**20}MiB") if limit is not None and limit > most else nullcontext():
        yield


def _valid_part(reader: pa.RecordBatchReader, writer: ipc.RecordBatchFileWriter, summary: PullSummary) -> Iterator[pa.RecordBatch]:
    for batch in reader:
        valid, rejected = split_batch(batch)
        summary.add(batch, valid)
        if rejected.num_rows:
            writer.write_batch(rejected)
        if valid.num_rows:
            yield valid


def register_object_store(con: duckdb.DuckDBPyConnection, location: str | None) -> None:
    """Make ``location``'s object store readable on ``con`` (nothing to do for a local path)."""
    kind = protocol(location or "")
    if kind is None:
        return
    if kind not in OBJECT_STORES:
        raise ConfigError(f"source.parquet {location}: {kind}:// is not supported; use a local path or s3://bucket/prefix/*.parquet")
    if con.filesystem_is_registered("s3"):
        return
    try:
        import s3fs
    except ImportError as exc:
        raise ConfigError(f"source.parquet {location} needs s3fs: pip install 'batchml[dask]' (or s3fs)") from exc
    # fresh instances: s3fs caches one per options, and a cached one may belong to a closed event loop
    con.register_filesystem(s3fs.S3FileSystem(skip_instance_cache=True, **storage_options()))


def source_files(con: duckdb.DuckDBPyConnection, location: str) -> list[str]:
    """The files a Parquet location (path, glob or URL) names, as DuckDB's reader would read them, in order."""
    return [row[0] for row in con.execute(f"SELECT file FROM glob({quote_literal(location)}) ORDER BY file").fetchall()]


def row_group_watermarks(con: duckdb.DuckDBPyConnection, files: list[str], watermark: str,
                         trusted_types: tuple[str, ...]) -> list[tuple[str, int, datetime | None, datetime | None]]:
    """One ``(file, rows, min, max)`` per row group, from the footers only, in file and row-group order.
    min/max are the watermark column's statistics where the file stores it as one of
    ``trusted_types`` (else None: the row group may hold anything)."""
    listed = "[" + ", ".join(quote_literal(f) for f in files) + "]"
    wm = quote_literal(watermark)
    types = "(" + ", ".join(quote_literal(t) for t in trusted_types) + ")"
    rows = con.execute(f"""
        WITH typed AS (SELECT file_name, name FROM parquet_schema({listed}) WHERE name = {wm} AND duckdb_type IN {types})
        SELECT m.file_name, m.row_group_id, any_value(m.row_group_num_rows),
               max(try_cast(m.stats_min_value AS TIMESTAMP)) FILTER (WHERE t.name IS NOT NULL),
               max(try_cast(m.stats_max_value AS TIMESTAMP)) FILTER (WHERE t.name IS NOT NULL)
        FROM parquet_metadata({listed}) m LEFT JOIN typed t ON t.file_name = m.file_name AND t.name = m.path_in_schema
        GROUP BY ALL ORDER BY m.file_name, m.row_group_id""").fetchall()
    return [(file, count, low, high) for file, _, count, low, high in rows]


INTEGER_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT")


def row_group_ranges(con: duckdb.DuckDBPyConnection, files: list[str], column: str) -> dict[str, list[tuple]]:
    """Per file, one ``(rows, min, max)`` of ``column`` per row group in order, from the footers only:
    integers as ints, strings as str (ordered as Parquet orders them, by UTF-8 bytes); min and max
    None where the file stores no exact statistics of it (the row group may hold anything)."""
    listed = "[" + ", ".join(quote_literal(f) for f in files) + "]"
    name = quote_literal(column)
    integers = "(" + ", ".join(quote_literal(t) for t in INTEGER_TYPES) + ")"
    rows = con.execute(f"""
        WITH typed AS (SELECT file_name, name, duckdb_type IN {integers} AS whole FROM parquet_schema({listed})
                       WHERE name = {name} AND (duckdb_type IN {integers} OR duckdb_type = 'VARCHAR')),
             exact AS (SELECT m.file_name, m.row_group_id, t.whole, m.stats_min_value AS low, m.stats_max_value AS high
                       FROM parquet_metadata({listed}) m JOIN typed t ON t.file_name = m.file_name AND t.name = m.path_in_schema
                       WHERE m.min_is_exact AND m.max_is_exact)
        SELECT g.file_name, g.row_group_id, g.rows, e.whole, e.low, e.high
        FROM (SELECT DISTINCT file_name, row_group_id, row_group_num_rows AS rows FROM parquet_metadata({listed})) g
        LEFT JOIN exact e USING (file_name, row_group_id) ORDER BY g.file_name, g.row_group_id""").fetchall()
    groups: dict[str, list[tuple]] = {}
    for file, _, count, whole, low, high in rows:
        if low is None or high is None:
            low = high = None
        elif whole:
            low, high = int(low), int(high)
        groups.setdefault(file, []).append((count, low, high))
    return groups
