"""The only module that talks to DuckDB: connections, migrations, transactions, identifier quoting.

DuckDB allows one writing process per file and refuses it while any other process holds the file,
even read-only. batchml therefore opens the warehouse only for short steps (pull a batch, commit a
run) and retries with backoff when an analyst's session holds the file, failing after a bound with
the holder's pid. Analysts should read the published Parquet catalog instead (see ``publish``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import duckdb

from batchml.config import check_identifier, check_qualified
from batchml.errors import WarehouseError

log = logging.getLogger(__name__)
LOCK_PATTERN = re.compile(r"Conflicting lock is held in (?P<holder>.*?) \(PID (?P<pid>\d+)\)")
DEFAULT_LOCK_TIMEOUT = 60.0
# New files are written in a storage format DuckDB 1.5 can read, so analysts can open them with the
# DuckDB CLI from PyPI (duckdb-cli 1.5.6 refuses the 2.0 format: "version number 69 ... 64 and 68").
STORAGE_COMPATIBILITY = "v1.5.0"


def quote_ident(name: str) -> str:
    """Validate a config identifier and quote it for SQL: ``epss`` -> ``"epss"``."""
    check_identifier(name)
    return f'"{name}"'


def quote_table(name: str) -> str:
    """Validate and quote ``schema.table`` (or ``table``)."""
    check_qualified(name)
    return ".".join(f'"{part}"' for part in name.split("."))


def quote_literal(value: str) -> str:
    """A SQL string literal (for paths in read_parquet / COPY, which cannot take parameters)."""
    return "'" + str(value).replace("'", "''") + "'"


def _holder(exc: Exception) -> str:
    match = LOCK_PATTERN.search(str(exc))
    return f"process {match['pid']} ({match['holder'].strip()})" if match else "another process"


def _lock_message(path: Path, exc: Exception) -> str:
    holder = _holder(exc)
    advice = "" if path.name == "catalog.duckdb" else " (analysts: query warehouse/catalog.duckdb instead)"
    return f"{path.name} at {path} is held by {holder}; close that session{advice} or wait for it to finish"


def _is_lock_conflict(exc: Exception) -> bool:
    return "Conflicting lock" in str(exc) or "Could not set lock" in str(exc)


def open_connection(
    path: Path,
    *,
    read_only: bool = False,
    memory_limit: str = "256MB",
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> duckdb.DuckDBPyConnection:
    """Open the warehouse, retrying with backoff while another process holds its lock."""
    if read_only and not path.exists():
        raise WarehouseError(f"warehouse {path} does not exist; run `batchml demo` or a first `batchml run` to create it")
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"memory_limit": memory_limit, **NO_DOWNLOADS}
    if not path.exists():
        config["storage_compatibility_version"] = STORAGE_COMPATIBILITY
    started = time.monotonic()
    deadline = started + lock_timeout
    delay = 0.05
    waited = False
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only, config=config)
            break
        except duckdb.Error as exc:
            if not _is_lock_conflict(exc):
                raise WarehouseError(f"cannot open warehouse {path}: {_first_line(exc)}") from exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WarehouseError(_lock_message(path, exc)) from exc
            if not waited:  # said once: a run that seems to hang is waiting for someone
                log.warning("%s is held by %s; waiting up to %.0f s for it (BATCHML_LOCK_TIMEOUT)", path.name, _holder(exc),
                            lock_timeout)
                waited = True
            time.sleep(min(delay, remaining))  # the last try lands on the deadline, not before it
            delay = min(delay * 2, 2.0)
    if waited:
        log.info("%s: opened after waiting %.1f s", path.name, time.monotonic() - started)
    _session_settings(con)
    return con


def readable_by_duckdb_15(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the open file's storage format is one the DuckDB 1.5 CLI reads (``storage_version``
    ``v1.5.0+`` or older): a file created without ``storage_compatibility_version`` is ``v2.0.0+``."""
    tags = con.execute("SELECT tags FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    version = ((tags or [{}])[0] or {}).get("storage_version", "")
    found = re.match(r"v(\d+)\.(\d+)", version)
    return found is None or (int(found[1]), int(found[2])) <= (1, 5)


def storage_fix(path: Path) -> str:
    """How to rewrite a warehouse in the format the DuckDB 1.5 CLI reads (batchml's own files already are)."""
    return (f"{path.name} is in DuckDB's 2.0 storage format, which the DuckDB 1.5 CLI (duckdb-cli) cannot open; create it with "
            f"config={{'storage_compatibility_version': '{STORAGE_COMPATIBILITY}'}}, or copy it once: ATTACH 'new.duckdb' AS new "
            f"(STORAGE_VERSION '{STORAGE_COMPATIBILITY}'); COPY FROM DATABASE {path.stem} TO new; then use new.duckdb")


@contextmanager
def connect(path: Path, **kwargs) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived connection, closed on exit; DuckDB errors become :class:`WarehouseError`."""
    con = open_connection(path, **kwargs)
    try:
        yield con
    except duckdb.Error as exc:
        raise WarehouseError(f"warehouse {path}: {_first_line(exc)}") from exc
    finally:
        con.close()


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN … COMMIT, rolled back on any error: everything inside lands together or not at all."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


@contextmanager
def registered(con: duckdb.DuckDBPyConnection, name: str, data) -> Iterator[str]:
    """``data`` (an Arrow table or reader) queryable as ``name`` inside the block."""
    con.register(name, data)
    try:
        yield name
    except BaseException:
        with suppress(duckdb.Error):  # an aborted transaction refuses this too: keep the real error
            con.unregister(name)
        raise
    con.unregister(name)


@contextmanager
def setting(con: duckdb.DuckDBPyConnection, name: str, value: str | int | bool) -> Iterator[None]:
    """A DuckDB setting changed for the statements inside, then put back as it was (as DuckDB prints
    it: a memory size to 0.1 MiB, rounded down). Settings such as ``threads`` are the database's, not the cursor's."""
    check_identifier(name, "DuckDB setting")
    before = con.execute("SELECT current_setting(?)", [name]).fetchall()[0][0]
    con.execute(f"SET {name} = {_setting_literal(value)}")
    try:
        yield
    except BaseException:
        # the statement inside failed: inside a transaction DuckDB now refuses even the SET that
        # restores the setting ("transaction is aborted"), which must not replace the real error
        with suppress(duckdb.Error):
            con.execute(f"SET {name} = {_setting_literal(before)}")
        raise
    con.execute(f"SET {name} = {_setting_literal(before)}")


def _setting_literal(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(int(value)) if isinstance(value, int) else quote_literal(str(value))


def size_bytes(size: str) -> int | None:
    """DuckDB's spelling of a memory size ('256.0 MiB') in bytes; None when it is not one."""
    units = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    number, _, unit = str(size).partition(" ")
    try:
        return int(float(number) * units[unit])
    except (KeyError, ValueError):
        return None


# batchml needs only DuckDB's built-in extensions (parquet, json, icu): a query that names another
# (read_csv('https://...') wants httpfs) fails instead of downloading and loading code
NO_DOWNLOADS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}


