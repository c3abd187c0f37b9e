"""Labels as they arrive: how many came since the last training, and the scores they belong to.

Realised performance (``batchml.monitoring.performance``) is computed from what this returns.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from batchml.config import JobConfig
from batchml.data.extract import ENTITY, EVENT_TIME, LABEL, RULE, as_timestamp, labeled, normalised_sql, ts_literal
from batchml.models.objectives import objective_of
from batchml.storage.source import source_sql
from batchml.storage.warehouse import quote_ident, quote_table, table_exists


def labels_between(config: JobConfig, start: datetime | None, as_of: datetime) -> str:
    """Rows whose label became known in [start, as_of) and that had landed by then."""
    label_at = as_timestamp(config.label.available_at)
    lower = f" AND {label_at} >= {ts_literal(start)}" if start else ""
    return (
        f"{label_at} < {ts_literal(as_of)}{lower} AND {labeled(config)}"
        f" AND {as_timestamp(config.source.watermark)} < {ts_literal(as_of)}"
    )


def count_new_labels(con, config: JobConfig, project: Path, as_of: datetime, enough: int) -> int:
    """Valid labeled rows that arrived since the job last trained a model, counted up to ``enough``
    (the retrain trigger asks only whether there are that many: DuckDB stops reading there)."""
    since = con.execute("SELECT max(created_at) FROM batchml.models WHERE job = ?", [config.job]).fetchone()[0]
    if since is None:
        return 0
    sql = normalised_sql(config, source_sql(con, config, project), labels_between(config, since, as_of))
    return int(con.execute(f"SELECT count(*) FROM (SELECT 1 FROM ({sql}) WHERE {RULE} IS NULL LIMIT {int(enough)})").fetchone()[0])


def labeled_scores(con, config: JobConfig, project: Path, as_of: datetime) -> list[tuple]:
    """(label, score, event day, model version) of every valid label (multiclass: its probabilities
    instead of its score) that arrived since the previous
    nightly/replay run, joined to the score its row had (``performance.metric_rows`` turns them into figures)."""
    table = config.scores_table
    if not table_exists(con, table):
        return []
    # `<=`: rerunning a cut-off starts where the run before it ended, so no label is counted twice
    previous = con.execute(
        "SELECT max(as_of) FROM batchml.runs WHERE job = ? AND status = 'succeeded' AND kind IN ('nightly', 'replay') AND as_of <= ?",
        [config.job, as_of],
    ).fetchone()[0]
    arrived = normalised_sql(config, source_sql(con, config, project), labels_between(config, previous, as_of))
    entity = quote_ident(config.source.entity_id)
    stored = quote_ident(objective_of(config.label.objective).stored_prediction)  # multiclass: the probabilities map
    return con.execute(f"""
        WITH labeled AS ({arrived}),
        s AS (
            SELECT sc.{entity} AS e, sc.event_time AS t, sc.{stored} AS score, sc.model_version FROM {quote_table(table)} sc
            JOIN batchml.runs r ON r.run_id = sc.run_id
            WHERE r.kind IN ('nightly', 'replay') AND r.as_of <= {ts_literal(as_of)}
            QUALIFY row_number() OVER (PARTITION BY sc.{entity}, sc.event_time ORDER BY sc.scored_at DESC) = 1
        )
        -- a label belongs to the score of the same row: (entity, event time), as a customer's weekly snapshots
        SELECT l.{LABEL}, s.score, CAST(l.{EVENT_TIME} AS DATE), s.model_version
        FROM labeled l JOIN s ON CAST(s.e AS VARCHAR) = CAST(l.{ENTITY} AS VARCHAR)  -- ids may have changed type since
                              AND s.t = l.{EVENT_TIME}
        WHERE l.{RULE} IS NULL
    """).fetchall()
