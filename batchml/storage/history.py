"""What the reports read back: one run's rows (the run report) and a job's runs over time (the history page).

Only batchml's own tables (runs, quarantine, drift, performance, model events, the scores' per-run
summaries), never the source. Rows come back as dicts, JSON columns parsed;
``batchml.reports.deliver`` shapes them into the report's data.
"""

from __future__ import annotations

import json
from datetime import datetime

from batchml.config import JobConfig
from batchml.storage import score_summaries
from batchml.storage.model_rows import GATE_EVENTS
from batchml.storage.warehouse import fetch_dicts, fetch_one, quote_table, table_exists

TREND_RUNS = 30
QUARANTINE_SAMPLE = 10

# -- one run (the run report) ---------------------------------------------------------------------


def run_of_job(con, job: str, run_id: str) -> dict | None:
    """The ``batchml.runs`` row of ``run_id`` when it belongs to ``job``."""
    return fetch_one(con, "SELECT * FROM batchml.runs WHERE job = ? AND run_id = ?", [job, run_id])


def quarantine_reasons(con, run_id: str) -> dict[str, int]:
    """Rule -> rows the run quarantined for it, most first."""
    return dict(con.execute(
        "SELECT rule, count(*) FROM batchml.quarantine WHERE run_id = ? GROUP BY 1 ORDER BY 2 DESC", [run_id]).fetchall())


def quarantine_sample(con, run_id: str) -> list[dict]:
    """Some quarantined rows of a rejected batch, taking each rule in turn, so one flood does not hide the rest."""
    return fetch_dicts(con, "SELECT entity_id, rule, reason, record FROM (SELECT entity_id, rule, reason, "
                            "CAST(record AS VARCHAR) AS record, row_number() OVER (PARTITION BY rule ORDER BY entity_id) AS nth "
                            f"FROM batchml.quarantine WHERE run_id = ?) ORDER BY nth, rule LIMIT {QUARANTINE_SAMPLE}", [run_id])


def drift_rows(con, run_id: str) -> list[dict]:
    """The run's drift rows, histograms parsed."""
    rows = fetch_dicts(con, "SELECT * FROM batchml.drift WHERE run_id = ?", [run_id])
    for row in rows:
        row["histogram"] = json.loads(row["histogram"]) if row["histogram"] else None
    return rows


def feature_drift_count(con, run_id: str) -> tuple[int, int]:
    """(features that drifted, features measured) in the run."""
    drifted, measured = con.execute(
        "SELECT count(*) FILTER (WHERE drifted), count(*) FROM batchml.drift WHERE run_id = ? AND kind = 'feature'", [run_id]
    ).fetchone()
    return drifted, measured


def drift_summary(con, run_id: str) -> list[dict]:
    """The run's drift rows as ``batchml drift`` prints them: drifted first."""
    return fetch_dicts(con, "SELECT feature, kind, method, statistic, p_value, threshold, drifted, n_current, error "
                            "FROM batchml.drift WHERE run_id = ? ORDER BY drifted DESC, kind, feature", [run_id])


def gate(con, run_id: str) -> dict | None:
    """The gate's figures for the run's challenger and the champion it was compared with (None without a gate)."""
    row = fetch_one(
        con, "SELECT metrics, previous_champion FROM batchml.model_events WHERE run_id = ? "
        f"AND event IN {GATE_EVENTS} AND previous_champion IS NOT NULL ORDER BY recorded_at DESC LIMIT 1",
        [run_id])
    if row is None:
        return None
    figures = json.loads(row["metrics"] or "{}")
    if "outcome" not in figures:
        return None
    return {**figures, "champion_version": row["previous_champion"]}


def performance_trend(con, job: str) -> list[dict]:
    """The realised metric of the job's last ``TREND_RUNS`` runs, oldest first."""
    return fetch_dicts(
        con,
        "SELECT p.run_id, r.as_of, p.metric, p.value, p.n FROM batchml.performance p JOIN batchml.runs r USING (run_id) "
        "WHERE p.job = ? AND p.event_day IS NULL AND NOT p.estimated AND p.value IS NOT NULL "
        "QUALIFY row_number() OVER (PARTITION BY p.run_id ORDER BY p.n DESC) = 1 "  # the version most labels judged
        f"ORDER BY r.as_of DESC LIMIT {TREND_RUNS}",
        [job],
    )[::-1]


def band_counts(con, config: JobConfig, run_id: str) -> dict[str, int]:
    """Risk band -> rows the run scored in it (none before the scores table exists). A multiclass job
    without bands: rows per predicted class instead (``predicted <class>``)."""
    if not table_exists(con, config.scores_table):
        return {}
    group = "risk_band"
    if config.label.objective == "multiclass" and not config.scoring.bands:
        group = "'predicted ' || predicted_class"
    return dict(con.execute(
        f"SELECT {group}, count(*) FROM {quote_table(config.scores_table)} WHERE run_id = ? GROUP BY 1 ORDER BY 2 DESC", [run_id]
    ).fetchall())


