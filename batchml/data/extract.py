"""Incremental, point-in-time pulls from the source into run files (Arrow IPC in the run's scratch folder).

A nightly batch is the half-open watermark interval ``[previous watermark, as_of)``: every row lands
in exactly one batch, whatever the timing of runs. Rows are pulled once, checked against the data
contract (``validate``) in the same query and written to a run file, so the warehouse is held only for
the seconds the pull takes; later steps read the file.

Normalised column names used by every later step (the source's own names never clash with them):
``__entity``, ``__event_time``, ``__watermark``, ``__label``, ``__label_at``, the features under
their own names (numeric as DOUBLE, categorical as VARCHAR), ``__rule``, ``__reason``, ``__record``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import ipc

from batchml.config import BATCHML_SCHEMA, SCORE_SUFFIXES, JobConfig, config_dir, feature_sql, job_names, load_job_config, unknown_feature_names
from batchml.data.sources import parquet_location, register_object_store
from batchml.errors import ConfigError, DataError, WarehouseError, did_you_mean, file_error, os_errno
from batchml.data.validate import CUTOFF, reason_sql, utc_timestamp
from batchml.storage.warehouse import is_restricted, quote_ident, quote_literal, quote_table, restrict_external_access, setting, size_bytes

ENTITY, EVENT_TIME, WATERMARK, LABEL, LABEL_AT = "__entity", "__event_time", "__watermark", "__label", "__label_at"
RULE, REASON, RECORD = "__rule", "__reason", "__record"


def ts_literal(value: datetime) -> str:
    """A TIMESTAMP literal for a naive-UTC datetime (COPY cannot take bound parameters)."""
    return f"TIMESTAMP '{value.strftime('%Y-%m-%d %H:%M:%S.%f')}'"




def set_cutoff(con: duckdb.DuckDBPyConnection, as_of: datetime) -> None:
    con.execute(f"SET VARIABLE batchml_as_of = {ts_literal(as_of)}")


def raw_sql(config: JobConfig, project: Path) -> str:
    """SELECT * over the job's source itself: its table, or its Parquet files."""
    if config.source.table:
        return f"SELECT * FROM {quote_table(config.source.table)}"
    location = parquet_location(config.source.parquet, project)
    return f"SELECT * FROM read_parquet({quote_literal(location)}, union_by_name = true)"


def job_directories(config: JobConfig, project: Path) -> list[Path]:
    """The folders a job's queries may read: that of ``source.parquet`` up to its first wildcard
    (none for a table source). Everything else on the machine is out of reach (:func:`restrict`)."""
    if not config.source.parquet:
        return []
    pattern = Path(config.source.parquet)
    pattern = pattern if pattern.is_absolute() else project / pattern
    fixed = []
    for part in pattern.parts:
        if any(char in part for char in "*?[{"):
            break
        fixed.append(part)
    base = Path(*fixed)
    return [base if base != pattern else pattern.parent]


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
    sql = f"WITH source AS ({_as_of_cutoff(con, config, raw)}) SELECT * FROM (\n{derived}\n)"
    _one_select(sql, config)
    return sql


def _as_of_cutoff(con: duckdb.DuckDBPyConnection, config: JobConfig, raw: str) -> str:
    """``raw`` as the run's cut-off saw it: rows landed before it, labels known before it. Feature
    SQL aggregates over ``source`` (windows, target encodings): without this it would read rows and
    labels from after the cut-off, and a replay would score differently from the night itself."""
    columns = _raw_columns(con, config, raw)
    wm, label, known = config.source.watermark, config.label.column, config.label.available_at
    where = f" WHERE try_cast({quote_ident(wm)} AS TIMESTAMP) < {CUTOFF}" if wm in columns else ""
    masked = (f" REPLACE (CASE WHEN try_cast({quote_ident(known)} AS TIMESTAMP) < {CUTOFF} THEN {quote_ident(label)} END "
              f"AS {quote_ident(label)})" if label in columns and known in columns else "")
    return f"SELECT *{masked} FROM ({raw}){where}"


