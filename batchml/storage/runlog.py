"""The ``batchml.runs`` bookkeeping: a row per run, failed and crashed ones included."""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import duckdb

from batchml import logcontext
from batchml.models.registry import actor, utcnow
from batchml.storage.warehouse import fetch_dicts, fetch_one

STEP_COLUMNS = ("extract", "validate", "drift", "train", "evaluate", "score", "commit")


def new_run_id(job: str, started: datetime) -> str:
    """Sortable and unique: ``vuln_risk-20261128T020000-3f9a1c``."""
    return f"{job}-{started:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


@dataclass
class Run:
    """What one run did, filled in step by step and written to ``batchml.runs``."""

    job: str
    kind: str
    as_of: datetime
    started_at: datetime = field(default_factory=utcnow)
    run_id: str = ""
    status: str = "running"
    rows_extracted: int = 0
    rows_quarantined: int = 0
    rows_scored: int = 0
    rows_pending: int = 0
    champion_version: int | None = None
    challenger_version: int | None = None
    promoted: bool | None = None
    dataset_drift: bool | None = None
    watermark_from: datetime | None = None
    watermark_to: datetime | None = None
    error: str | None = None
    note: str | None = None
    triggers: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    finished_at: datetime | None = None
    dry_run: bool = False  # a backfill that counted what it would do and wrote no scores (told by its note)

    def __post_init__(self) -> None:
        if not self.run_id:
            self.run_id = new_run_id(self.job, self.started_at)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time a step; the figure lands in ``timings`` (and the ``<step>_seconds`` column)."""
        started = time.perf_counter()
        try:
            with logcontext.fields(step=name):
                yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - started, 4)

    def row(self) -> dict:
        row = {
            "run_id": self.run_id, "job": self.job, "kind": self.kind, "status": self.status, "as_of": self.as_of,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "rows_extracted": self.rows_extracted, "rows_quarantined": self.rows_quarantined, "rows_scored": self.rows_scored,
            "champion_version": self.champion_version, "challenger_version": self.challenger_version,
            "promoted": self.promoted, "error": self.error, "watermark_from": self.watermark_from,
            "watermark_to": self.watermark_to, "dataset_drift": self.dataset_drift,
            "triggers": json.dumps(self.triggers), "timings": json.dumps(self.timings),
            "pid": os.getpid(), "host": socket.gethostname(), "actor": actor(), "note": self.note,
        }
        row.update({f"{name}_seconds": self.timings.get(name) for name in STEP_COLUMNS})
        row["total_seconds"] = round(sum(self.timings.values()), 4)
        return row


def insert_run(con: duckdb.DuckDBPyConnection, run: Run) -> None:
    row = run.row()
    con.execute(
        f"INSERT INTO batchml.runs ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
        list(row.values()),
    )


def update_run(con: duckdb.DuckDBPyConnection, run: Run) -> None:
    row = run.row()
    run_id = row.pop("run_id")
    con.execute(
        f"UPDATE batchml.runs SET {', '.join(f'{k} = ?' for k in row)} WHERE run_id = ?",
        [*row.values(), run_id],
    )


def status(con: duckdb.DuckDBPyConnection, run_id: str) -> str | None:
    found = con.execute("SELECT status FROM batchml.runs WHERE run_id = ?", [run_id]).fetchone()
    return found[0] if found else None


def record_timings(con: duckdb.DuckDBPyConnection, run: Run) -> None:
    """The step timings again, after the commit: the row written inside the commit cannot hold the
    commit's own duration."""
    row = {key: value for key, value in run.row().items() if key == "timings" or key.endswith("_seconds")}
    con.execute(f"UPDATE batchml.runs SET {', '.join(f'{k} = ?' for k in row)} WHERE run_id = ?", [*row.values(), run.run_id])


