"""Runs that are not the plain nightly one: backfills, replays and drift-only runs."""

from __future__ import annotations

import logging
from datetime import date, datetime, timedelta

from batchml.models import registry
from batchml.storage import model_rows
from batchml.errors import BatchMLError, ConfigError, ModelError
from batchml.data.extract import event_range_filter
from batchml.pipeline.locks import job_lock
from batchml.pipeline.nightly import Duties, JobRun, run_job
from batchml.pipeline.shared import refuse_future_cutoff
from batchml.pipeline.progress import track
from batchml.project import Project
from batchml.storage import runlog
from batchml.storage.runlog import Run
from batchml.storage.warehouse import migrate, table_exists
from batchml.storage.writeback import scored_between

log = logging.getLogger("batchml")


def day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day)


class BackfillRun(JobRun):
    """Re-score every row whose event time falls in [start, end] with the champion or version N.

    Appends new score rows under a new run id; never deletes, never moves the watermark.
    """

    def __init__(self, project: Project, config, start: date, end: date, version: int | None, dry_run: bool):
        # appends scores, never moves the watermark; a dry run writes nothing but its run row
        duties = Duties(quarantine=not dry_run, publish=not dry_run, report=not dry_run)
        super().__init__(project, config, registry.utcnow(), "backfill", False, False, duties)
        self.start, self.end, self.version, self.dry_run = start, end, version, dry_run
        self.run.dry_run = dry_run

    def _batch_filter(self) -> str:
        return event_range_filter(self.config, day_start(self.start), day_start(self.end) + timedelta(days=1), self.run.as_of)

    def _choose_model(self) -> None:
        if self.version is not None:
            with self._connect() as con:
                row = model_rows.get(con, self.config.job, self.version)
            if row is None:
                raise ConfigError(f"job {self.config.job} has no model v{self.version}; see `batchml models list {self.config.job}`")
            self.state.champion = registry.load(row)  # the pass loads its predictor (JobRun._scorer)
        if self.state.champion is None:
            raise ModelError(f"job {self.config.job} has no champion to backfill with; run it once first")

    def _steps(self) -> None:
        self._choose_model()
        # the first step times the look for earlier scores too, as a nightly run's steps time its
        # queries before the pass: a run's steps cover all its work between begin and the commit
        if self.dry_run:
            with self.run.step("extract"):
                earlier = self._earlier_scores()
                self._extract()
            with self.run.step("validate"):
                self._validate()
            self._require_fed()
            # the row keeps what was pulled and would be quarantined: rows_scored 0 says nothing was written
            self.run.note = (f"dry run: {self.valid_rows} rows would be scored with v{self.state.champion.version}, "
                             f"{self.run.rows_quarantined} quarantined; nothing written")
            log.info("%s: %s", self.config.job, self.run.note)
        else:
            with self.run.step("score"):  # pull and score in one pass (the step times both)
                earlier = self._earlier_scores()
                self._pull_and_score()
            with self.run.step("validate"):  # a rejected batch's scores are simply not committed
                self._validate()
        if earlier:
            verb = "would append" if self.dry_run else "appended"
            done = f"{earlier}; this run {verb} {self.valid_rows if self.dry_run else self.run.rows_scored} more"
            self.run.note = f"{self.run.note}; {done}" if self.run.note else done
        with self.run.step("commit"):
            self._commit()

    def _earlier_scores(self) -> str | None:
        """Say before scoring that the range holds scores already: a backfill appends, it never replaces."""
        with self._connect() as con:
            earlier = scored_between(con, self.config, day_start(self.start), day_start(self.end) + timedelta(days=1))
        if not earlier:
            return None
        said = ", ".join(f"{r['rows']} by v{r['model_version']} from {r['runs']} run{'s' * (r['runs'] > 1)}" for r in earlier)
        told = f"events of {self.start}..{self.end} already had {sum(r['rows'] for r in earlier)} score rows ({said})"
        log.warning("%s: %s; this backfill appends another score per row (scores are append-only; %s_latest shows the newest)",
                    self.config.job, told, self.config.scoring.table)
        return told

    def _pull_and_score(self) -> None:
        """The valid rows go from DuckDB straight to the model (``JobRun._pull_batch``): a backfill
        of millions of rows never writes them to disk and reads them back (the run file keeps only
        rejected rows, for the quarantine). So the warehouse stays open while they are scored; another
        job's run waits for it, up to ``BATCHML_LOCK_TIMEOUT``. No shadow scores: those are for new rows."""
        self._extract()

    def _scores_in_pass(self) -> bool:
        return not self.dry_run

    def _preloads_champion(self) -> bool:
        return super()._preloads_champion() and self.version is None  # --model-version: another model scores

    def _pull_batch(self, con, where: str):
        if not self.dry_run:
            self._require_fed()  # before reading every row for nothing
        return super()._pull_batch(con, where)

    def _model_role(self) -> str:
        return "model" if self.version is not None else "champion"

    def _unfed_fix(self) -> str:
        return (f"backfill with a model trained on the current features (--model-version N, see "
                f"`batchml models list {self.config.job}`)")