def _raw_columns(con: duckdb.DuckDBPyConnection, config: JobConfig, raw: str) -> set[str]:
    try:
        return {row[0] for row in con.execute(f"DESCRIBE {raw}").fetchall()}
    except duckdb.Error as exc:
        raise DataError(_source_error(config, exc)) from exc


def uncut_columns(con: duckdb.DuckDBPyConnection, config: JobConfig, project: Path) -> list[str]:
    """The watermark / label / available_at columns that feature SQL derives rather than reads from
    the source: ``source`` cannot be cut off at the run's cut-off by them (see :func:`_as_of_cutoff`)."""
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


def source_label(config: JobConfig) -> str:
    return config.source.table or config.source.parquet


def required_columns(config: JobConfig) -> list[str]:
    src, label = config.source, config.label
    return list(dict.fromkeys([src.entity_id, src.event_time, src.watermark, label.column, label.available_at, *config.features.all]))


def describe_source(con: duckdb.DuckDBPyConnection, config: JobConfig, project: Path) -> dict[str, str]:
    """Column name -> DuckDB type of the source; a missing required column, or a time or label
    column of the wrong type, is a clear error."""
    try:
        sql = source_sql(con, config, project)
        described = con.execute(f"DESCRIBE {sql}").fetchall()
    except duckdb.Error as exc:
        raise DataError(_source_error(config, exc)) from exc
    columns = {row[0]: row[1] for row in described}
    clashing = [c for c in columns if c.startswith("__")]
    if clashing:  # batchml's own columns in a pull are named so; a source column of that name would be taken for one
        raise DataError(f"{_what_is_read(config)} has column(s) {', '.join(clashing)} (job {config.job}): names starting with "
                        f"__ are batchml's own; rename them in the source, or leave them out with features.sql")
    missing = [c for c in required_columns(config) if c not in columns]
    if missing:
        named = ", ".join(f"{name}{did_you_mean(name, columns)}" for name in missing)
        raise DataError(f"{_what_is_read(config)} has no column {named} (job {config.job}); {_fix_columns(config)}")
    for section, names in unknown_feature_names(config).items():  # the typo was in the validation key, then
        named = ", ".join(f"{name!r}{did_you_mean(name, config.features.all)}" for name in names)
        raise ConfigError(f"configs/{config.job}.yaml: {section} names {named}, which is not a feature; fix the key")
    wrong = [f"{name} ({role}) is {columns[name]}, not {kinds}" for name, role, kinds, ok in _typed_columns(config)
             if not ok(columns[name].upper())]
    if wrong:
        raise DataError(f"{_what_is_read(config)}: {'; '.join(wrong)} (job {config.job}); {_fix_columns(config)}")
    return columns


def _is_time(duckdb_type: str) -> bool:
    return duckdb_type.startswith(("TIMESTAMP", "DATE"))


def _is_timestamp(duckdb_type: str) -> bool:
    return duckdb_type.startswith("TIMESTAMP")


def _is_label(duckdb_type: str) -> bool:
    return duckdb_type in {"BOOLEAN", "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
                           "UINTEGER", "UBIGINT", "FLOAT", "DOUBLE"} or duckdb_type.startswith("DECIMAL")


def _typed_columns(config: JobConfig):
    """(column, its role, the types it needs, a test of its DuckDB type) for the columns batchml
    compares with cut-offs in SQL or counts as outcomes: a wrong type there pulls or trains nothing,
    silently, so it is refused up front. (The event time may be text: each row is cast, and a row
    whose value is not a timestamp is quarantined.) A DATE watermark is refused too: a row landing
    later on the day of a run carries that day's date, which is already behind the watermark."""
    src, label = config.source, config.label
    return [
        (src.watermark, "source.watermark", "a TIMESTAMP (a DATE loses the rows landing after a run on its day)", _is_timestamp),
        (label.available_at, "label.available_at", "a TIMESTAMP or DATE", _is_time),
        (label.column, "label.column", "a number or BOOLEAN (1/true = positive)", _is_label),
    ]