def _session_settings(con: duckdb.DuckDBPyConnection) -> None:
    """What every batchml session sets once open (the Parquet setting exists once parquet is loaded)."""
    con.execute("SET TimeZone = 'UTC'")
    # DuckDB 2.0's Parquet prefetching reads a row group's column chunks into one buffer before
    # decoding: a 1M-row row group (pyarrow's default) of 35 doubles asks for 293 MiB at once and
    # fails under the default 256MB limit, and under the 64 MiB the one-pass scan runs with. Without
    # it that file streams at 64 MiB, faster here too (0.35-0.41 s vs 0.60-0.69 s, one thread).
    con.execute("LOAD parquet")  # built in: loading it downloads nothing
    con.execute("SET disable_parquet_prefetching = true")


def restrict_external_access(con: duckdb.DuckDBPyConnection, directories: list[Path]) -> None:
    """From now on this database reads and writes no file outside ``directories`` (and the database
    itself): for connections that run a job's SQL. DuckDB cannot turn external access back on while
    the database is open, so a SELECT cannot undo it. Python replacement scans (a query naming a
    variable of the calling Python code) are turned off too. Idempotent on one open database."""
    if is_restricted(con):
        return  # already restricted (the same database, opened again inside the block)
    allowed = ", ".join(quote_literal(str(directory).rstrip("/") + "/") for directory in directories)
    con.execute(f"SET allowed_directories = [{allowed}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET python_enable_replacements = false")


def is_restricted(con: duckdb.DuckDBPyConnection) -> bool:
    return con.execute("SELECT current_setting('enable_external_access')").fetchone()[0] is False