def earlier_nightly_runs(con, job: str, run_id: str, since: datetime, started_before: datetime) -> int:
    """Nightly runs of ``job`` other than ``run_id`` with a cut-off from ``since`` that started before ``started_before``."""
    row = fetch_one(con, "SELECT count(*) AS n FROM batchml.runs WHERE job = ? AND kind = 'nightly' AND run_id <> ? "
                         "AND as_of >= ? AND started_at < ?", [job, run_id, since, started_before])
    return row["n"]


# -- a job over time (the history page) -----------------------------------------------------------


def _since_clause(since: datetime | None, column: str) -> str:
    return "" if since is None else f" AND {column} >= ?"


def history_rows(con, config: JobConfig, since: datetime | None) -> dict[str, list[dict]]:
    """The job's finished runs since ``since`` (all by default) and what they recorded: ``runs``,
    ``drift``, ``realised``, ``estimated``, ``events``, and when the scores table exists ``scores``
    and ``bands`` (the fields of ``reports.history.HistoryData``)."""
    after = [] if since is None else [since]
    runs = fetch_dicts(con, "SELECT run_id, kind, status, as_of, started_at, finished_at, rows_extracted, rows_quarantined, "
                            "rows_scored, champion_version, challenger_version, promoted, dataset_drift, error, note, timings "
                            "FROM batchml.runs WHERE job = ? AND status <> 'running'" + _since_clause(since, "as_of") +
                            " ORDER BY as_of, started_at", [config.job, *after])
    for run in runs:
        run["timings"] = json.loads(run["timings"] or "{}")
    nights = "SELECT run_id FROM batchml.runs WHERE job = ? AND kind IN ('nightly', 'replay') AND status = 'succeeded'" + _since_clause(since, "as_of")
    rows = {"runs": runs}
    rows["drift"] = fetch_dicts(con, "SELECT run_id, feature, method, statistic, p_value, threshold, drifted FROM batchml.drift "
                                     f"WHERE job = ? AND kind = 'feature' AND run_id IN ({nights})", [config.job, config.job, *after])
    rows["realised"], rows["estimated"] = (_performance_by_day(con, config, since, estimated) for estimated in (False, True))
    rows["events"] = fetch_dicts(con, "SELECT e.*, r.as_of FROM batchml.model_events e LEFT JOIN batchml.runs r USING (run_id) "
                                      "WHERE e.job = ?" + _since_clause(since, "e.recorded_at") + " ORDER BY e.recorded_at",
                                 [config.job, *after])
    for event in rows["events"]:
        event["metrics"] = json.loads(event["metrics"] or "{}")
    if table_exists(con, config.scores_table):
        rows["scores"], rows["bands"] = _score_summaries(con, config, nights, after)
    return rows


def _performance_by_day(con, config: JobConfig, since: datetime | None, estimated: bool) -> list[dict]:
    """The champion's metric by event day; a day whose labels came over several nights is their
    row-weighted mean."""
    runs = "" if since is None else " AND run_id IN (SELECT run_id FROM batchml.runs WHERE job = ? AND as_of >= ?)"  # measured since
    return fetch_dicts(
        con, "SELECT event_day, sum(value * n) / sum(n) AS value, sum(n) AS n FROM batchml.performance "
             "WHERE job = ? AND metric = ? AND estimated = ? AND event_day IS NOT NULL AND value IS NOT NULL AND n > 0"
             + runs + " GROUP BY event_day ORDER BY event_day",
        [config.job, config.promotion.metric, estimated, *([] if since is None else [config.job, since])])


def _score_summaries(con, config: JobConfig, nights: str, after: list) -> tuple[list[dict], list[dict]]:
    """Per night: score quantiles and rows per risk band, from the summaries the runs stored at their
    commit; nights committed before ``batchml.score_summaries`` existed are summarised from the scores table."""
    summaries = score_summaries.stored(con, config.job, nights, [config.job, *after])
    missing = score_summaries.unsummarised_nights(con, config.job, _since_clause(after[0] if after else None, "as_of"), after)
    summaries.update({s["run_id"]: s for s in score_summaries.summarise(con, config.scores_table, missing)})
    scores, bands = [], []
    for s in summaries.values():
        if not s["n"]:  # a night whose scores were gone when it was summarised
            continue
        scores.append({key: s[key] for key in ("run_id", "n", *score_summaries.COLUMNS)})
        bands += [{"run_id": s["run_id"], "risk_band": band, "n": n} for band, n in s["bands"]]
    return scores, bands