def _what_is_read(config: JobConfig) -> str:
    if config.features.sql:
        return f"the SELECT in {config.features.sql} (over source {source_label(config)})"
    return f"source {source_label(config)}"


def _fix_columns(config: JobConfig) -> str:
    if config.features.sql:
        return f"fix the SELECT in {config.features.sql} or configs/{config.job}.yaml"
    return f"add or cast it in the source (or derive it with features.sql), or fix configs/{config.job}.yaml"


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


def record_json(columns: dict[str, str]) -> str:
    """JSON of a raw source row from its columns (name -> DuckDB type; names come from the source,
    so quote them all). Strict JSON: a non-finite float is written as a string ("inf", "nan"), where
    DuckDB would write the bare tokens Infinity / NaN that jq or Postgres refuse."""
    def value(name: str, kind: str) -> str:
        column = quote_source_column(name)
        if kind.upper() in ("DOUBLE", "FLOAT", "REAL"):
            return f"CASE WHEN isfinite({column}) OR {column} IS NULL THEN to_json({column}) ELSE to_json(CAST({column} AS VARCHAR)) END"
        return column

    fields = ", ".join(f"{quote_literal(name)}: {value(name, kind)}" for name, kind in columns.items())
    return f"to_json({{{fields}}})"


def quote_source_column(name: str) -> str:
    """Quote a column name read from the source itself (not from config): any text, escaped."""
    return '"' + name.replace('"', '""') + '"'


def normalised_sql(con: duckdb.DuckDBPyConnection, config: JobConfig, project: Path, where: str,
                   columns: dict[str, str] | None = None, dedupe: bool = True) -> str:
    """The source under batchml's column names, filtered by ``where`` (on raw columns), with the
    contract's verdict per row and the raw record (JSON of ``columns``) of every rejected row; the
    record is built only for rejected rows (a struct of every row would cost as much as the pull).
    ``columns`` (name -> DuckDB type, :func:`describe_source`) name the record's fields and spare
    the checks the source's types rule out (``validate.rule_cases``); the reason text too is built
    only for rejected rows.

    A row is identified by (entity id, event time): the same entity at another event time (a
    customer's weekly snapshot) is another row. With ``dedupe``, duplicate keys are found with an
    aggregate over the keys alone, and only the rows of duplicated keys are ranked (latest watermark
    first, ties broken by a hash of the row): a window over every row would hold the whole batch in
    memory, which then grows with the batch. ``dedupe=False`` is for a batch known to hold no
    duplicate keys (:func:`count_rows`).
    """
    src, label = config.source, config.label
    entity, wm, event = quote_ident(src.entity_id), quote_ident(src.watermark), quote_ident(src.event_time)
    rule, reason = reason_sql(config, columns)
    features = [f"{_as_double(n)} AS {quote_ident(n)}" for n in config.features.numeric]
    features += [f"CAST({quote_ident(n)} AS VARCHAR) AS {quote_ident(n)}" for n in config.features.categorical]
    watermark = f"try_cast({wm} AS TIMESTAMP)"
    tiebreak = f"hash({', '.join(quote_ident(c) for c in required_columns(config))})"
    ranked = "SELECT *, 1 AS __rank FROM pulled"
    if dedupe:
        # IS NOT DISTINCT FROM: a null event time is its own rule, but two such rows are still one key
        same_key = f"d.__id = p.{entity} AND d.__at IS NOT DISTINCT FROM p.{event}"
        ranked = f"""
            SELECT *, 1 AS __rank FROM pulled p WHERE NOT EXISTS (SELECT 1 FROM dups d WHERE {same_key})
            UNION ALL BY NAME
            SELECT *, row_number() OVER (PARTITION BY {entity}, {event} ORDER BY {watermark} DESC NULLS LAST, {tiebreak}) AS __rank
            FROM pulled p WHERE EXISTS (SELECT 1 FROM dups d WHERE {same_key})"""
    dups = (f"dups AS (SELECT {entity} AS __id, {event} AS __at FROM pulled WHERE {entity} IS NOT NULL GROUP BY ALL "
            f"HAVING count(*) > 1),") if dedupe else ""
    return f"""
        WITH src AS ({source_sql(con, config, project)}),
        pulled AS (SELECT * FROM src WHERE {where}),
        {dups}
        ranked AS ({ranked}),
        checked AS (SELECT *, {rule} AS __rule0 FROM ranked),
        verdict AS (
            SELECT *,
                   CASE WHEN __rule0 IS NULL AND __rank > 1 THEN 'duplicate' ELSE __rule0 END AS {RULE},
                   CASE WHEN __rule0 IS NOT NULL THEN {reason}
                        WHEN __rank > 1 THEN 'duplicate ({src.entity_id}, {src.event_time}) in batch; a row with a later {src.watermark} supersedes it'
                        END AS {REASON}
            FROM checked
        )
        SELECT {entity} AS {ENTITY},
               {utc_timestamp(src.event_time)} AS {EVENT_TIME},
               {watermark} AS {WATERMARK},
               try_cast({quote_ident(label.column)} AS INTEGER) AS {LABEL},
               try_cast({quote_ident(label.available_at)} AS TIMESTAMP) AS {LABEL_AT},
               {", ".join(features)},
               {RULE}, {REASON},
               CASE WHEN {RULE} IS NOT NULL THEN {record_json(columns or dict.fromkeys(required_columns(config), ""))} END AS {RECORD}
        FROM verdict
    """