class DriftRun(JobRun):
    """Drift of the rows a nightly run would pull now; writes only the drift rows of a 'drift' run."""

    def __init__(self, project: Project, config, as_of: datetime):
        # quarantines nothing; its drift rows go to the analysts' catalog, no report, no mail
        super().__init__(project, config, as_of, "drift", False, False, Duties(quarantine=False, report=False))

    def _steps(self) -> None:
        if self.state.champion is None:  # before pulling every row for nothing
            raise ModelError(f"job {self.config.job} has no champion yet, so there is no reference to measure drift against")
        with self.run.step("extract"):
            self._extract()
        with self.run.step("drift"):
            self._drift()
        # the row says what was pulled (rows_extracted) and what a run would quarantine; rows_scored 0
        self.state.pending.clear()
        with self.run.step("commit"):
            self._commit()



def backfill(project: Project, job: str, start: date, end: date, *, version: int | None = None, dry_run: bool = False,
             cluster: str | None = None) -> Run:
    """Re-score the rows with event time in [start, end] (end inclusive as a day); ``cluster``: on
    that Dask scheduler (as with ``execution.engine: dask``)."""
    if end < start:
        raise ConfigError(f"--end {end} is before --start {start}")
    config = project.job(job)
    if version is not None:
        require_version(project, job, version)  # a usage error: exit 2 before a run row exists
    with job_lock(project.locks, job):
        if config.execution.engine == "dask" or cluster is not None:
            from batchml.cluster.run import DaskBackfillRun

            return DaskBackfillRun(project, config, start, end, version, dry_run, cluster).execute()
        return BackfillRun(project, config, start, end, version, dry_run).execute()


def require_version(project: Project, job: str, version: int) -> None:
    row = None
    if project.warehouse.exists():
        with project.connect(read_only=True) as con:
            row = model_rows.get(con, job, version) if table_exists(con, "batchml.models") else None
    if row is None:
        raise ConfigError(f"job {job} has no model v{version}; see `batchml models list {job}`")


def measure_drift(project: Project, job: str, as_of: datetime | None = None) -> Run:
    if as_of is not None:
        refuse_future_cutoff(as_of, "--as-of")
    config = project.job(job)
    with job_lock(project.locks, job):
        return DriftRun(project, config, as_of or registry.utcnow()).execute()


def replay(project: Project, job: str, start: date, end: date, *, notify: bool = False, on_night=None,
           synthetic: bool = False, cluster: str | None = None, on_skip=None) -> list[Run]:
    """The nightly run for each day of [start, end] in order, as of the end of that day.

    Resumable: a day whose replay already succeeded (same as_of) is skipped (``on_skip(day, as_of)``). Nights after now are
    refused (see ``pipeline.refuse_future_cutoff``) unless the data is ``synthetic`` (the demo's
    fixed calendar, whose rows for later days already exist).
    """
    if end < start:
        raise ConfigError(f"--end {end} is before --start {start}")
    if not synthetic:
        refuse_future_cutoff(day_start(end) + timedelta(days=1), f"--end {end}: the night up to")
    runs = []
    days = [start + timedelta(days=i) for i in range((end - start).days + 1)]
    for day in track(days, total=len(days), description=f"replaying {job}"):
        as_of = day_start(day) + timedelta(days=1)
        if _replayed(project, job, as_of):
            log.info("%s: %s (as of %s UTC) already replayed", job, day, f"{as_of:%Y-%m-%d %H:%M}")
            if on_skip:
                on_skip(day, as_of)
            continue
        run = run_job(project, job, as_of=as_of, kind="replay", notify=notify, cluster=cluster)
        runs.append(run)
        if on_night:
            on_night(run)
    if runs:
        _refresh_history(project, job)
    return runs


def _refresh_history(project: Project, job: str) -> None:
    """The history page once after the replayed nights (not after each: it reads every night again)."""
    from batchml.reports import deliver as reporting  # matplotlib is imported only when a page is written

    try:
        reporting.write_history(project, project.job(job))
    except BatchMLError as exc:
        log.warning("%s: history page not written: %s", job, exc)


def _replayed(project: Project, job: str, as_of: datetime) -> bool:
    if not project.warehouse.exists():
        return False
    with project.connect() as con:
        migrate(con)
        return runlog.replay_succeeded(con, job, as_of)
