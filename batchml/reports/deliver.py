"""Glue between the warehouse and the report: read a run back, render it, write it, mail it.

``report`` renders and ``notify`` delivers; neither touches DuckDB. This module reads what they
need from the warehouse and records each delivery in ``batchml.notifications``.
"""

from __future__ import annotations

import json
import logging
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

from batchml.models import registry
from batchml.config import JobConfig
from batchml.errors import BatchMLError, ConfigError, NotifyError
from batchml.project import Project
from batchml.storage import runlog
from batchml.storage.publish import publish_change
from batchml.reports.history import HistoryData, build_history
from batchml.reports.run_report import HISTORY_FILE, Report, ReportData, build_report, should_notify, write_page, write_report
from batchml.storage.warehouse import fetch_dicts, fetch_one, migrate, quote_table, table_exists

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
    if not project.warehouse.exists():  # connecting would create an empty warehouse file
        raise _no_runs(config)
    with project.connect() as con:
        data = load_report_data(con, config, run_id)
    history = project.reports / config.job / HISTORY_FILE
    report = build_report(data, templates=project.settings.templates_path, history_path=str(history))
    path = write_report(report, project.reports / config.job)
    log.info("%s: report written to %s", config.job, path)
    events = should_notify(data, config.notify.on)
    if force_send and not config.notify.email:
        raise ConfigError(f"report written to {path} but not mailed: job {config.job} has no recipients; "
                          f"list them under notify.email in configs/{config.job}.yaml")
    if not send or not config.notify.email or not (events or force_send):
        return path
    delivery = _deliver(project, config, report, data.run_id, "run", quiet=force_send)
    if force_send and delivery.status != "sent":
        error = ConfigError if delivery.status == "skipped" else NotifyError
        raise error(f"report written to {path} but not mailed: {delivery.error}")
    return path


def _deliver(project: Project, config: JobConfig, report: Report, run_id: str | None, kind: str, *, quiet: bool):
    """Mail ``report`` to the job's recipients and record the attempt in batchml.notifications.

    ``quiet``: the caller turns a failure into an error itself, so a skipped mail is not also a warning."""
    from batchml.reports.mail import send_report

    delivery = send_report(report, list(config.notify.email), project.settings)
    what = "report" if kind == "run" else "history page"
    if delivery.status == "failed":
        log.warning("%s: %s mail not delivered: %s", config.job, what, delivery.error)
    elif delivery.status == "skipped" and not quiet:
        # the job asks for mail that this machine cannot send: say so, or the team waits for it in vain
        log.warning("%s: %s not mailed: %s", config.job, what, delivery.error)
    elif delivery.status == "sent":
        log.info("%s: %s mailed to %s", config.job, what, ", ".join(delivery.recipients))
    with project.connect() as con:
        migrate(con)  # a warehouse last written before the notifications' `report` column
        con.execute(
            "INSERT INTO batchml.notifications (run_id, job, recipients, status, error, attempts, sent_at, report) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [run_id, config.job, ", ".join(delivery.recipients or config.notify.email), delivery.status, delivery.error,
             delivery.attempts, registry.utcnow(), kind],
        )
        # a run publishes before its report is mailed: without this the catalog lags a notification behind
        publish_change(con, project, config.job, ("notifications",))
    return delivery


# --------------------------------------------------------------------------- the history page


def _since_clause(since: datetime | None, column: str) -> str:
    return "" if since is None else f" AND {column} >= ?"