def _as_double(name: str) -> str:
    return f"try_cast({quote_ident(name)} AS DOUBLE)"


def batch_filter(config: JobConfig, watermark_from: datetime | None, as_of: datetime) -> str:
    """Rows that landed in ``[watermark_from, as_of)``."""
    wm = f"try_cast({quote_ident(config.source.watermark)} AS TIMESTAMP)"
    lower = f" AND {wm} >= {ts_literal(watermark_from)}" if watermark_from else ""
    return f"{wm} < {ts_literal(as_of)}{lower}{_partition_filter(config, watermark_from, as_of)}"


def _partition_filter(config: JobConfig, watermark_from: datetime | None, as_of: datetime) -> str:
    """The hive folders that can hold rows landed in ``[watermark_from, as_of)`` (a folder holds one
    UTC day of watermarks): DuckDB skips the other files without opening them. (Row groups are
    skipped by their watermark statistics anyway: the watermark test above reaches the Parquet scan.)"""
    key = config.source.watermark_partition
    if key is None:
        return ""
    day = f"CAST({quote_ident(key)} AS DATE)"
    lower = f" AND {day} >= DATE '{watermark_from:%Y-%m-%d}'" if watermark_from else ""
    return f" AND {day} <= DATE '{as_of:%Y-%m-%d}'{lower}"


def event_range_filter(config: JobConfig, start: datetime, end: datetime, as_of: datetime) -> str:
    """Rows whose event time is in ``[start, end)`` and that had landed before ``as_of``."""
    event = utc_timestamp(config.source.event_time)
    wm = f"try_cast({quote_ident(config.source.watermark)} AS TIMESTAMP)"
    return f"{event} >= {ts_literal(start)} AND {event} < {ts_literal(end)} AND {wm} < {ts_literal(as_of)}"


def labeled(config: JobConfig) -> str:
    """A row counts as labeled when its label is 0 or 1 (or false / true): anything else (-1 for
    "unknown", NaN, 2) is left out of training and of realised performance, and reported."""
    return f"try_cast({quote_ident(config.label.column)} AS DOUBLE) IN (0, 1)"


def odd_labels(con: duckdb.DuckDBPyConnection, config: JobConfig, project: Path, where: str) -> tuple[int, list[float]]:
    """(rows matching ``where`` whose label is present but not 0/1, a few of those values)."""
    label = quote_ident(config.label.column)
    sql = (f"SELECT try_cast({label} AS DOUBLE) AS v FROM ({source_sql(con, config, project)}) "
           f"WHERE {where} AND {label} IS NOT NULL AND NOT coalesce({labeled(config)}, false)")
    count, values = con.execute(f"SELECT count(*), list(DISTINCT v ORDER BY v)[:5] FROM ({sql})").fetchone()
    return int(count), list(values or [])