def memory_connection(memory_limit: str = "256MB", threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB for scratch work (reading run files) that never touches the warehouse lock."""
    config: dict[str, object] = {"memory_limit": memory_limit, **NO_DOWNLOADS}
    if threads:
        config["threads"] = threads
    con = duckdb.connect(":memory:", config=config)
    _session_settings(con)
    return con


def memory_limit_problem(size: str) -> str | None:
    """Why DuckDB refuses ``size`` as a memory limit, or None when it takes it (4G, 512mb, 50 %, ...).

    DuckDB is the judge of what it takes: ~13 ms, for a value set by hand only."""
    try:
        duckdb.connect(config={"memory_limit": size}).close()
    except duckdb.Error as exc:
        return _first_line(exc)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Migrations: append only. Each entry runs once, in order, recorded in batchml.schema_version.
# ---------------------------------------------------------------------------------------------

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE SCHEMA IF NOT EXISTS batchml;
        CREATE SCHEMA IF NOT EXISTS scores;
        CREATE TABLE batchml.runs (
            run_id VARCHAR NOT NULL, job VARCHAR NOT NULL, kind VARCHAR NOT NULL, status VARCHAR NOT NULL,
            as_of TIMESTAMP, started_at TIMESTAMP, finished_at TIMESTAMP,
            rows_extracted BIGINT DEFAULT 0, rows_quarantined BIGINT DEFAULT 0, rows_scored BIGINT DEFAULT 0,
            champion_version INTEGER, challenger_version INTEGER, promoted BOOLEAN, error VARCHAR,
            watermark_from TIMESTAMP, watermark_to TIMESTAMP, dataset_drift BOOLEAN,
            triggers VARCHAR, timings VARCHAR,
            extract_seconds DOUBLE, validate_seconds DOUBLE, drift_seconds DOUBLE, train_seconds DOUBLE,
            evaluate_seconds DOUBLE, score_seconds DOUBLE, commit_seconds DOUBLE, total_seconds DOUBLE,
            pid INTEGER, host VARCHAR, actor VARCHAR, note VARCHAR
        );
        CREATE TABLE batchml.models (
            job VARCHAR NOT NULL, version INTEGER NOT NULL, status VARCHAR NOT NULL,
            created_at TIMESTAMP, run_id VARCHAR, train_start TIMESTAMP, train_end TIMESTAMP,
            train_rows BIGINT, holdout_rows BIGINT, metrics VARCHAR, params VARCHAR,
            artifact_path VARCHAR, sha256 VARCHAR, manifest_sha256 VARCHAR, promoted_at TIMESTAMP
        );
        CREATE TABLE batchml.model_events (
            job VARCHAR NOT NULL, version INTEGER, event VARCHAR NOT NULL, run_id VARCHAR,
            reason VARCHAR, metrics VARCHAR, actor VARCHAR, recorded_at TIMESTAMP,
            previous_champion INTEGER
        );
        CREATE TABLE batchml.drift (
            run_id VARCHAR NOT NULL, job VARCHAR NOT NULL, feature VARCHAR, method VARCHAR, kind VARCHAR,
            statistic DOUBLE, p_value DOUBLE, threshold DOUBLE, drifted BOOLEAN,
            n_reference BIGINT, n_current BIGINT, error VARCHAR, histogram VARCHAR,
            model_version INTEGER, computed_at TIMESTAMP
        );
        CREATE TABLE batchml.quarantine (
            run_id VARCHAR NOT NULL, job VARCHAR NOT NULL, entity_id VARCHAR, rule VARCHAR, reason VARCHAR,
            record VARCHAR, quarantined_at TIMESTAMP
        );
        CREATE TABLE batchml.watermarks (
            job VARCHAR NOT NULL, value TIMESTAMP, run_id VARCHAR, updated_at TIMESTAMP
        );
        CREATE TABLE batchml.notifications (
            run_id VARCHAR, job VARCHAR, recipients VARCHAR, status VARCHAR, error VARCHAR,
            attempts INTEGER, sent_at TIMESTAMP
        );
        CREATE TABLE batchml.performance (
            run_id VARCHAR NOT NULL, job VARCHAR NOT NULL, model_version INTEGER, event_day DATE,
            metric VARCHAR, value DOUBLE, n BIGINT, positives BIGINT, estimated BOOLEAN, computed_at TIMESTAMP
        );
        """,
    ),
]

