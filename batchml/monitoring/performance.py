"""How the champion does once labels arrive (realised) and before they do (estimated).

Realised: labels whose ``available_at`` falls since the previous run are joined to the score each
entity had at the time (the newest nightly or replay score as of this run), and the primary metric
is computed per event day and model version, plus an overall row (``event_day`` NULL) for the
current champion — that figure drives the ``decay`` retrain trigger.

Estimated: before labels arrive, confidence-based performance estimation (as NannyML's CBPE) from
the champion's own probabilities, recorded only when its holdout calibration error is small enough
for the estimate to mean anything.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np

from batchml.models import evaluate
from batchml.config import JobConfig
from batchml.data.extract import ENTITY, EVENT_TIME, LABEL, RULE, labeled, normalised_sql, ts_literal
from batchml.models.registry import LoadedModel
from batchml.storage.warehouse import quote_ident, quote_table, table_exists

CBPE_MAX_ECE = 0.05  # above this holdout calibration error, estimated performance is not trusted


def labels_between(config: JobConfig, start: datetime | None, as_of: datetime) -> str:
    """Rows whose label became known in [start, as_of) and that had landed by then."""
    label_at = f"try_cast({quote_ident(config.label.available_at)} AS TIMESTAMP)"
    lower = f" AND {label_at} >= {ts_literal(start)}" if start else ""
    return (
        f"{label_at} < {ts_literal(as_of)}{lower} AND {labeled(config)}"
        f" AND try_cast({quote_ident(config.source.watermark)} AS TIMESTAMP) < {ts_literal(as_of)}"
    )


def count_new_labels(con, config: JobConfig, project: Path, as_of: datetime) -> int:
    """Valid labeled rows that arrived since the job last trained a model."""
    since = con.execute("SELECT max(created_at) FROM batchml.models WHERE job = ?", [config.job]).fetchone()[0]
    if since is None:
        return 0
    sql = normalised_sql(con, config, project, labels_between(config, since, as_of))
    return int(con.execute(f"SELECT count(*) FROM ({sql}) WHERE {RULE} IS NULL").fetchone()[0])


def realised(con, config: JobConfig, project: Path, as_of: datetime) -> list[dict]:
    """Metric rows for the labels that arrived since the previous nightly/replay run."""
    table = config.scores_table
    if not table_exists(con, table):
        return []
    # `<=`: rerunning a cut-off starts where the run before it ended, so no label is counted twice
    previous = con.execute(
        "SELECT max(as_of) FROM batchml.runs WHERE job = ? AND status = 'succeeded' AND kind IN ('nightly', 'replay') AND as_of <= ?",
        [config.job, as_of],
    ).fetchone()[0]
    arrived = normalised_sql(con, config, project, labels_between(config, previous, as_of))
    entity = quote_ident(config.source.entity_id)
    rows = con.execute(f"""
        WITH labeled AS ({arrived}),
        s AS (
            SELECT sc.{entity} AS e, sc.event_time AS t, sc.score, sc.model_version FROM {quote_table(table)} sc
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
    return metric_rows(config.promotion.metric, rows)


def metric_rows(metric: str, rows: list[tuple]) -> list[dict]:
    """(label, score, event day, model version) tuples -> one row per day and version, plus one
    overall row per version (``event_day`` None)."""
    if not rows:
        return []
    y = np.array([r[0] for r in rows], dtype=np.int8)
    p = np.array([r[1] for r in rows], dtype=np.float64)
    days = np.array([r[2] for r in rows], dtype=object)
    versions = np.array([r[3] for r in rows])
    out = []
    for day in sorted(set(days)):
        for version in sorted(set(versions[days == day])):
            mask = (days == day) & (versions == version)
            out.append(_row(metric, y[mask], p[mask], day, int(version)))
    for version in sorted(set(versions)):
        mask = versions == version
        out.append(_row(metric, y[mask], p[mask], None, int(version)))
    return out


def overall(rows: list[dict], version: int | None) -> float | None:
    """The champion's realised metric over every label that arrived (None if not computable)."""
    for row in rows:
        if row["event_day"] is None and row["model_version"] == version and not row["estimated"]:
            return row["value"]
    return None


def _row(metric: str, y: np.ndarray, p: np.ndarray, day, version: int) -> dict:
    value = None
    if len(y) and len(np.unique(y)) == 2:  # a metric of one class is undefined, not zero
        value = float(evaluate.compute_metrics(y, p)[metric])
    return {"model_version": version, "event_day": day, "metric": metric, "value": value, "n": int(len(y)),
            "positives": int(y.sum()), "estimated": False}


def estimated(config: JobConfig, champion: LoadedModel, scores: np.ndarray, as_of: datetime) -> list[dict]:
    """Today's estimated metric from the champion's probabilities (CBPE), if it is calibrated enough."""
    metric = config.promotion.metric
    holdout = champion.manifest.get("metrics", {}).get("holdout", {})
    if len(scores) < 100 or holdout.get("ece", 1.0) > CBPE_MAX_ECE:
        return []
    try:
        value = evaluate.estimate_metrics(scores).get(metric)
    except ValueError:  # e.g. every probability 0: nothing to rank
        return []
    return [{"model_version": champion.version, "event_day": as_of.date(), "metric": metric, "value": value,
             "n": int(len(scores)), "positives": None, "estimated": True}]