def mark_crashed(con: duckdb.DuckDBPyConnection, job: str) -> list[str]:
    """Runs of ``job`` still 'running' belong to a dead process: the caller holds the job lock.

    Marks them crashed and returns their run ids, so the caller can remove their scratch files."""
    run_ids = [row[0] for row in con.execute(
        "SELECT run_id FROM batchml.runs WHERE job = ? AND status = 'running' ORDER BY started_at", [job]
    ).fetchall()]
    if run_ids:
        con.execute(
            "UPDATE batchml.runs SET status = 'crashed', finished_at = ?, "
            "error = coalesce(error, 'the process ended before the run finished; nothing it did was committed') "
            "WHERE job = ? AND status = 'running'",
            [utcnow(), job],
        )
    return run_ids


def watermark(con: duckdb.DuckDBPyConnection, job: str) -> datetime | None:
    row = con.execute("SELECT max(value) FROM batchml.watermarks WHERE job = ?", [job]).fetchone()
    return row[0] if row else None


def set_watermark(con: duckdb.DuckDBPyConnection, job: str, value: datetime, run_id: str) -> None:
    con.execute("DELETE FROM batchml.watermarks WHERE job = ?", [job])
    con.execute("INSERT INTO batchml.watermarks VALUES (?, ?, ?, ?)", [job, value, run_id, utcnow()])


def record_notification(con: duckdb.DuckDBPyConnection, run_id: str | None, job: str, recipients: str, status: str,
                        error: str | None, attempts: int, report: str) -> None:
    """One mail attempt (``report``: run or history) in batchml.notifications."""
    con.execute(
        "INSERT INTO batchml.notifications (run_id, job, recipients, status, error, attempts, sent_at, report) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [run_id, job, recipients, status, error, attempts, utcnow(), report],
    )


# -- reading runs back (``batchml runs``, ``batchml report``) ------------------------------------------

SCHEDULED_KINDS = ("nightly", "replay")  # the runs a job's history is made of; drift and backfill runs are ad hoc


def jobs(con: duckdb.DuckDBPyConnection) -> set[str]:
    """Every job that has a run in the warehouse."""
    return {row[0] for row in con.execute("SELECT DISTINCT job FROM batchml.runs").fetchall()}


def replay_succeeded(con: duckdb.DuckDBPyConnection, job: str, as_of: datetime) -> bool:
    """Whether a replay of ``job`` at cut-off ``as_of`` succeeded already."""
    row = fetch_one(con, "SELECT count(*) AS n FROM batchml.runs WHERE job = ? AND kind = 'replay' AND status = 'succeeded' "
                         "AND as_of = ?", [job, as_of])
    return bool(row["n"])


def latest_run(con: duckdb.DuckDBPyConnection, job: str, kinds: tuple[str, ...] = SCHEDULED_KINDS) -> dict | None:
    """The job's most recently started run of one of ``kinds``."""
    marks = ", ".join("?" for _ in kinds)
    return fetch_one(con, f"SELECT * FROM batchml.runs WHERE job = ? AND kind IN ({marks}) ORDER BY started_at DESC LIMIT 1",
                     [job, *kinds])


def list_runs(con: duckdb.DuckDBPyConnection, job: str, limit: int) -> list[dict]:
    """The job's ``limit`` most recent runs, newest first, each with its gate decision (if any)."""
    rows = fetch_dicts(con, "SELECT * FROM batchml.runs WHERE job = ? ORDER BY started_at DESC LIMIT ?", [job, limit])
    return [_decoded(con, row) for row in rows]


def get_run(con: duckdb.DuckDBPyConnection, run_id: str) -> dict | None:
    row = fetch_one(con, "SELECT * FROM batchml.runs WHERE run_id = ?", [run_id])
    return None if row is None else _decoded(con, row)


def _decoded(con: duckdb.DuckDBPyConnection, row: dict) -> dict:
    """A run row with its JSON columns parsed and the gate's decision of its challenger."""
    row["triggers"] = json.loads(row["triggers"] or "[]")
    row["timings"] = json.loads(row["timings"] or "{}")
    decision = fetch_one(con, "SELECT event, reason FROM batchml.model_events WHERE run_id = ? AND version = ? "
                              "ORDER BY recorded_at DESC LIMIT 1", [row["run_id"], row["challenger_version"]])
    row["decision"] = decision["event"] if decision else None
    row["decision_reason"] = decision["reason"] if decision else None
    return row