# which model was champion when (the warehouse's view, and the published catalog's)
CHAMPION_HISTORY_SQL = (
    "SELECT job, version, event, reason, actor, recorded_at AS champion_from, "
    "lead(recorded_at) OVER (PARTITION BY job ORDER BY recorded_at) AS champion_until "
    "FROM batchml.model_events WHERE event IN ('promoted', 'manual_promote', 'rollback')"
)

MIGRATIONS.append((
    2,
    f"""
    -- which model was champion when: one row per reign, open-ended for the current champion
    CREATE VIEW batchml.champion_history AS {CHAMPION_HISTORY_SQL};
    """,
))

MIGRATIONS.append((
    3,
    """
    -- the sha256 of every compiled library (native code) built for a model: only these are ever loaded
    CREATE TABLE batchml.compiled_libraries (
        job VARCHAR NOT NULL, version INTEGER NOT NULL, kind VARCHAR NOT NULL, file VARCHAR NOT NULL,
        sha256 VARCHAR NOT NULL, registered_at TIMESTAMP
    );
    -- labeled rows of the training window a model did not learn from nor was judged on (quarantined), and why
    ALTER TABLE batchml.models ADD COLUMN rows_dropped BIGINT DEFAULT 0;
    ALTER TABLE batchml.models ADD COLUMN drop_reasons VARCHAR;
    -- which page a mail carried: a run's report, or the job's history page (notify.on: weekly, report --history --send)
    ALTER TABLE batchml.notifications ADD COLUMN report VARCHAR DEFAULT 'run';
    """,
))

MIGRATIONS.append((
    4,
    """
    -- per nightly/replay run: rows, exact score quantiles and rows per risk band (JSON [[band, rows], ...]),
    -- stored at the commit so the history page reads one row per night instead of every night's scores
    CREATE TABLE batchml.score_summaries (
        run_id VARCHAR NOT NULL, job VARCHAR NOT NULL, n BIGINT NOT NULL,
        p10 DOUBLE, p25 DOUBLE, p50 DOUBLE, p75 DOUBLE, p90 DOUBLE, bands VARCHAR, computed_at TIMESTAMP
    );
    """,
))



def migrate(con: duckdb.DuckDBPyConnection) -> int:
    """Bring the ``batchml`` schema up to date; returns the version now in force."""
    con.execute("CREATE SCHEMA IF NOT EXISTS batchml")
    con.execute("CREATE TABLE IF NOT EXISTS batchml.schema_version (version INTEGER, applied_at TIMESTAMP)")
    current = con.execute("SELECT coalesce(max(version), 0) FROM batchml.schema_version").fetchone()[0]
    for version, sql in MIGRATIONS:
        if version <= current:
            continue
        with transaction(con):
            con.execute(sql)
            con.execute("INSERT INTO batchml.schema_version VALUES (?, now())", [version])
        current = version
    return current


def table_exists(con: duckdb.DuckDBPyConnection, qualified: str) -> bool:
    schema, _, table = qualified.rpartition(".")
    row = con.execute(
        # DuckDB resolves names case-insensitively: so must this (Scores.Toy_Mixed is scores.toy_mixed)
        "SELECT count(*) FROM information_schema.tables WHERE lower(table_schema) = lower(?) AND lower(table_name) = lower(?)",
        [schema or "main", table],
    ).fetchone()
    return bool(row[0])


def table_names(con: duckdb.DuckDBPyConnection) -> set[tuple[str, str]]:
    """(schema, table) of every table and view in the warehouse."""
    return set(con.execute("SELECT table_schema, table_name FROM information_schema.tables").fetchall())


def create_table(con: duckdb.DuckDBPyConnection, qualified: str, data) -> None:
    """Create table ``schema.table`` holding ``data`` (an Arrow table), and its schema if missing."""
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(qualified.split('.')[0])}")
    with registered(con, "__data", data):
        con.execute(f"CREATE TABLE {quote_table(qualified)} AS SELECT * FROM __data")


def fetch_dicts(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[dict]:
    """Run a query and return its rows as dicts (small results only)."""
    cursor = con.execute(sql, params or [])
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def fetch_one(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> dict | None:
    rows = fetch_dicts(con, sql, params)
    return rows[0] if rows else None
