"""One run of a job, step by step.

    begin     migrate, mark runs left 'running' by dead processes as crashed, record this run
    extract   one pass over [watermark, as_of): each row checked against the data contract, each
              valid row tallied for drift and (with a champion) scored; timed as ``score`` then
    validate  quarantine bad rows; reject the batch when too many are bad (exit 3)
    drift     judge the tally against the champion's reference profile
    train     retrain when a trigger fires; the challenger goes through the gate
    score     a champion crowned or promoted in this run scores the kept rows again
    commit    one transaction: quarantine, drift, registry, scores, performance, watermark, run row
    publish   the committed scores file moved into published/ for analysts; then the report, the mail

The warehouse is opened only for ``begin``, ``extract`` (and the training pull) and ``commit``; the
steps between work on run files in ``<warehouse dir>/tmp/<run_id>/``: the rejected rows, the scores,
and the valid rows only when a later step may read them again (``JobRun._keeps_rows``). A crash
anywhere before the commit leaves the warehouse as it was, so the next run simply does the work
again. Backfills and drift runs (``backfill``) take the same pass; the run's state is one
``state.RunState``; the train and evaluate steps are in ``train_step``, the score step in
``score_step``; helpers shared with ``batchml try`` and the Dask engine are in ``shared``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pyarrow as pa

from batchml import logcontext
from batchml.config import JobConfig, with_model_classes
from batchml.data.extract import PullResult, batch_filter, read_run_file, run_file_schema
from batchml.data.validate import check_batch
from batchml.errors import BatchMLError, RejectedError, file_error, interrupted
from batchml.models import registry
from batchml.models.scoring import Predictor, load_for_scoring, prepare_engine
from batchml.monitoring import drift, performance
from batchml.pipeline.locks import job_lock
from batchml.pipeline.score_step import ScoreStep
from batchml.pipeline.shared import checkpoint, load_profile, refuse_future_cutoff, tallied_and_kept, with_model_features
from batchml.pipeline.state import RunState
from batchml.pipeline.train_step import TrainSteps
from batchml.project import Project
from batchml.storage import labels, model_rows, runlog, score_summaries
from batchml.storage.runlog import Run
from batchml.storage.source import describe_source, pull, restrict, set_cutoff
from batchml.storage.warehouse import migrate, transaction
from batchml.storage.writeback import (
    ensure_scores_table,
    scores_schema,
    write_drift_rows,
    write_performance,
    write_quarantine,
    write_scores,
)

log = logging.getLogger("batchml")


def run_job(
    project: Project,
    job: str,
    *,
    as_of: datetime | None = None,
    kind: str = "nightly",
    force_retrain: bool = False,
    notify: bool = True,
    cluster: str | None = None,
) -> Run:
    """Run ``job`` once, as of ``as_of`` (default: now, never later). Raises a :class:`BatchMLError` on failure.
    ``cluster``: a Dask scheduler address (runs on the Dask engine whatever the config says)."""
    if as_of is not None and kind == "nightly":  # replay checks its whole range first
        refuse_future_cutoff(as_of, "--as-of")
    config = project.job(job)
    with job_lock(project.locks, job):
        return nightly_run(project, config, as_of or registry.utcnow(), kind, force_retrain, notify, cluster).execute()


def nightly_run(project: Project, config: JobConfig, as_of: datetime, kind: str, force_retrain: bool, notify: bool,
                cluster: str | None = None) -> NightlyRun:
    """The run of the job's execution engine: this process, or a Dask cluster (``batchml.cluster``)."""
    if config.execution.engine == "dask" or cluster is not None:
        from batchml.cluster.run import DaskNightlyRun

        return DaskNightlyRun(project, config, as_of, kind, force_retrain, notify, cluster)
    return NightlyRun(project, config, as_of, kind, force_retrain, notify)


@dataclass(frozen=True)
class Duties:
    """What a kind of run does besides scoring and recording itself; a nightly run does all of it."""

    quarantine: bool = True  # its rejected rows into batchml.quarantine
    publish: bool = True  # after the commit: the analysts' Parquet files and catalog ...
    report: bool = True  # ... then the run's report (and mail) and the history page


