"""Per-run summaries of the scores (``batchml.score_summaries``): what the history page charts per night.

A nightly or replay run stores its summary in its commit transaction, from its own scores file (one
aggregate over the run's rows, ~0.15 s at 2M rows), so the history page reads one row per night
instead of scanning every night's scores. Runs committed before the table existed are summarised
from the scores table: once by the next nightly commit of the job (``fill_missing``), and until then
by the page itself (``summarise``), so an upgraded warehouse shows the same page.

Quantiles are exact (``quantile_cont``: numpy's default, linear interpolation): an approximate one
would depend on the order in which the rows are read, and the file and the table read them differently.
"""

from __future__ import annotations

import json

from batchml.storage.warehouse import quote_literal, quote_table, table_exists

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
COLUMNS = ("p10", "p25", "p50", "p75", "p90")
TABLE = "batchml.score_summaries"
NIGHT_KINDS = ("nightly", "replay")  # the runs the history page charts

# rows, the quantiles and the rows per risk band (histogram skips NULL: unbanded rows are counted apart)
_AGGREGATE = (f"count(*) AS n, quantile_cont(score, {list(QUANTILES)}) AS q, histogram(risk_band) AS bands, "
              "count(*) - count(risk_band) AS unbanded")


def _row(run_id: str, n: int, quantiles: list | None, bands: dict | None, unbanded: int) -> dict:
    """One summary: ``run_id``, ``n``, ``p10``..``p90`` and ``bands`` as ``[[band or None, rows], ...]``, most rows first."""
    pairs = sorted([*(bands or {}).items(), *([(None, unbanded)] if unbanded else [])], key=lambda pair: -pair[1])
    return {"run_id": run_id, "n": n, **dict(zip(COLUMNS, quantiles or [None] * len(COLUMNS))), "bands": [list(p) for p in pairs]}


def summarise(con, scores_table: str, run_ids: list[str]) -> list[dict]:
    """Summaries of ``run_ids`` computed from the scores table (one scan); runs with no scores are left out."""
    if not run_ids:
        return []
    marks = ", ".join("?" * len(run_ids))
    rows = con.execute(f"SELECT run_id, {_AGGREGATE} FROM {quote_table(scores_table)} WHERE run_id IN ({marks}) GROUP BY run_id",
                       run_ids).fetchall()
    return [_row(*row) for row in rows]


def summarise_file(con, run_id: str, path) -> dict:
    """The summary of one run's Parquet scores file (all its rows are the run's)."""
    n, quantiles, bands, unbanded = con.execute(f"SELECT {_AGGREGATE} FROM read_parquet({quote_literal(str(path))})").fetchone()
    return _row(run_id, n, quantiles, bands, unbanded)


def insert(con, job: str, summaries: list[dict]) -> None:
    """Store summaries (inside the caller's transaction)."""
    for s in summaries:
        con.execute(f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
                    [s["run_id"], job, s["n"], *(s[c] for c in COLUMNS), json.dumps(s["bands"])])


def stored(con, job: str, run_ids_sql: str, params: list) -> dict[str, dict]:
    """Run id -> stored summary, for the runs the subquery ``run_ids_sql`` selects (empty before the table exists)."""
    if not table_exists(con, TABLE):
        return {}
    rows = con.execute(f"SELECT run_id, n, {', '.join(COLUMNS)}, bands FROM {TABLE} WHERE job = ? AND run_id IN ({run_ids_sql})",
                       [job, *params]).fetchall()
    return {row[0]: _row_from_stored(row) for row in rows}


def _row_from_stored(row: tuple) -> dict:
    run_id, n, *quantiles, bands = row
    return {"run_id": run_id, "n": n, **dict(zip(COLUMNS, quantiles)), "bands": json.loads(bands or "[]")}


def unsummarised_nights(con, job: str, since_sql: str = "", params: list | None = None) -> list[str]:
    """Succeeded nightly and replay runs of ``job`` with scores but no stored summary (committed before the table existed)."""
    summarised = f" AND run_id NOT IN (SELECT run_id FROM {TABLE} WHERE job = ?)" if table_exists(con, TABLE) else ""
    rows = con.execute(f"SELECT run_id FROM batchml.runs WHERE job = ? AND kind IN {NIGHT_KINDS} AND status = 'succeeded' "
                       f"AND rows_scored > 0{since_sql}{summarised} ORDER BY as_of",
                       [job, *(params or []), *([job] if summarised else [])]).fetchall()
    return [row[0] for row in rows]


def fill_missing(con, job: str, scores_table: str) -> int:
    """Summarise, from the scores table, the job's nights that have none (once, after an upgrade); how many.
    A night whose scores are gone gets an empty summary (``n`` 0), so it is not looked for again."""
    missing = unsummarised_nights(con, job)
    if not missing:
        return 0
    found = {s["run_id"]: s for s in summarise(con, scores_table, missing)}
    insert(con, job, [found.get(run_id) or _row(run_id, 0, None, None, 0) for run_id in missing])
    return len(missing)
