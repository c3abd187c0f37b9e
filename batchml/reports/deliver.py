"""Glue between the warehouse and the report: read a run back, render it, write it, mail it.

``report`` renders and ``notify`` delivers; neither touches DuckDB. This module reads what they
need from the warehouse and records each delivery in ``batchml.notifications``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from batchml.models import registry
from batchml.config import JobConfig
from batchml.errors import ConfigError, NotifyError
from batchml.project import Project
from batchml.storage import runlog
from batchml.storage.publish import publish_change
from batchml.reports.run_report import ReportData, build_report, should_notify, write_report
from batchml.storage.warehouse import fetch_dicts, fetch_one, quote_table, table_exists

log = logging.getLogger("batchml")
TREND_RUNS = 30


def load_report_data(con, config: JobConfig, run_id: str | None) -> ReportData:
    """Everything the report shows about one run (the latest one when ``run_id`` is None)."""
    if not table_exists(con, "batchml.runs"):  # nothing has run in this warehouse yet
        raise _no_runs(config)
    if run_id is None:  # the job's latest scheduled run: an ad-hoc drift check or backfill is not "the latest report"
        row = runlog.latest_run(con, config.job)
        if row is None:
            raise _no_scheduled_runs(con, config)
    else:
        row = fetch_one(con, "SELECT * FROM batchml.runs WHERE job = ? AND run_id = ?", [config.job, run_id])
    if row is None:
        raise ConfigError(f"no run {run_id} of job {config.job} in the warehouse; list them with `batchml runs list {config.job}`")
    run_id = row["run_id"]
    gate = _gate(con, run_id)
    return ReportData(
        job=config.job, run_id=run_id, kind=row["kind"], status=row["status"], as_of=row["as_of"],
        started_at=row["started_at"], finished_at=row["finished_at"], rows_extracted=row["rows_extracted"],
        rows_quarantined=row["rows_quarantined"], rows_scored=row["rows_scored"],
        quarantine_reasons=dict(con.execute(
            "SELECT rule, count(*) FROM batchml.quarantine WHERE run_id = ? GROUP BY 1 ORDER BY 2 DESC", [run_id]).fetchall()),
        timings=json.loads(row["timings"] or "{}"), error=_with_note(row),
        # the champion the run started with: after a promotion the gate compared the challenger with it
        champion_version=(gate or {}).get("champion_version", row["champion_version"]),
        challenger_version=row["challenger_version"], promoted=row["promoted"],
        drift=_drift_rows(con, run_id), dataset_drift=row["dataset_drift"], gate=gate,
        performance=_trend(con, config), band_counts=_bands(con, config, run_id), triggers=json.loads(row["triggers"] or "[]"),
        quarantine_sample=_quarantine_sample(con, run_id) if row["status"] == "rejected" else [],
    )


QUARANTINE_SAMPLE = 10


def _quarantine_sample(con, run_id: str) -> list[dict]:
    """Some quarantined rows of a rejected batch, taking each rule in turn, so one flood does not hide the rest."""
    return fetch_dicts(con, "SELECT entity_id, rule, reason, record FROM (SELECT entity_id, rule, reason, "
                            "CAST(record AS VARCHAR) AS record, row_number() OVER (PARTITION BY rule ORDER BY entity_id) AS nth "
                            f"FROM batchml.quarantine WHERE run_id = ?) ORDER BY nth, rule LIMIT {QUARANTINE_SAMPLE}", [run_id])


def _no_runs(config: JobConfig) -> ConfigError:
    return ConfigError(f"no runs of job {config.job} yet; run `batchml run {config.job}` first")


def _no_scheduled_runs(con, config: JobConfig) -> ConfigError:
    if runlog.latest_run(con, config.job, kinds=("drift", "backfill")) is None:
        return _no_runs(config)
    return ConfigError(f"no nightly or replay runs of job {config.job} yet, only drift or backfill runs; name one: "
                       f"`batchml report {config.job} RUN_ID` (see `batchml runs list {config.job}`)")


def _with_note(row: dict) -> str | None:
    if row["error"]:
        return row["error"]
    return None


def _drift_rows(con, run_id: str) -> list[dict]:
    rows = fetch_dicts(con, "SELECT * FROM batchml.drift WHERE run_id = ?", [run_id])
    for row in rows:
        row["histogram"] = json.loads(row["histogram"]) if row["histogram"] else None
    return rows


def _gate(con, run_id: str) -> dict | None:
    row = fetch_one(
        con, "SELECT metrics, previous_champion FROM batchml.model_events WHERE run_id = ? "
        "AND event IN ('promoted', 'rejected', 'no_decision') AND previous_champion IS NOT NULL ORDER BY recorded_at DESC LIMIT 1",
        [run_id])
    if row is None:
        return None
    gate = json.loads(row["metrics"] or "{}")
    if "outcome" not in gate:
        return None
    return {**gate, "champion_version": row["previous_champion"]}


def _trend(con, config: JobConfig) -> list[dict]:
    return fetch_dicts(
        con,
        "SELECT p.run_id, r.as_of, p.metric, p.value, p.n FROM batchml.performance p JOIN batchml.runs r USING (run_id) "
        "WHERE p.job = ? AND p.event_day IS NULL AND NOT p.estimated AND p.value IS NOT NULL "
        "QUALIFY row_number() OVER (PARTITION BY p.run_id ORDER BY p.n DESC) = 1 "  # the version most labels judged
        f"ORDER BY r.as_of DESC LIMIT {TREND_RUNS}",
        [config.job],
    )[::-1]


def _bands(con, config: JobConfig, run_id: str) -> dict[str, int]:
    if not table_exists(con, config.scores_table):
        return {}
    return dict(con.execute(
        f"SELECT risk_band, count(*) FROM {quote_table(config.scores_table)} WHERE run_id = ? GROUP BY 1 ORDER BY 2 DESC", [run_id]
    ).fetchall())


def report_and_notify(project: Project, config: JobConfig, run_id: str | None, *, send: bool, force_send: bool = False) -> Path:
    """Write the run's HTML report; mail it when ``notify.on`` says so (or ``force_send``).

    With ``force_send`` (``batchml report --send``: the user asked for the mail) a mail that cannot
    go out is an error (:class:`NotifyError`, or :class:`ConfigError` when nothing is set up to
    send it), after the report is written and the attempt recorded; otherwise a warning."""
    from batchml.reports.mail import send_report

    if not project.warehouse.exists():  # connecting would create an empty warehouse file
        raise _no_runs(config)
    with project.connect() as con:
        data = load_report_data(con, config, run_id)
    report = build_report(data)
    path = write_report(report, project.reports / config.job)
    log.info("%s: report written to %s", config.job, path)
    events = should_notify(data, config.notify.on)
    if force_send and not config.notify.email:
        raise ConfigError(f"report written to {path} but not mailed: job {config.job} has no recipients; "
                          f"list them under notify.email in configs/{config.job}.yaml")
    if not send or not config.notify.email or not (events or force_send):
        return path
    delivery = send_report(report, list(config.notify.email), project.settings)
    if delivery.status == "failed":
        log.warning("%s: report mail not delivered: %s", config.job, delivery.error)
    elif delivery.status == "skipped" and not force_send:  # else the error below says it
        # the job asks for mail that this machine cannot send: say so, or the team waits for it in vain
        log.warning("%s: report not mailed: %s", config.job, delivery.error)
    elif delivery.status == "sent":
        log.info("%s: report mailed to %s", config.job, ", ".join(delivery.recipients))
    with project.connect() as con:
        con.execute(
            "INSERT INTO batchml.notifications VALUES (?, ?, ?, ?, ?, ?, ?)",
            [data.run_id, config.job, ", ".join(delivery.recipients or config.notify.email), delivery.status, delivery.error, delivery.attempts, registry.utcnow()],
        )
        # a run publishes before its report is mailed: without this the catalog lags a notification behind
        publish_change(con, project, config.job, ("notifications",))
    if force_send and delivery.status != "sent":
        error = ConfigError if delivery.status == "skipped" else NotifyError
        raise error(f"report written to {path} but not mailed: {delivery.error}")
    return path