def load_history_data(con, config: JobConfig, since: datetime | None = None, reports: Path | None = None) -> HistoryData:
    """The job's runs since ``since`` (all of them by default) and what they recorded: only batchml's
    own tables (runs, drift, performance, model events, the scores' per-run summaries), never the source."""
    if not table_exists(con, "batchml.runs"):
        raise _no_runs(config)
    after = [] if since is None else [since]
    runs = fetch_dicts(con, "SELECT run_id, kind, status, as_of, started_at, finished_at, rows_extracted, rows_quarantined, "
                            "rows_scored, champion_version, challenger_version, promoted, dataset_drift, error, note, timings "
                            "FROM batchml.runs WHERE job = ? AND status <> 'running'" + _since_clause(since, "as_of") +
                            " ORDER BY as_of, started_at", [config.job, *after])
    if not runs and since is None:
        raise _no_runs(config)
    for run in runs:
        run["timings"] = json.loads(run["timings"] or "{}")
    nights = "SELECT run_id FROM batchml.runs WHERE job = ? AND kind IN ('nightly', 'replay') AND status = 'succeeded'" + _since_clause(since, "as_of")
    data = HistoryData(job=config.job, metric=config.promotion.metric, since=since, runs=runs, generated_at=registry.utcnow(),
                       band_order=[band for band, _ in config.band_edges] + ["low"])
    data.drift = fetch_dicts(con, "SELECT run_id, feature, method, statistic, p_value, threshold, drifted FROM batchml.drift "
                                  f"WHERE job = ? AND kind = 'feature' AND run_id IN ({nights})", [config.job, config.job, *after])
    data.realised, data.estimated = (_performance_by_day(con, config, since, estimated) for estimated in (False, True))
    data.events = fetch_dicts(con, "SELECT e.*, r.as_of FROM batchml.model_events e LEFT JOIN batchml.runs r USING (run_id) "
                                   "WHERE e.job = ?" + _since_clause(since, "e.recorded_at") + " ORDER BY e.recorded_at", [config.job, *after])
    for event in data.events:
        event["metrics"] = json.loads(event["metrics"] or "{}")
    if table_exists(con, config.scores_table):
        data.scores, data.bands = _score_summaries(con, config, nights, after)
    if reports is not None and reports.is_dir():
        data.reports = {path.stem for path in reports.glob("*.html")}
    return data


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
    """Per night: score quantiles and rows per risk band, aggregated in the warehouse (one pass each)."""
    table = quote_table(config.scores_table)
    scores = fetch_dicts(con, f"SELECT run_id, count(*) AS n, approx_quantile(score, [0.1, 0.25, 0.5, 0.75, 0.9]) AS q "
                              f"FROM {table} WHERE run_id IN ({nights}) GROUP BY run_id", [config.job, *after])
    for row in scores:
        row.update(zip(("p10", "p25", "p50", "p75", "p90"), row.pop("q")))
    bands = fetch_dicts(con, f"SELECT run_id, risk_band, count(*) AS n FROM {table} WHERE run_id IN ({nights}) GROUP BY ALL",
                        [config.job, *after])
    return scores, bands


def write_history(project: Project, config: JobConfig, since: datetime | None = None, *, send: bool = False) -> Path:
    """Write ``reports/<job>/history.html`` from the warehouse; with ``send``, mail it too (an error
    when it cannot go out, as for ``report --send``)."""
    target, page = _write_history(project, config, since)
    if send:
        if not config.notify.email:
            raise ConfigError(f"history page written to {target} but not mailed: job {config.job} has no recipients; "
                              f"list them under notify.email in configs/{config.job}.yaml")
        delivery = _deliver(project, config, page, None, "history", quiet=True)
        if delivery.status != "sent":
            error = ConfigError if delivery.status == "skipped" else NotifyError
            raise error(f"history page written to {target} but not mailed: {delivery.error}")
    return target


def _write_history(project: Project, config: JobConfig, since: datetime | None) -> tuple[Path, Report]:
    if not project.warehouse.exists():  # connecting would create an empty warehouse file
        raise _no_runs(config)
    folder = project.reports / config.job
    with project.connect(read_only=True) as con:
        data = load_history_data(con, config, since, folder)
    target = folder / HISTORY_FILE
    page = build_history(data, templates=project.settings.templates_path, path=str(target))
    write_page(page.html_file(), target)
    log.info("%s: history page written to %s", config.job, target)
    return target, page


def weekly_due(con, config: JobConfig, run_id: str) -> bool:
    """Whether ``run_id`` is the job's first nightly run of its week (Monday 00:00 in
    ``schedule.timezone``): the one that mails the history page under ``notify.on: [weekly]``.
    A Monday run that did not happen hands the mail to the next night of that week."""
    run = fetch_one(con, "SELECT as_of, started_at, kind FROM batchml.runs WHERE run_id = ?", [run_id])
    if run is None or run["kind"] != "nightly":
        return False
    start = week_start(run["as_of"], config.schedule.timezone)
    earlier = fetch_one(con, "SELECT count(*) AS n FROM batchml.runs WHERE job = ? AND kind = 'nightly' AND run_id <> ? "
                             "AND as_of >= ? AND started_at < ?", [config.job, run_id, start, run["started_at"]])
    return earlier["n"] == 0


def week_start(as_of: datetime, zone: str) -> datetime:
    """Monday 00:00 of ``as_of``'s week in time zone ``zone``, as naive UTC (the warehouse's time)."""
    local = as_of.replace(tzinfo=timezone.utc).astimezone(ZoneInfo(zone))
    monday: date = local.date() - timedelta(days=local.weekday())
    start = datetime.combine(monday, time(0), tzinfo=ZoneInfo(zone))
    return start.astimezone(timezone.utc).replace(tzinfo=None)


def refresh_history(project: Project, config: JobConfig, run_id: str, *, send: bool) -> None:
    """After a nightly run's report: rewrite the history page, and mail it on the week's first night
    when ``notify.on`` lists ``weekly``. Never fails the run: a problem is a warning."""
    try:
        _, page = _write_history(project, config, None)
        if not (send and "weekly" in config.notify.on and config.notify.email):
            return
        with project.connect(read_only=True) as con:
            due = weekly_due(con, config, run_id)
        if due:
            _deliver(project, config, page, run_id, "history", quiet=False)
    except BatchMLError as exc:
        log.warning("%s: history page not refreshed: %s", config.job, exc)
