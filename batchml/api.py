"""The library functions the ``batchml`` command calls, for orchestrators and notebooks.

Each function takes the job's name and, optionally, the project (a :class:`Project`, a folder, or
``None`` for ``BATCHML_PROJECT`` / the current directory), does what its command does and returns
what the command prints from. Errors are :class:`~batchml.errors.BatchMLError` subclasses whose
``exit_code`` is the command's::

    import batchml

    run = batchml.run("vuln_risk", project="/srv/batchml", as_of="2026-11-28")
    print(run.status, run.rows_scored, run.champion_version)

Cut-offs (``as_of``) may be a ``datetime`` (naive = UTC; an aware one, as Airflow, Dagster and
Prefect pass, is converted to UTC), a ``date`` (00:00 UTC) or an ISO string.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import date, datetime, timezone
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

from batchml.errors import ConfigError
from batchml.project import Project

if TYPE_CHECKING:
    from batchml.storage.runlog import Run

ProjectLike = Project | str | PathLike | None
CutOff = datetime | date | str | None


def open_project(project: ProjectLike = None, warehouse: str | PathLike | None = None) -> Project:
    """The project at ``project`` (default: ``BATCHML_PROJECT`` or the current directory) and its
    warehouse (default: ``BATCHML_WAREHOUSE`` or ``<project>/warehouse/warehouse.duckdb``)."""
    if isinstance(project, Project):
        return project
    opened = Project.open(Path(project) if project is not None else None, Path(warehouse) if warehouse is not None else None)
    # the default folder is made on first use; a warehouse elsewhere in a missing folder is a typo
    default = (opened.root / "warehouse" / "warehouse.duckdb").resolve()
    if opened.warehouse != default and not opened.warehouse.parent.is_dir():
        raise ConfigError(f"the folder of warehouse {opened.warehouse} does not exist; create it, or fix --warehouse "
                          f"(or BATCHML_WAREHOUSE)")
    return opened


def cutoff(value: CutOff, what: str = "as_of") -> datetime | None:
    """A cut-off as the naive UTC datetime batchml stores: a bare date is 00:00 UTC of that day, a
    time with an offset is converted to UTC, a naive time is taken as UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ConfigError(f"{what} {value!r} is not a date or time; use e.g. 2026-11-28 or 2026-11-28T02:00:00Z") from None
    elif not isinstance(value, date):
        raise ConfigError(f"{what} {value!r} is not a date or time; pass a datetime, a date or an ISO string")
    if not isinstance(value, datetime):
        return datetime(value.year, value.month, value.day)
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


def day(value: date | str, what: str) -> date:
    """A day of a backfill range: a ``date`` (or a ``datetime``'s day) or ``YYYY-MM-DD``."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {value!r} is not a date; use YYYY-MM-DD") from None


def run(job: str, *, project: ProjectLike = None, as_of: CutOff = None, force_retrain: bool = False,
        notify: bool = True, cluster: str | None = None) -> Run:
    """One nightly run of ``job`` as of ``as_of`` (default now): ``batchml run``. ``cluster``: a Dask
    scheduler's address, as ``--cluster`` (default: ``execution`` in the job's config)."""
    from batchml.pipeline.nightly import run_job

    return run_job(open_project(project), job, as_of=cutoff(as_of), force_retrain=force_retrain, notify=notify,
                   cluster=cluster)


def backfill(job: str, start: date | str, end: date | str, *, project: ProjectLike = None, model_version: int | None = None,
             dry_run: bool = False, cluster: str | None = None) -> Run:
    """Re-score the rows whose event day is in ``[start, end]``: ``batchml backfill``."""
    from batchml.pipeline.backfill import backfill as run_backfill

    return run_backfill(open_project(project), job, day(start, "start"), day(end, "end"), version=model_version, dry_run=dry_run,
                        cluster=cluster)


def replay(job: str, start: date | str, end: date | str, *, project: ProjectLike = None, notify: bool = False,
           on_night=None, on_skip=None, cluster: str | None = None) -> list[Run]:
    """The nightly run of each day of ``[start, end]``, as of the end of that day (00:00 UTC of the
    next), point-in-time: ``batchml backfill --replay``. ``on_night(run)`` is called after each
    night; nights already replayed are skipped, with ``on_skip(day, as_of)``."""
    from batchml.pipeline.backfill import replay as run_replay

    return run_replay(open_project(project), job, day(start, "start"), day(end, "end"), notify=notify, on_night=on_night,
                      on_skip=on_skip, cluster=cluster)


def drift(job: str, *, project: ProjectLike = None, as_of: CutOff = None) -> Run:
    """Drift of the rows a nightly run would pull now, stored as a ``drift`` run: ``batchml drift``."""
    from batchml.pipeline.backfill import measure_drift

    return measure_drift(open_project(project), job, cutoff(as_of))


def list_models(job: str, *, project: ProjectLike = None) -> list[dict]:
    """Every model version of ``job`` with its status, window, rows and metrics: ``batchml models list``."""
    from batchml.models.manage import list_models as listed

    return listed(open_project(project), job)


def promote(job: str, version: int, *, reason: str, project: ProjectLike = None) -> int | None:
    """Make ``version`` the champion (recorded with the OS user and ``reason``); returns the previous champion."""
    from batchml.models.manage import promote as promoted

    return promoted(open_project(project), job, version, reason)


def rollback(job: str, *, reason: str, project: ProjectLike = None) -> tuple[int, int]:
    """Restore the champion the current one replaced; returns (restored, archived) versions."""
    from batchml.models.manage import rollback as rolled_back

    return rolled_back(open_project(project), job, reason)


def report(job: str, run_id: str | None = None, *, project: ProjectLike = None, send: bool = False) -> Path:
    """Write the HTML report of a run (default: the latest) and, with ``send``, mail it:
    ``batchml report``. Returns the report's path."""
    from batchml.reports.deliver import report_and_notify

    opened = open_project(project)
    return report_and_notify(opened, opened.job(job), run_id, send=send, force_send=send)