class JobRun(TrainSteps, ScoreStep, ABC):
    """What every kind of run shares: begin, the one pass over the batch, checks, drift, the commit,
    publishing and the report, and the failure handling around them. What it finds goes to
    ``self.state``. Its kinds say which steps they take, in ``_steps``: :class:`NightlyRun` (and
    replays), ``backfill.BackfillRun``, ``backfill.DriftRun``, and their Dask forms in ``cluster.run``."""

    def __init__(self, project: Project, config: JobConfig, as_of: datetime, kind: str, force_retrain: bool, notify: bool,
                 duties: Duties = Duties()):
        self.project, self.config, self.duties = project, config, duties
        self.run = Run(job=config.job, kind=kind, as_of=as_of)
        self.force_retrain, self.notify = force_retrain, notify
        self.scratch = project.scratch / self.run.run_id
        self.scores_path = self.scratch / "scores.parquet"  # committed, then published as it is
        self.state = RunState(pull_config=config)

    # -- orchestration -------------------------------------------------------------------------

    def execute(self) -> Run:
        with logcontext.fields(job=self.config.job, run_id=self.run.run_id):
            return self._execute()

    def _execute(self) -> Run:
        self._begin()
        try:  # the run files live until publishing: the committed scores file becomes the published one
            self._run_steps()
            self._record_commit_time()
            self._after_commit()
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
        return self.run

    def _run_steps(self) -> None:
        """The steps, or the failure recorded (and raised, unless the commit went through after all)."""
        try:
            self._load_champion()  # a missing or tampered artifact fails the run: recorded, mailed
            self._steps()
        except BaseException as caught:
            # Ctrl-C inside a DuckDB query arrives as DuckDB's own error: an interrupt all the same
            exc = KeyboardInterrupt() if interrupted(caught) and not isinstance(caught, KeyboardInterrupt) else caught
            if isinstance(exc, OSError):  # a full disk or a read-only folder: recorded and raised as one line with the fix
                exc = file_error(exc)
            committed = not self._record_failure(exc)
            if committed:
                # the error struck after COMMIT (e.g. an interrupt while the connection closed): the run
                # stands as committed; only an interrupt stops what follows (publishing, the report)
                log.warning("%s: run %s was committed before %s; it stays succeeded", self.config.job, self.run.run_id,
                            f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            if not committed or not isinstance(exc, Exception):
                if exc is caught:
                    raise
                raise exc from caught

    @abstractmethod
    def _steps(self) -> None:
        """This kind of run's steps, each timed with ``self.run.step(name)``, the last one the commit."""

    @contextmanager
    def _connect(self) -> Iterator:
        with self.project.connect() as con:
            set_cutoff(con, self.run.as_of)  # feature SQL sees the source as of the cut-off
            restrict(con, self.config, self.project.root, self._own_folders())  # ... and no file but the source's
            yield con

    def _own_folders(self) -> tuple[Path, ...]:
        """Folders of the job's own files its connections must read besides the source: the run's
        (the commit reads its scores file)."""
        return (self.scratch,)

    def _warn(self, message: str) -> None:
        log.warning("%s: %s", self.config.job, message)

    # -- steps ---------------------------------------------------------------------------------

    def _begin(self) -> None:
        with self._connect() as con:
            migrate(con)
            crashed = runlog.mark_crashed(con, self.config.job)
            if crashed:
                log.warning("%s: marked %d earlier run(s) left running by a dead process as crashed", self.config.job, len(crashed))
            self.run.watermark_from = runlog.watermark(con, self.config.job)
            self._note_stale_cutoff()
            self.state.champion_row = model_rows.champion(con, self.config.job)
            runlog.insert_run(con, self.run)
        for run_id in crashed:  # a crashed run's pulls would otherwise stay in tmp/ for good
            shutil.rmtree(self.project.scratch / run_id, ignore_errors=True)
        log.info("%s: run %s as of %s", self.config.job, self.run.run_id, self.run.as_of.isoformat(sep=" "))

    def _note_stale_cutoff(self) -> None:
        """A cut-off before the watermark pulls nothing: say why, rather than report an empty batch."""
        run = self.run
        if run.watermark_from and run.as_of < run.watermark_from and run.kind in ("nightly", "replay", "drift"):
            run.note = (f"cut-off {run.as_of:%Y-%m-%d %H:%M} is before the watermark {run.watermark_from:%Y-%m-%d %H:%M}: "
                        f"those rows were pulled by an earlier run, nothing new to pull")
            log.warning("%s: %s", self.config.job, run.note)

    def _load_champion(self) -> None:
        if self.state.champion_row:
            self.run.champion_version = self.state.champion_row["version"]
            self.state.champion = registry.load(self.state.champion_row)
            self.config = with_model_classes(self.config, self.state.champion.manifest.get("classes"))
            if self._preloads_champion():
                self._preload(self.state.champion)

    def _preloads_champion(self) -> bool:
        """Whether the champion is the model this run's pass scores with (its predictor then loads at once)."""
        return self._scores_in_pass()

    def _preload(self, model: registry.LoadedModel) -> None:
        """Start loading ``model``'s predictor, with what its reasons read and its score profile, in a
        thread: 0.4 s at 300 trees x 63 leaves (compiled libraries, path tables) that overlaps this
        thread reading the run's history, describing the source and DuckDB counting the batch; the
        pass takes it (:meth:`_scorer`) when its first rows arrive."""
        config = self.config

        def load() -> Predictor:
            load_profile(model)
            return load_for_scoring(model, config, self._warn)

        loader = ThreadPoolExecutor(1, thread_name_prefix="batchml-load")
        try:
            self.state.scorer = (model, loader.submit(load))
        finally:
            loader.shutdown(wait=False)  # its thread ends with the load

    def _scorer(self) -> Predictor:
        """The predictor of the model the pass scores with: the one loading since it was known, or,
        when the run has chosen another since, that one's (loaded now)."""
        if self.state.scorer is None or self.state.scorer[0] is not self.state.champion:
            self._preload(self.state.champion)
        return self.state.scorer[1].result()

    def _batch_filter(self) -> str:
        return batch_filter(self.config, self.run.watermark_from, self.run.as_of)

    def _pull_config(self, con) -> JobConfig:
        """The job's config with the champion's features added to its pull: until a model trained on a
        changed feature list is promoted, the champion scores and the gate compares on its columns.
        Those the source no longer has are left out and remembered: scoring then fails, naming them.
        The source is described (and its columns checked) once per run."""
        if self.state.source_columns is None:
            self.state.source_columns = columns = describe_source(con, self.config, self.project.root)
            if self.state.champion is not None:
                self.state.champion_missing = [name for name in self.state.champion.spec.features if name not in columns]
                self.state.pull_config = with_model_features(self.config, self.state.champion.spec, leave_out=self.state.champion_missing)
        return self.state.pull_config

    def _extract(self) -> None:
        with self._connect() as con:
            self._pull_config(con)  # a source without the job's columns fails here, naming them
            if self.run.kind in ("nightly", "replay"):
                self._read_history(con)
            self.state.batch = self._pull_batch(con, self._batch_filter())
        self._pulled()

    def _read_history(self, con) -> None:
        """What the retrain triggers weigh besides the batch: new labels, the last training, realised performance."""
        enough = self.config.training.retrain.min_new_labels
        if enough:  # the count serves only that trigger: 0.1 s of the night's critical path at 2M rows
            self.state.new_labels = labels.count_new_labels(con, self.config, self.project.root, self.run.as_of, enough)
        self.state.last_trained = model_rows.last_trained(con, self.config.job)
        self.state.answered = self._answered_triggers(con)
        self.state.performance = performance.metric_rows(self.config.promotion.metric, labels.labeled_scores(
            con, self.config, self.project.root, self.run.as_of), self.config.label.objective)
        champion = self.state.champion_row["version"] if self.state.champion_row else None
        self.state.realised = performance.overall(self.state.performance, champion)

    def _scores_in_pass(self) -> bool:
        """Whether the pull scores the rows as it reads them (a night with a champion)."""
        return self.state.champion is not None and self.run.kind in ("nightly", "replay")

    def _pull_batch(self, con, where: str) -> PullResult:
        """One pass over the batch: each row is checked against the data contract (rejected rows go
        to a run file, for the quarantine), and each valid row tallied for drift, scored by the
        champion and, only when a later step may read it again, kept in a second run file. On the
        common night (no challenger can be promoted) the rows are read once: not written to disk and
        read back for drift, then again for scoring."""
        config = self._pull_config(con)
        profile = self._drift_reference() if self.state.champion is not None and self.run.kind != "backfill" else None
        sample_size = drift.current_sample_size(self.config.drift)
        self.state.drift_tally = drift.CurrentAccumulator(profile, sample_size=sample_size) if profile is not None else None
        if self._keeps_rows():
            self.state.kept_rows = self.scratch / "batch.arrow"
        scoring = self._scores_in_pass() and not self.state.champion_missing

        def valid_rows(batches: Iterator[pa.RecordBatch], rows: int) -> None:
            batches = tallied_and_kept(batches, self.state.drift_tally, profile, self.state.kept_rows)
            if scoring:
                self._score_champion(batches, rows, self._scorer())
            else:
                for _ in batches:
                    pass

        return pull(con, config, self.project.root, where, self.scratch / "rejected.arrow",
                    valid_rows=valid_rows, columns=self.state.source_columns)

    def _keeps_rows(self) -> bool:
        """Whether a later step may read the valid rows again: a champion crowned or promoted in this
        run scores them after training, shadow scores read them, a champion that cannot score leaves
        them to its error. Decided before the pass, so a retrain that drift alone may call for
        counts as possible (dataset drift is known only once every row has been tallied)."""
        if self.run.kind not in ("nightly", "replay"):
            return False
        if self.state.champion is None or self.state.champion_missing or self.config.promotion.shadow:
            return True
        return bool(self._due_triggers(self.state.answered, dataset_drift=True))

    def _pulled(self) -> None:
        self.run.rows_extracted = self.state.batch.rows
        self.run.rows_quarantined = sum(self.state.batch.by_rule.values())
        log.info("%s: extracted %d rows (%d quarantined)", self.config.job, self.state.batch.rows, self.run.rows_quarantined,
                 extra={"rows_extracted": self.state.batch.rows, "rows_quarantined": self.run.rows_quarantined, "step": "extract"})

    def _validate(self) -> None:
        check = check_batch(self.config, self.state.batch.rows, self.state.batch.by_rule, self.state.batch.null_fractions)
        if check.rejected:
            raise RejectedError(f"batch of {self.config.job} rejected: {'; '.join(check.problems)}")

    def _drift(self) -> None:
        if self.state.champion is None or self.valid_rows == 0:
            return
        profile = self._drift_reference()
        accumulator = self._current_drift(profile)
        self.state.drift_report = drift.compute_drift(profile, accumulator, self.config.drift)
        self.run.dataset_drift = self.state.drift_report.dataset_drift
        if self.state.drift_report.too_few_rows:
            self._add_note(f"drift measured on {self.valid_rows} rows but not judged (fewer than drift.min_rows "
                           f"{self.config.drift.min_rows}): nothing flagged, no drift trigger")
        log.info("%s: drift in %d/%d features%s", self.config.job, self.state.drift_report.drifted_count,
                 self.state.drift_report.feature_count, " (dataset drift)" if self.state.drift_report.dataset_drift else "")

    def _current_drift(self, profile: drift.ReferenceProfile) -> drift.CurrentAccumulator:
        """The batch's valid rows tallied against ``profile`` (during the pull)."""
        return self.state.drift_tally

    def _drift_reference(self) -> drift.ReferenceProfile:
        """The champion's profile of the features the config still has: a feature on one side only
        has nothing to be compared with, so it is skipped (and named) rather than failing the run."""
        if "drift_reference" in self.state.champion.cache:  # the pull tallies against it, the drift step compares
            return self.state.champion.cache["drift_reference"]
        features = self.config.features
        profile = load_profile(self.state.champion).restricted(features.numeric, features.categorical)
        measured = {*profile.numeric, *profile.categorical}
        champion_only = [name for name in self.state.champion.spec.features if name not in measured]
        config_only = [name for name in features.all if name not in measured]
        if champion_only or config_only:
            log.info("%s: drift skips features only one side has: champion v%d only [%s], config only [%s]", self.config.job,
                     self.state.champion.version, ", ".join(champion_only), ", ".join(config_only))
        self.state.champion.cache["drift_reference"] = profile
        return profile

    @property
    def valid_rows(self) -> int:
        return self.run.rows_extracted - self.run.rows_quarantined

    def _commit(self) -> None:
        job, run = self.config.job, self.run
        advance = self.state.champion is not None and run.kind in ("nightly", "replay")
        run.watermark_to = max(filter(None, [run.as_of, run.watermark_from])) if advance else run.watermark_from
        run.status, run.finished_at = "succeeded", registry.utcnow()
        with self._connect() as con:
            with transaction(con):
                self._write_quarantine(con)
                self._write_drift(con)
                for write in self.state.pending:
                    write(con)
                self._write_scores(con)
                if self.state.shadow_path is not None and self.state.shadow_path.exists():
                    write_scores(con, self.config, self.state.shadow_path, suffix="_shadow")
                for model in (self.state.champion, self.state.shadow_model):  # libraries compiled on first use in this run
                    if model is not None:
                        model_rows.register_libraries(con, model.job, model.version, model.take_unregistered())
                self._write_performance(con)
                if advance:
                    runlog.set_watermark(con, job, run.watermark_to, run.run_id)
                runlog.update_run(con, run)
                checkpoint("commit")  # everything written, nothing committed yet
            checkpoint("committed")  # committed; the connection not yet closed (DuckDB checkpoints on close)

    # -- writers (inside the commit transaction) ------------------------------------------------

    def _write_scores(self, con) -> None:
        if self.run.rows_scored:
            write_scores(con, self.config, self.scores_path)
            if self.run.kind in score_summaries.NIGHT_KINDS:  # what the history page charts: no scan of every night's scores
                score_summaries.fill_missing(con, self.config.job, self.config.scores_table)  # nights before the table, once
                score_summaries.insert(con, self.config.job, [score_summaries.summarise_file(con, self.run.run_id, self.scores_path)])
        elif self.run.kind in ("nightly", "replay") and self.state.batch is not None and self.state.batch.path.exists():
            # the first runs without a champion: analysts can query the (empty) table already
            ensure_scores_table(con, self.config, scores_schema(run_file_schema(self.state.batch.path), self.config))

    def _write_quarantine(self, con) -> None:
        if not self.duties.quarantine or not self.run.rows_quarantined:
            return
        write_quarantine(con, self.run.run_id, self.config.job, read_run_file(self.state.batch.path, valid=False))

    def _write_drift(self, con) -> None:
        rows = list(self.state.drift_report.to_rows()) if self.state.drift_report else []
        rows += self.state.prediction_drift
        version = self.run.champion_version if self.state.drift_report is None else self.state.champion_row["version"]
        write_drift_rows(con, self.run.run_id, self.config.job, version, rows)

    def _write_performance(self, con) -> None:
        write_performance(con, self.run.run_id, self.config.job, [*self.state.performance, *self.state.estimated])

    # -- failure and aftermath -------------------------------------------------------------------

    def _record_failure(self, exc: BaseException) -> bool:
        """Record the run as failed (or rejected), publish and mail that; False, recording nothing,
        when its commit had gone through after all (the error struck after COMMIT: its row says
        succeeded only then)."""
        run = self.run
        try:
            with self._connect() as con:
                if runlog.status(con, run.run_id) == "succeeded":
                    return False
                self._mark_failed(exc)
                with transaction(con):
                    if run.status == "rejected":
                        self._write_quarantine(con)  # kept for diagnosis; the batch itself is not consumed
                    if self.state.keep_challenger:
                        for write in self.state.pending:  # the challenger the failure message tells the user to promote
                            write(con)
                    runlog.update_run(con, run)
        except BatchMLError as secondary:
            # the warehouse is out of reach (locked, say): publishing and the report would wait for it in vain
            self._mark_failed(exc)
            log.error("%s: could not record the failure of run %s: %s", self.config.job, run.run_id, secondary)
            return True
        if not isinstance(exc, KeyboardInterrupt):
            self._publish()  # analysts see failed and rejected runs too, not only at the next success
            if self.notify:
                self._report_and_notify()
        return True

    def _mark_failed(self, exc: BaseException) -> None:
        run = self.run
        run.status = "rejected" if isinstance(exc, RejectedError) else "failed"
        run.error = str(exc) if isinstance(exc, BatchMLError) else f"{type(exc).__name__}: {exc}"
        run.finished_at = registry.utcnow()
        # nothing of the run was committed: no scores, no promotion, the watermark where it was
        run.rows_scored, run.watermark_to, run.promoted = 0, run.watermark_from, False

    def _record_commit_time(self) -> None:
        try:
            with self._connect() as con:
                runlog.record_timings(con, self.run)
        except BatchMLError as exc:  # the run is committed; only a figure is missing
            log.warning("%s: could not record the commit time of run %s: %s", self.config.job, self.run.run_id, exc)

    def _after_commit(self) -> None:
        if not self.duties.publish:
            return
        if self.run.promoted:
            prepare_engine(self.state.champion, self.config.scoring.engine, warn=self._warn)
            self._register_libraries()
        self._publish()
        if self.duties.report:
            self._report_and_notify()

    def _register_libraries(self) -> None:
        """The new champion's compiled libraries into the warehouse: unregistered, no run would load them."""
        if not self.state.champion.unregistered:
            return
        try:
            with self._connect() as con:
                model_rows.register_libraries(con, self.state.champion.job, self.state.champion.version, self.state.champion.take_unregistered())
        except BatchMLError as exc:  # the run is committed; the libraries are refused until rebuilt
            self._warn(f"compiled libraries of v{self.state.champion.version} not registered ({exc}); runs score with LightGBM "
                       f"until `batchml models compile {self.config.job}` builds and registers them")

    def _publish(self) -> None:
        from batchml.storage import publish

        try:
            # this run and any an earlier process committed but died before publishing
            scores = self._own_scores()
            own = {self.run.run_id: scores} if self.run.status == "succeeded" and scores else {}
            publish.publish_pending(self.project, self.config, own)
        except (BatchMLError, OSError) as exc:  # e.g. a full disk under published/
            message = file_error(exc) if isinstance(exc, OSError) else exc
            recorded = "the run itself is committed" if self.run.status == "succeeded" else f"the run is recorded as {self.run.status}"
            log.warning("%s: publishing for analysts failed (%s): %s", self.config.job, recorded, message)

    def _own_scores(self) -> Path | tuple[Path, ...] | None:
        """The committed scores file publishing moves into place (None: written from the table)."""
        return self.scores_path if self.scores_path.exists() else None

    def _report_and_notify(self) -> None:
        from batchml.reports import deliver as reporting  # matplotlib is imported only when a report is written

        try:
            reporting.report_and_notify(self.project, self.config, self.run.run_id, send=self.notify)
        except BatchMLError as exc:
            log.warning("%s: report not delivered: %s", self.config.job, exc)
        if self.run.kind == "nightly":  # a replay refreshes the page once, after its last night
            reporting.refresh_history(self.project, self.config, self.run.run_id, send=self.notify)


class NightlyRun(JobRun):
    """A nightly (or replay) run: the steps of the module docstring, in that order."""

    def _steps(self) -> None:
        # with a champion the pull scores as it reads: one pass (the step is timed as scoring, as a backfill's)
        with self.run.step("score" if self._scores_in_pass() else "extract"):
            self._extract()
        checkpoint("extract")
        with self.run.step("validate"):
            self._validate()
        with self.run.step("drift"):
            self._drift()
        with self.run.step("train"):
            candidate = self._retrain()
        checkpoint("train")
        if candidate is not None:
            with self.run.step("evaluate"):
                self._gate(candidate)
        with self.run.step("score"):
            self._score()
        checkpoint("score")
        with self.run.step("commit"):
            self._commit()
