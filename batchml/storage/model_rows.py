"""The registry tables: ``batchml.models``, ``batchml.model_events`` and ``batchml.compiled_libraries``.

Rows in, rows (dicts) out; the artifact folders, their hashes and loading are ``batchml.models.registry``.
A row's ``artifact_path`` points beside the warehouse when the folder is there (see ``_beside``).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import duckdb

from batchml.models.registry import ARCHIVED, CHAMPION, LIBRARIES, actor, utcnow
from batchml.storage.warehouse import fetch_dicts, fetch_one, table_exists


def libraries(con: duckdb.DuckDBPyConnection, job: str, version: int) -> dict[str, str]:
    """The compiled libraries registered for a model: file name -> sha256 (none before the table exists)."""
    if not table_exists(con, "batchml.compiled_libraries"):
        return {}
    rows = con.execute("SELECT file, sha256 FROM batchml.compiled_libraries WHERE job = ? AND version = ? ORDER BY registered_at",
                       [job, version]).fetchall()
    return dict(rows)


def register_libraries(con: duckdb.DuckDBPyConnection, job: str, version: int, built: list[dict]) -> int:
    """Record the libraries built for a model (``kind``, ``file``, ``sha256``, as built and verified in
    this process); returns how many. The file name is the key: a rebuild replaces its row."""
    for library in built:
        con.execute("DELETE FROM batchml.compiled_libraries WHERE job = ? AND version = ? AND file = ?",
                    [job, version, library["file"]])
        con.execute("INSERT INTO batchml.compiled_libraries VALUES (?, ?, ?, ?, ?, ?)",
                    [job, version, library["kind"], library["file"], library["sha256"], utcnow()])
    return len(built)


# --------------------------------------------------------------------------------------------
# Registry rows
# --------------------------------------------------------------------------------------------


def get(con: duckdb.DuckDBPyConnection, job: str, version: int) -> dict | None:
    return _located(con, fetch_one(con, "SELECT * FROM batchml.models WHERE job = ? AND version = ?", [job, version]))


def champion(con: duckdb.DuckDBPyConnection, job: str) -> dict | None:
    return _located(con, fetch_one(con, "SELECT * FROM batchml.models WHERE job = ? AND status = 'champion'", [job]))


def newest_challenger(con: duckdb.DuckDBPyConnection, job: str, after: int) -> dict | None:
    """The newest model after version ``after`` that was trained but not promoted (for shadow scores)."""
    sql = ("SELECT * FROM batchml.models WHERE job = ? AND version > ? AND status IN ('challenger', 'rejected') "
           "ORDER BY version DESC LIMIT 1")
    return _located(con, fetch_one(con, sql, [job, after]))


def last_trained(con: duckdb.DuckDBPyConnection, job: str) -> dict | None:
    """The model trained at the latest cut-off (``created_at`` is the as_of of its training run)."""
    return _located(con, fetch_one(con, "SELECT job, version, created_at, status, artifact_path, run_id FROM batchml.models "
                                        "WHERE job = ? ORDER BY created_at DESC, version DESC LIMIT 1", [job]))


def list_models(con: duckdb.DuckDBPyConnection, job: str) -> list[dict]:
    rows = fetch_dicts(con, "SELECT * FROM batchml.models WHERE job = ? ORDER BY version", [job])
    home = _home(con)
    return [_beside(home, row) for row in rows]


GATE_EVENTS = ("promoted", "rejected", "no_decision")  # what the gate (or the first run) decided about a version


def gate_decisions(con: duckdb.DuckDBPyConnection, job: str) -> dict[int, dict]:
    """Per version, the gate's decision on the shared holdout: ``event``, ``reason``, the gate's
    figures (``metrics`` JSON) and the champion of the time (``previous_champion``, None for the first)."""
    rows = fetch_dicts(con, f"SELECT version, event, reason, metrics, previous_champion FROM batchml.model_events "
                            f"WHERE job = ? AND event IN {GATE_EVENTS} AND run_id IS NOT NULL "
                            f"QUALIFY row_number() OVER (PARTITION BY version ORDER BY recorded_at DESC) = 1", [job])
    return {row["version"]: row for row in rows}


def _located(con: duckdb.DuckDBPyConnection, row: dict | None) -> dict | None:
    if row is None:
        return None
    return {**_beside(_home(con), row), LIBRARIES: libraries(con, row["job"], row["version"])}


def _home(con: duckdb.DuckDBPyConnection) -> Path | None:
    """The folder of the warehouse file ``con`` is on (None for an in-memory database)."""
    found = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    return Path(found[0]).resolve().parent if found and found[0] else None


def _beside(home: Path | None, row: dict) -> dict:
    """``row`` with ``artifact_path`` pointing beside this warehouse when the artifact is there.

    artifact_path is stored absolute (tools and analysts can open it as is), but a project that was
    moved, or a warehouse copied with its ``models/`` folder, must use its own artifacts: the folder
    ``<warehouse dir>/models/<job>/v<N>`` wins when it exists (its hashes are verified all the same).
    """
    beside = None if home is None else home / "models" / row["job"] / f"v{row['version']}"
    if beside is not None and beside.is_dir() and str(beside) != row["artifact_path"]:
        return {**row, "artifact_path": str(beside)}
    return row


def next_version(con: duckdb.DuckDBPyConnection, job: str) -> int:
    return int(con.execute("SELECT coalesce(max(version), 0) + 1 FROM batchml.models WHERE job = ?", [job]).fetchone()[0])


def register(con: duckdb.DuckDBPyConnection, row: dict) -> None:
    """Insert a model row (inside the caller's transaction)."""
    columns = list(row)
    con.execute(
        f"INSERT INTO batchml.models ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
        [json.dumps(v, default=str) if isinstance(v, dict) else v for v in row.values()],
    )


def record_event(
    con: duckdb.DuckDBPyConnection,
    job: str,
    version: int | None,
    event: str,
    *,
    run_id: str | None = None,
    reason: str = "",
    metrics: dict | None = None,
    who: str | None = None,
    previous_champion: int | None = None,
    at: datetime | None = None,
) -> None:
    con.execute(
        "INSERT INTO batchml.model_events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [job, version, event, run_id, reason, json.dumps(metrics or {}, default=str), who or actor(), at or utcnow(), previous_champion],
    )


def set_status(con: duckdb.DuckDBPyConnection, job: str, version: int, status: str) -> None:
    con.execute("UPDATE batchml.models SET status = ? WHERE job = ? AND version = ?", [status, job, version])


def make_champion(
    con: duckdb.DuckDBPyConnection, job: str, version: int, event: str, *, run_id: str | None, reason: str,
    metrics: dict | None = None, who: str | None = None, at: datetime | None = None,
) -> int | None:
    """Archive the current champion (if any), crown ``version`` and record why; returns the old one."""
    current = champion(con, job)
    previous = current["version"] if current else None
    if previous is not None:
        set_status(con, job, previous, ARCHIVED)
    set_status(con, job, version, CHAMPION)
    con.execute("UPDATE batchml.models SET promoted_at = ? WHERE job = ? AND version = ?", [at or utcnow(), job, version])
    record_event(con, job, version, event, run_id=run_id, reason=reason, metrics=metrics, who=who, previous_champion=previous, at=at)
    return previous


def previous_champion(con: duckdb.DuckDBPyConnection, job: str, current: int) -> int | None:
    """The champion ``current`` replaced, from the event that crowned it."""
    row = fetch_one(
        con,
        "SELECT previous_champion FROM batchml.model_events WHERE job = ? AND version = ? AND previous_champion IS NOT NULL "
        "AND event IN ('promoted', 'manual_promote') ORDER BY recorded_at DESC LIMIT 1",
        [job, current],
    )
    return row["previous_champion"] if row else None