def training_filter(config: JobConfig, as_of: datetime, *, labeled_only: bool = True) -> str:
    """Labeled rows a model trained at ``as_of`` may see: landed and labeled before the cut-off,
    event time within the training window (``labeled_only=False``: whatever their label value)."""
    src, label = config.source, config.label
    start = as_of - timedelta(days=config.training.window_days)
    return (
        f"try_cast({quote_ident(src.watermark)} AS TIMESTAMP) < {ts_literal(as_of)}"
        f" AND try_cast({quote_ident(label.available_at)} AS TIMESTAMP) < {ts_literal(as_of)}"
        f" AND {utc_timestamp(src.event_time)} >= {ts_literal(start)}"
        f" AND {utc_timestamp(src.event_time)} <= {ts_literal(as_of)}"  # a later one is quarantined, never trained on
        + (f" AND {labeled(config)}" if labeled_only else "")
    )


@dataclass
class PullResult:
    path: Path
    rows: int
    by_rule: dict[str, int]
    null_fractions: dict[str, float]
    watermark_max: datetime | None


def count_rows(con: duckdb.DuckDBPyConnection, config: JobConfig, project: Path, where: str) -> tuple[int, bool]:
    """(rows matching ``where``, whether an (entity id, event time) key occurs twice among them).

    An aggregate over the ids alone (0.15 s for 2M rows; a GROUP BY, which DuckDB can spill to
    disk, where count(DISTINCT) runs out of memory under a small ``memory_limit``) spares the
    common, duplicate-free batch the ranking query, which costs more than the rest of the pull
    (1.5 s vs 0.6 s at 2M rows)."""
    entity, event = quote_ident(config.source.entity_id), quote_ident(config.source.event_time)
    batch = f"(SELECT * FROM ({source_sql(con, config, project)}) WHERE {where})"
    try:  # fetch to the end: an unfinished result blocks the connection
        rows = con.execute(f"SELECT count(*) FROM {batch}").fetchall()[0][0]
        repeated = con.execute(f"SELECT 1 FROM {batch} WHERE {entity} IS NOT NULL GROUP BY {entity}, {event} "
                               f"HAVING count(*) > 1 LIMIT 1").fetchall()
    except duckdb.Error as exc:
        raise DataError(_source_error(config, exc)) from exc
    return rows, bool(repeated)


ValidRows = Callable[[Iterator[pa.RecordBatch], int], None]  # (valid batches, rows pulled in all)


def pull(con: duckdb.DuckDBPyConnection, config: JobConfig, project: Path, where: str, path: Path,
         valid_rows: ValidRows | None = None, columns: dict[str, str] | None = None) -> PullResult:
    """Write the checked rows matching ``where`` to the run file ``path`` and summarise them.

    With ``valid_rows``, the run file keeps only the rejected rows (for the quarantine) and the
    valid ones are handed to ``valid_rows`` batch by batch as DuckDB reads them (with the count of
    rows to come, valid or not): a backfill scores them in the same pass instead of writing 2M rows
    to disk and reading them back (0.7-1 s).

    Run files are Arrow IPC: read back once or twice within minutes by this process, so they are
    stored as they are held in memory (writing lz4 Parquet took 2 s more at 2M rows, reading it
    back 0.6 s more per pass). ``columns``: the source's, when the caller has just described it."""
    columns = columns or describe_source(con, config, project)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, repeated = count_rows(con, config, project, where)
    sql = normalised_sql(con, config, project, where, columns, dedupe=repeated)
    summary = _Summary(config)
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
        limit = size_bytes(con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0])
        if not dedupe and config.features.sql is None and limit is not None and limit > STREAM_MEMORY_LIMIT:
            stack.enter_context(setting(con, "memory_limit", f"{STREAM_MEMORY_LIMIT // 2**20}MiB"))
        yield