def history(job: str, *, project: ProjectLike = None, since: date | str | None = None, send: bool = False) -> Path:
    """Write ``reports/<job>/history.html``, one page over the job's runs (those with a cut-off from
    ``since``), and with ``send`` mail it: ``batchml report --history``. Returns the page's path."""
    from batchml.reports.deliver import write_history

    opened = open_project(project)
    start = None if since is None else cutoff(day(since, "since"))
    return write_history(opened, opened.job(job), start, send=send)


def list_runs(job: str, *, project: ProjectLike = None, limit: int = 20) -> list[dict]:
    """The job's ``limit`` most recent runs, newest first, as ``batchml.runs`` rows with ``triggers``
    and ``timings`` parsed and the gate's ``decision`` on the run's challenger: ``batchml runs list``."""
    from batchml.storage import runlog

    if limit < 1:
        raise ConfigError(f"--limit {limit}: give a number of runs, 1 or more")
    opened = open_project(project)
    opened.job(job)
    with _runs_table(opened) as con:
        return [] if con is None else runlog.list_runs(con, job, limit)


def show_run(run_id: str, *, project: ProjectLike = None) -> dict:
    """One run: its row as :func:`list_runs` gives it, plus ``report`` (the path of its HTML report,
    None if none was written): ``batchml runs show``."""
    from batchml.storage import runlog

    opened = open_project(project)
    with _runs_table(opened) as con:
        row = None if con is None else runlog.get_run(con, run_id)
    if row is None:
        raise ConfigError(f"no run {run_id} in {opened.warehouse}; list a job's runs with `batchml runs list JOB`")
    path = opened.reports / row["job"] / f"{run_id}.html"
    row["report"] = path if path.exists() else None
    return row


def prune(job: str, *, project: ProjectLike = None, keep_days: int = 90, delete: bool = False):
    """What the job's history no longer needs (see :mod:`batchml.storage.retention`): old model
    folders no score row or rollback needs, old run reports, scratch folders of finished runs.
    Returns the plan; removes it only with ``delete``: ``batchml prune`` (``--yes``)."""
    from batchml.pipeline.locks import job_lock
    from batchml.storage import retention

    if keep_days < 0:
        raise ConfigError(f"--keep-days {keep_days}: give a number of days, 0 or more")
    opened = open_project(project)
    config = opened.job(job)
    with job_lock(opened.locks, job):  # no run of the job writes or reads what is removed meanwhile
        with _runs_table(opened) as con:
            if con is None:
                return retention.PrunePlan(job, datetime.now(timezone.utc).replace(tzinfo=None))
            found = retention.plan(con, opened, config, keep_days)
        if delete:
            retention.apply(found)
    return found


@contextmanager
def _runs_table(project: Project):
    """A read-only connection to a warehouse that has ``batchml.runs``, else None (nothing has run)."""
    from batchml.storage.warehouse import table_exists

    if not project.warehouse.exists():  # connecting would create an empty warehouse
        yield None
        return
    with project.connect(read_only=True) as con:
        yield con if table_exists(con, "batchml.runs") else None


def check(job: str | None = None, *, project: ProjectLike = None, echo=print) -> list:
    """Validate configs, feature SQL, source columns and the champion's artifacts; returns the
    problems found (``echo`` receives each line ``batchml check`` prints)."""
    from batchml.checks import check_project

    return check_project(open_project(project), job, echo=echo)