def _valid_part(reader: pa.RecordBatchReader, writer: ipc.RecordBatchFileWriter, summary: _Summary) -> Iterator[pa.RecordBatch]:
    for batch in reader:
        valid, rejected = split_batch(batch)
        summary.add(batch, valid)
        if rejected.num_rows:
            writer.write_batch(rejected)
        if valid.num_rows:
            yield valid


def _missing(column: pa.Array) -> int:
    """Nulls, and NaN in a float column: both are missing values to the model (and to max_null_fraction)."""
    nan = pc.sum(pc.is_nan(column)).as_py() if pa.types.is_floating(column.type) else 0
    return column.null_count + (nan or 0)


class _Summary:
    """Counts per rule, null shares of the valid rows and the latest watermark, batch by batch."""

    def __init__(self, config: JobConfig) -> None:
        self.rows = 0
        self.valid = 0
        self.by_rule: Counter[str] = Counter()
        self.nulls = dict.fromkeys(config.validation.max_null_fraction or {}, 0)
        self.watermark_max: datetime | None = None

    def add(self, batch: pa.RecordBatch, valid: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        latest = pc.max(batch.column(WATERMARK)).as_py()  # over every pulled row, rejected ones too
        if latest is not None and (self.watermark_max is None or latest > self.watermark_max):
            self.watermark_max = latest
        rule = batch.column(RULE)
        if rule.null_count < len(rule):
            counts = pc.value_counts(rule.drop_null())
            self.by_rule.update(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))
        self.valid += valid.num_rows
        for name in self.nulls:
            self.nulls[name] += _missing(valid.column(name))

    def result(self, path: Path) -> PullResult:
        shares = {name: count / self.valid if self.valid else 0.0 for name, count in self.nulls.items()}
        return PullResult(path, self.rows, dict(self.by_rule), shares, self.watermark_max)


# --------------------------------------------------------------------------------------------
# Run files: written by the steps, read back batch by batch
# --------------------------------------------------------------------------------------------


def split_batch(batch: pa.RecordBatch) -> tuple[pa.RecordBatch, pa.RecordBatch]:
    """(valid rows, rejected rows) of a pulled batch; no copy when all of it is one or the other."""
    rule = batch.column(RULE)
    if rule.null_count == len(rule):
        return batch, batch.slice(0, 0)
    if rule.null_count == 0:
        return batch.slice(0, 0), batch
    return batch.filter(pc.is_null(rule)), batch.filter(pc.is_valid(rule))


def run_file_batches(path: Path, *, valid: bool | None = True) -> Iterator[pa.RecordBatch]:
    """The batches of a run file: its valid rows (``valid=True``), its rejected rows (``False``) or all
    (``None``). Read batch by batch (not memory-mapped), so memory stays bounded by the batch size."""
    with pa.OSFile(str(path)) as source:
        reader = ipc.open_file(source)
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            if valid is not None:
                batch = split_batch(batch)[0 if valid else 1]
            if batch.num_rows:
                yield batch


def write_run_file(batches: Iterable[pa.RecordBatch], path: Path) -> int:
    """Stream batches into one Arrow IPC run file; returns the row count (no file when there are none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    rows = 0
    try:
        for batch in batches:
            if writer is None:
                writer = ipc.new_file(str(path), batch.schema)
            writer.write_batch(batch)
            rows += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows


def run_file_schema(path: Path) -> pa.Schema:
    with pa.OSFile(str(path)) as source:
        return ipc.open_file(source).schema


def read_run_file(path: Path, *, valid: bool | None = True) -> pa.Table:
    """A whole run file (or its valid / rejected rows) as one table."""
    return pa.Table.from_batches(list(run_file_batches(path, valid=valid)), schema=run_file_schema(path))


def run_file_reader(path: Path) -> pa.RecordBatchReader:
    """Every row of a run file as a one-pass reader (DuckDB can scan it without a copy of the file)."""
    return pa.RecordBatchReader.from_batches(run_file_schema(path), run_file_batches(path, valid=None))
