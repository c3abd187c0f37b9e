"""One run of a job, step by step.

    begin     migrate, mark runs left 'running' by dead processes as crashed, record this run
    extract   pull [watermark, as_of) into a run file, checked against the data contract
    validate  quarantine bad rows; reject the batch when too many are bad (exit 3)
    drift     compare the batch with the champion's reference profile
    train     retrain when a trigger fires; the challenger goes through the gate
    score     stream the valid rows through the (possibly new) champion
    commit    one transaction: quarantine, drift, registry, scores, performance, watermark, run row
    publish   Parquet copies for analysts; then the report and the mail

The warehouse is opened only for ``begin``, ``extract`` (and the training pull) and ``commit``; the
steps between work on run files in ``<warehouse dir>/tmp/<run_id>/``. A crash anywhere before the
commit leaves the warehouse as it was, so the next run simply does the work again. (A backfill pulls
and scores in one pass instead: see ``backfill.BackfillRun``.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from batchml import logcontext
from batchml.monitoring import drift
from batchml.models import evaluate
from batchml.monitoring import performance
from batchml.models import registry
from batchml.storage import model_rows
from batchml.models import retrain
from batchml.storage import labels, runlog
from batchml.config import JobConfig, with_model_classes
from batchml.models.objectives import objective_of
from batchml.errors import BatchMLError, ConfigError, DataError, ModelError, RejectedError, file_error, interrupted
from batchml.data.extract import PullResult, batch_filter, read_run_file, run_file_batches, run_file_schema, training_filter, write_run_file
from batchml.storage.source import describe_source, odd_labels, pull, restrict, set_cutoff
from batchml.data.features import FeatureSpec, categorical_values, numeric_values
from batchml.pipeline.locks import job_lock
from batchml.pipeline.progress import track
from batchml.project import Project
from batchml.storage.runlog import Run
from batchml.models.scoring import Predictor, ScoreSummary, make_predictor, prepare_engine, score_batches
from batchml.data.validate import check_batch
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
ESTIMATE_SAMPLE = 200_000  # scores kept for the confidence-based performance estimate


def checkpoint(step: str) -> None:
    """Crash-test aid: with ``BATCHML_PAUSE_AT=<step>`` the run announces itself and waits there,
    so a test can ``kill -9`` it at a known point (after extract / train / score, inside commit)."""
    if os.environ.get("BATCHML_PAUSE_AT") == step:
        print(f"batchml: paused at {step} (pid {os.getpid()})", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("BATCHML_PAUSE_SECONDS", "60")))


FUTURE_TOLERANCE = timedelta(minutes=1)


def refuse_future_cutoff(as_of: datetime, what: str) -> None:
    """A cut-off after now would move the watermark past rows that have not landed yet: once they
    land they would be before it, and never pulled."""
    now = registry.utcnow()
    if as_of > now + FUTURE_TOLERANCE:
        raise ConfigError(f"{what} {as_of:%Y-%m-%d %H:%M} UTC is in the future (now {now:%Y-%m-%d %H:%M} UTC); "
                          f"rows landing before it later would never be scored: use a past cut-off, or none for now")


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


class NightlyRun:
    """The state of one run while its steps execute; see the module docstring for the order."""

    def __init__(self, project: Project, config: JobConfig, as_of: datetime, kind: str, force_retrain: bool, notify: bool):
        self.project, self.config = project, config
        self.run = Run(job=config.job, kind=kind, as_of=as_of)
        self.force_retrain, self.notify = force_retrain, notify
        self.scratch = project.scratch / self.run.run_id
        self.pending: list = []  # functions (con) -> None, executed inside the commit transaction
        self.champion_row: dict | None = None
        self.champion: registry.LoadedModel | None = None
        self.batch: PullResult | None = None
        self.pull_config = config  # the config's features plus the champion's (see _pull_config)
        self.champion_missing: list[str] = []  # champion features the source no longer has
        self.source_columns: dict[str, str] | None = None  # described by _pull_config, for the pulls that follow
        self.keep_challenger = False  # commit this run's challenger even though the run fails
        self.drift_report: drift.DriftReport | None = None
        self.decision: evaluate.GateDecision | None = None
        self.new_labels = 0
        self.last_trained: dict | None = None  # the job's most recently trained model (any status)
        self.answered: frozenset[str] = frozenset()  # triggers its last, unpromoted challenger was trained for
        self.realised: float | None = None
        self.performance: list[dict] = []
        self.scores_path = self.scratch / "scores.arrow"
        self.scored = ScoreSummary()
        self.shadow_model: registry.LoadedModel | None = None
        self.shadow_path: Path | None = None
        self.prediction_drift: list[dict] = []

    # -- orchestration -------------------------------------------------------------------------

    def execute(self) -> Run:
        with logcontext.fields(job=self.config.job, run_id=self.run.run_id):
            return self._execute()

    def _execute(self) -> Run:
        self._begin()
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
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
        self._record_commit_time()
        self._after_commit()
        return self.run

    def _steps(self) -> None:
        with self.run.step("extract"):
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

    @contextmanager
    def _connect(self) -> Iterator:
        with self.project.connect() as con:
            set_cutoff(con, self.run.as_of)  # feature SQL sees the source as of the cut-off
            restrict(con, self.config, self.project.root, self._own_folders())  # ... and no file but the source's
            yield con

    def _own_folders(self) -> tuple[Path, ...]:
        """Folders of the job's own files its connections must read besides the source (none here)."""
        return ()

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
            self.champion_row = model_rows.champion(con, self.config.job)
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
        if self.champion_row:
            self.run.champion_version = self.champion_row["version"]
            self.champion = registry.load(self.champion_row)
            self.config = with_model_classes(self.config, self.champion.manifest.get("classes"))

    def _batch_filter(self) -> str:
        return batch_filter(self.config, self.run.watermark_from, self.run.as_of)

    def _pull_config(self, con) -> JobConfig:
        """The job's config with the champion's features added to its pull: until a model trained on a
        changed feature list is promoted, the champion scores and the gate compares on its columns.
        Those the source no longer has are left out and remembered: scoring then fails, naming them."""
        if self.champion is None:
            return self.config
        self.source_columns = columns = describe_source(con, self.config, self.project.root)
        self.champion_missing = [name for name in self.champion.spec.features if name not in columns]
        self.pull_config = with_model_features(self.config, self.champion.spec, leave_out=self.champion_missing)
        return self.pull_config

    def _extract(self) -> None:
        where = self._batch_filter()
        with self._connect() as con:
            self.batch = self._pull_batch(con, where)
            if self.run.kind in ("nightly", "replay"):
                self.new_labels = labels.count_new_labels(con, self.config, self.project.root, self.run.as_of)
                self.last_trained = model_rows.last_trained(con, self.config.job)
                self.answered = self._answered_triggers(con)
                self.performance = performance.metric_rows(self.config.promotion.metric, labels.labeled_scores(
                    con, self.config, self.project.root, self.run.as_of), self.config.label.objective)
                champion = self.champion_row["version"] if self.champion_row else None
                self.realised = performance.overall(self.performance, champion)
        self._pulled()

    def _pull_batch(self, con, where: str) -> PullResult:
        """The batch's rows, checked against the data contract, into the run file."""
        return pull(con, self._pull_config(con), self.project.root, where, self.scratch / "batch.arrow", columns=self.source_columns)

    def _pulled(self) -> None:
        self.run.rows_extracted = self.batch.rows
        self.run.rows_quarantined = sum(self.batch.by_rule.values())
        log.info("%s: extracted %d rows (%d quarantined)", self.config.job, self.batch.rows, self.run.rows_quarantined,
                 extra={"rows_extracted": self.batch.rows, "rows_quarantined": self.run.rows_quarantined})

    def _validate(self) -> None:
        check = check_batch(self.config, self.batch.rows, self.batch.by_rule, self.batch.null_fractions)
        if check.rejected:
            raise RejectedError(f"batch of {self.config.job} rejected: {'; '.join(check.problems)}")

    def _drift(self) -> None:
        if self.champion is None or self.valid_rows == 0:
            return
        profile = self._drift_reference()
        accumulator = self._current_drift(profile)
        self.drift_report = drift.compute_drift(profile, accumulator, self.config.drift)
        self.run.dataset_drift = self.drift_report.dataset_drift
        if self.drift_report.too_few_rows:
            self._add_note(f"drift measured on {self.valid_rows} rows but not judged (fewer than drift.min_rows "
                           f"{self.config.drift.min_rows}): nothing flagged, no drift trigger")
        log.info("%s: drift in %d/%d features%s", self.config.job, self.drift_report.drifted_count,
                 self.drift_report.feature_count, " (dataset drift)" if self.drift_report.dataset_drift else "")

    def _current_drift(self, profile: drift.ReferenceProfile) -> drift.CurrentAccumulator:
        """The batch's valid rows tallied against ``profile``."""
        accumulator = drift.CurrentAccumulator(profile)
        for batch in run_file_batches(self.batch.path):
            accumulator.update(**feature_arrays(batch, profile))
        return accumulator

    def _drift_reference(self) -> drift.ReferenceProfile:
        """The champion's profile of the features the config still has: a feature on one side only
        has nothing to be compared with, so it is skipped (and named) rather than failing the run."""
        features = self.config.features
        profile = load_profile(self.champion).restricted(features.numeric, features.categorical)
        measured = {*profile.numeric, *profile.categorical}
        champion_only = [name for name in self.champion.spec.features if name not in measured]
        config_only = [name for name in features.all if name not in measured]
        if champion_only or config_only:
            log.info("%s: drift skips features only one side has: champion v%d only [%s], config only [%s]", self.config.job,
                     self.champion.version, ", ".join(champion_only), ", ".join(config_only))
        return profile

    @property
    def valid_rows(self) -> int:
        return self.run.rows_extracted - self.run.rows_quarantined

    def _retrain(self) -> retrain.Candidate | None:
        """Train a challenger if a trigger fires; the first model is crowned at once, others are returned for the gate."""
        self.run.triggers = self._due_triggers(self.answered)
        silent = [t for t in self._due_triggers(frozenset()) if t not in self.run.triggers]
        if silent:
            self._add_note(f"{', '.join(silent)} not retrained for again: challenger v{self.last_trained['version']} was "
                           f"trained for it at {self.last_trained['created_at']:%Y-%m-%d %H:%M} under champion "
                           f"v{self.champion_row['version']} and not promoted; the next challenger waits for new labels "
                           f"(training.retrain.min_new_labels) or age (every_days)")
        if not self.run.triggers or self._before_champion() or self._trained_already():
            return None
        log.info("%s: retraining (%s)", self.config.job, ", ".join(self.run.triggers))
        try:
            candidate = self._train_candidate()
        except DataError as exc:
            self.run.note = f"no challenger trained: {exc}"
            if self.champion is not None:  # without one, _wait_for_model warns with the whole story
                log.warning("%s: %s", self.config.job, self.run.note)
            return None
        self.run.challenger_version = candidate.version
        if self.champion is None:
            self._crown_first(candidate)
            return None
        return candidate

    def _due_triggers(self, answered: frozenset[str]) -> list[str]:
        return retrain.due_triggers(
            self.config, champion=self.champion_row, as_of=self.run.as_of, force=self.force_retrain,
            dataset_drift=self.run.dataset_drift, new_labels=self.new_labels, realised=self.realised,
            champion_spec=self.champion.spec if self.champion is not None else None,
            last_trained=self.last_trained, answered=answered,
        )

    def _answered_triggers(self, con) -> frozenset[str]:
        """Drift and decay that the job's last training already answered under the current champion
        with a challenger that was not promoted (see ``retrain.due_triggers``)."""
        seen, champion = self.last_trained, self.champion_row
        if seen is None or champion is None or seen["version"] == champion["version"] or seen["created_at"] > self.run.as_of:
            return frozenset()
        trained_by = runlog.get_run(con, seen.get("run_id"))
        if trained_by is None or trained_by["champion_version"] != champion["version"]:
            return frozenset()
        return frozenset({"drift", "decay"} & set(trained_by["triggers"]))

    def _before_champion(self) -> bool:
        """A cut-off before the champion's own: a challenger trained then would be judged on a
        holdout the champion learnt from, and could replace a newer model. Even when forced."""
        champion = self.champion_row
        if champion is None or self.run.as_of >= champion["created_at"]:
            return False
        self._add_note(f"retrain triggers ({', '.join(self.run.triggers)}) fired, but the cut-off is before champion "
                       f"v{champion['version']}'s own ({champion['created_at']:%Y-%m-%d %H:%M}): no challenger is trained "
                       f"behind the champion")
        return True

    def _add_note(self, note: str) -> None:
        self.run.note = f"{self.run.note}; {note}" if self.run.note else note
        log.info("%s: %s", self.config.job, note)

    def _trained_already(self) -> bool:
        """A rerun of a cut-off (or an earlier one) would train on the rows a model trained at that
        cut-off already saw: the same challenger again, rejected again. Only data-driven triggers
        are skipped this way; ``--force-retrain`` and a job without a champion still train."""
        seen = self.last_trained
        if seen is None or seen["created_at"] < self.run.as_of or {"forced", "no_champion"} & set(self.run.triggers):
            return False
        if self._on_current_features(seen) is False:
            return False  # trained on another feature list: the config's would make a different challenger
        self._add_note(f"retrain triggers ({', '.join(self.run.triggers)}) fired, but v{seen['version']} was trained at cut-off "
                       f"{seen['created_at']:%Y-%m-%d %H:%M} from the same rows: no new challenger (--force-retrain trains one anyway)")
        return True

    def _train_candidate(self) -> retrain.Candidate:
        from batchml.cluster.window import on_workers

        if on_workers(self.config):
            return self._train_candidate_on_workers()
        path = self.scratch / "train.arrow"
        with self._connect() as con:
            pulled = pull_training_rows(con, self.config, self.pull_config, self.project.root, self.run.as_of, path,
                                        columns=self.source_columns, warn=self._warn)
            version = model_rows.next_version(con, self.config.job)
        table = read_run_file(path)
        with self._trainer() as fitter:
            candidate = retrain.train_candidate(self.config, table, self.project.models, version, self.run.as_of, pulled.by_rule,
                                                fitter=fitter)
        log.info("%s: v%d: %d labeled rows in the window: %d trained on (fit and early stopping), %d held out, %d left out",
                 self.config.job, version, pulled.rows, candidate.trained.train_rows, candidate.split.holdout.num_rows,
                 sum(pulled.by_rule.values()))
        return candidate

    def _train_candidate_on_workers(self) -> retrain.Candidate:
        """``training.engine: dask`` over Parquet: the workers read the window (:mod:`batchml.cluster.window`)."""
        from batchml.cluster.connect import open_client, scheduler_address
        from batchml.cluster.window import train_candidate_on_workers
        from batchml.storage import lake

        config, root = self.config, self.project.root
        with self._connect() as con:
            columns = self.source_columns or describe_source(con, self.pull_config, root)
            odd, values = odd_labels(con, config, root, training_filter(config, self.run.as_of, labeled_only=False))
            version = model_rows.next_version(con, config.job)
        if odd:
            self._warn(objective_of(config.label.objective).odd_labels_message(odd, values, config.label.column))
        own = getattr(self, "client", None)
        address = getattr(self, "address", None) if own is not None else scheduler_address(config, None)
        home = self.project.home / "lake"
        with nullcontext(own) if own is not None else open_client(config, address) as client:
            try:
                candidate, pulled = train_candidate_on_workers(
                    client, address, config, self.pull_config, root, home, self.run.run_id, self.run.as_of, columns,
                    self.project.settings.memory_limit, self.project.models, version, warn=self._warn)
            finally:
                if own is None:  # the Dask engine's run removes its staging (scoring still reads it) at its end
                    lake.remove_staging(home, config.job, self.run.run_id)
        log.info("%s: v%d: %d labeled rows in the window, read by the workers: %d trained on (fit and early stopping), "
                 "%d held out, %d left out", config.job, version, pulled.rows, candidate.trained.train_rows,
                 candidate.split.holdout.num_rows, sum(pulled.by_rule.values()))
        return candidate

    def _trainer(self):
        """How the challenger is fitted: in this process, or on the Dask cluster (``training.engine: dask``;
        the run's own client when it runs on the Dask engine)."""
        if self.config.training.engine == "local":
            return nullcontext(retrain.fit)
        from batchml.cluster.training import dask_trainer

        return dask_trainer(self.config, client=getattr(self, "client", None))

    def _crown_first(self, candidate: retrain.Candidate) -> None:
        job, run_id, as_of = self.config.job, self.run.run_id, self.run.as_of
        row = candidate.registry_row(job, run_id, as_of, registry.CHALLENGER)

        def write(con):
            model_rows.register(con, row)
            model_rows.make_champion(con, job, candidate.version, "promoted", run_id=run_id,
                                   reason="first champion: no model existed", metrics=candidate.metrics, at=as_of)

        self.pending.append(write)
        self.champion = registry.load(row)
        self.run.promoted = True
        log.info("%s: trained first champion v%d on %d rows", job, candidate.version, candidate.trained.train_rows)

    def _gate(self, candidate: retrain.Candidate) -> None:
        job, run_id, as_of = self.config.job, self.run.run_id, self.run.as_of
        self.decision = retrain.gate(candidate, self.champion, self.config)
        promoted = self.decision.outcome == "promoted"
        status = registry.CHALLENGER if promoted else registry.REJECTED
        if self.decision.outcome == "no_decision":
            status = registry.CHALLENGER
        row = candidate.registry_row(job, run_id, as_of, status)
        decision = self.decision.to_dict()

        def write(con):
            model_rows.register(con, row)
            if promoted:
                model_rows.make_champion(con, job, candidate.version, "promoted", run_id=run_id,
                                       reason=decision["reason"], metrics=decision, at=as_of)
            else:
                model_rows.record_event(con, job, candidate.version, self.decision.outcome, run_id=run_id,
                                      reason=decision["reason"], metrics=decision, at=as_of,
                                      previous_champion=self.champion_row["version"])

        self.pending.append(write)
        self.run.promoted = promoted
        log.info("%s: challenger v%d %s: %s", job, candidate.version, self.decision.outcome, self.decision.reason)
        if promoted:
            self.champion = registry.load(row)
        else:
            self.shadow_model = registry.load(row)

    def _score(self) -> None:
        if self.champion is None:
            self._wait_for_model()
            return
        self._require_fed()
        self._score_champion(run_file_batches(self.batch.path), self.valid_rows)
        if self.config.promotion.shadow:
            self._score_shadow()

    def _require_fed(self) -> None:
        """Refuse to score with a champion that needs columns the source lost, naming them and the way
        out; a challenger this run trained on the current features is that way out, so it is kept."""
        if not self.champion_missing:
            return
        self.keep_challenger = self.run.challenger_version is not None
        raise ModelError(f"{self._model_role()} v{self.champion.version} of {self.config.job} cannot score: it needs "
                         f"{', '.join(self.champion_missing)}, which the source no longer has; {self._unfed_fix()}")

    def _model_role(self) -> str:
        return "champion"  # what scores the rows; a backfill may name another version

    def _unfed_fix(self) -> str:
        job, challenger = self.config.job, self._challenger_on_current_features()
        if challenger is not None:
            return (f"challenger v{challenger}, trained on the current features, is registered but the gate cannot compare it "
                    f"with the champion: promote it by hand with `batchml models promote {job} {challenger}` (the rows wait, "
                    f"watermark unchanged)")
        return f"{retrain.retrain_then_promote(job)} (the rows wait, watermark unchanged)"

    def _challenger_on_current_features(self) -> int | None:
        """This run's challenger, else the latest model trained on the config's features (a rerun does not train it again)."""
        if self.run.challenger_version is not None:
            return self.run.challenger_version
        seen = self.last_trained
        if seen is None or seen["status"] == registry.CHAMPION:
            return None
        return seen["version"] if self._on_current_features(seen) else None

    def _on_current_features(self, row: dict) -> bool | None:
        """Whether registered model ``row`` was trained on the config's feature list (None: its manifest is unreadable)."""
        spec = registry.manifest_spec(row)
        return None if spec is None else not any(retrain.feature_change(self.config, spec))

    def _score_champion(self, batches: Iterator[pa.RecordBatch], rows: int, predictor: Predictor | None = None) -> None:
        """Stream ``batches`` (at most ``rows`` rows) through the champion into the scores run file,
        with the prediction drift and the estimated performance of its scores."""
        self.run.champion_version = self.champion.version
        # prediction drift needs only the score distribution: a profile without features
        profile = drift.ReferenceProfile({}, {}, load_profile(self.champion).score)
        scores_acc = drift.CurrentAccumulator(profile)
        kept: list[np.ndarray] = []

        # the estimated metric needs a sample of scores, not all of them (memory stays flat)
        keep_share = min(1.0, ESTIMATE_SAMPLE / max(rows, 1))
        rng = np.random.default_rng(self.config.training.seed)

        def observe(batch: pa.RecordBatch, scores: np.ndarray) -> None:
            scores_acc.update({}, {}, scores=scores)
            kept.append(scores if keep_share >= 1.0 else scores[rng.random(len(scores)) < keep_share])

        predictor_name = self._score_with(self.champion, batches, rows, self.scores_path, self.scored, observe, predictor)
        self.run.rows_scored = self.scored.rows
        self.prediction_drift = prediction_drift(profile, scores_acc, self.config)
        scores = np.concatenate(kept) if kept else np.empty(0)
        self.performance.extend(performance.estimated(self.config, self.champion, scores, self.run.as_of))
        log.info("%s: scored %d rows with v%d (%s)", self.config.job, self.run.rows_scored, self.champion.version, predictor_name,
                 extra={"rows_scored": self.run.rows_scored, "model_version": self.champion.version})

    def _score_with(self, model: registry.LoadedModel, batches: Iterator[pa.RecordBatch], rows: int, path: Path,
                    summary: ScoreSummary, observe=None, predictor: Predictor | None = None) -> str:
        """Stream ``batches`` through ``model`` (with ``predictor``, else its own) into the run file ``path``."""
        predictor = predictor or make_predictor(model, self.config.scoring.engine, warn=self._warn)
        batches = track(batches, total=rows, description=f"scoring with v{model.version}", weight=lambda b: b.num_rows)
        batches = score_batches(batches, model, predictor, self.config, run_id=self.run.run_id,
                                scored_at=registry.utcnow(), summary=summary, on_scores=observe)
        write_run_file(batches, path)
        return predictor.name

    def _wait_for_model(self) -> None:
        """No champion: nothing is consumed, the rows (good and bad) wait for the next run."""
        self.run.rows_pending = self.run.rows_extracted
        self.run.rows_extracted = self.run.rows_quarantined = 0
        self.run.note = self.run.note or "no champion yet: not enough labeled rows to train one"
        self.run.note += f"; {self.run.rows_pending} rows wait for a model (watermark unchanged)"
        log.warning("%s: %s", self.config.job, self.run.note)

    def _score_shadow(self) -> None:
        """``promotion.shadow``: the newest challenger scores the same rows into ``<scores>_shadow``."""
        challenger = self.shadow_model
        if challenger is None:
            with self._connect() as con:
                row = model_rows.newest_challenger(con, self.config.job, self.champion.version)
            if row is None:
                return
            challenger = registry.load(row)
        missing = [name for name in challenger.spec.features if name not in run_file_schema(self.batch.path).names]
        if missing:  # a challenger from before a change of the feature list
            self._warn(f"no shadow scores: challenger v{challenger.version} needs {', '.join(missing)}, which this run did not pull")
            return
        self.shadow_path = self.scratch / "shadow.arrow"
        self._score_with(challenger, run_file_batches(self.batch.path), self.valid_rows, self.shadow_path, ScoreSummary())

    def _commit(self) -> None:
        job, run = self.config.job, self.run
        advance = self.champion is not None and run.kind in ("nightly", "replay")
        run.watermark_to = max(filter(None, [run.as_of, run.watermark_from])) if advance else run.watermark_from
        run.status, run.finished_at = "succeeded", registry.utcnow()
        with self._connect() as con:
            with transaction(con):
                self._write_quarantine(con)
                self._write_drift(con)
                for write in self.pending:
                    write(con)
                self._write_scores(con)
                if self.shadow_path is not None and self.shadow_path.exists():
                    write_scores(con, self.config, self.shadow_path, suffix="_shadow")
                for model in (self.champion, self.shadow_model):  # libraries compiled on first use in this run
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
        elif self.run.kind in ("nightly", "replay") and self.batch is not None and self.batch.path.exists():
            # the first runs without a champion: analysts can query the (empty) table already
            ensure_scores_table(con, self.config, scores_schema(run_file_schema(self.batch.path), self.config))

    def _write_quarantine(self, con) -> None:
        if not self.run.rows_quarantined:
            return
        write_quarantine(con, self.run.run_id, self.config.job, read_run_file(self.batch.path, valid=False))

    def _write_drift(self, con) -> None:
        rows = list(self.drift_report.to_rows()) if self.drift_report else []
        rows += self.prediction_drift
        version = self.run.champion_version if self.drift_report is None else self.champion_row["version"]
        write_drift_rows(con, self.run.run_id, self.config.job, version, rows)

    def _write_performance(self, con) -> None:
        write_performance(con, self.run.run_id, self.config.job, self.performance)

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
                    if self.keep_challenger:
                        for write in self.pending:  # the challenger the failure message tells the user to promote
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
        if self.run.promoted:
            prepare_engine(self.champion, self.config.scoring.engine, warn=self._warn)
            self._register_libraries()
        self._publish()
        self._report_and_notify()

    def _register_libraries(self) -> None:
        """The new champion's compiled libraries into the warehouse: unregistered, no run would load them."""
        if not self.champion.unregistered:
            return
        try:
            with self._connect() as con:
                model_rows.register_libraries(con, self.champion.job, self.champion.version, self.champion.take_unregistered())
        except BatchMLError as exc:  # the run is committed; the libraries are refused until rebuilt
            self._warn(f"compiled libraries of v{self.champion.version} not registered ({exc}); runs score with LightGBM "
                       f"until `batchml models compile {self.config.job}` builds and registers them")

    def _publish(self) -> None:
        from batchml.storage import publish

        try:
            # this run and any an earlier process committed but died before publishing
            publish.publish_pending(self.project, self.config)
        except (BatchMLError, OSError) as exc:  # e.g. a full disk under published/
            message = file_error(exc) if isinstance(exc, OSError) else exc
            recorded = "the run itself is committed" if self.run.status == "succeeded" else f"the run is recorded as {self.run.status}"
            log.warning("%s: publishing for analysts failed (%s): %s", self.config.job, recorded, message)

    def _report_and_notify(self) -> None:
        from batchml.reports import deliver as reporting  # matplotlib is imported only when a report is written

        try:
            reporting.report_and_notify(self.project, self.config, self.run.run_id, send=self.notify)
        except BatchMLError as exc:
            log.warning("%s: report not delivered: %s", self.config.job, exc)
        if self.run.kind == "nightly":  # a replay refreshes the page once, after its last night
            reporting.refresh_history(self.project, self.config, self.run.run_id, send=self.notify)


def pull_training_rows(con, config: JobConfig, pull_config: JobConfig, root: Path, as_of: datetime, path: Path,
                       columns: dict[str, str] | None = None, warn=log.warning) -> PullResult:
    """The labeled rows a challenger trained at ``as_of`` learns from (its holdout included) into run file
    ``path``. ``pull_config`` is ``config`` with the champion's features added (:func:`with_model_features`):
    the holdout must hold the champion's columns too, for the gate. Used by nightly runs and ``batchml try``."""
    pulled = pull(con, pull_config, root, training_filter(config, as_of), path, columns=columns)
    odd, values = odd_labels(con, config, root, training_filter(config, as_of, labeled_only=False))
    if odd:
        warn(objective_of(config.label.objective).odd_labels_message(odd, values, config.label.column))
    if pulled.by_rule:  # every labeled row of the window trains or judges, unless the contract rejects it
        reasons = ", ".join(f"{rule}: {n}" for rule, n in sorted(pulled.by_rule.items()))
        warn(f"{sum(pulled.by_rule.values())} of {pulled.rows} labeled row(s) in the training window left out of "
             f"training and holdout ({reasons}); see batchml.models.drop_reasons")
    return pulled


def feature_arrays(batch: pa.RecordBatch, profile: drift.ReferenceProfile) -> dict:
    """The batch's columns of the features ``profile`` holds, for the drift accumulator."""
    return {
        "numeric": {n: numeric_values(batch, n) for n in profile.numeric},
        "categorical": {n: categorical_values(batch, n) for n in profile.categorical},
    }


def with_model_features(config: JobConfig, spec: FeatureSpec, leave_out: tuple[str, ...] | list[str] = ()) -> JobConfig:
    """``config`` pulling a model's features too (except ``leave_out``); a name the config already
    has keeps the config's kind. Training still reads the features of ``config`` itself."""
    extra = [name for name in spec.features if name not in config.features.all and name not in leave_out]
    features = config.features.model_copy(update={
        "numeric": [*config.features.numeric, *(n for n in extra if n in spec.numeric)],
        "categorical": [*config.features.categorical, *(n for n in extra if n in spec.categorical)],
    })
    return config.model_copy(update={"features": features})


def load_profile(model: registry.LoadedModel) -> drift.ReferenceProfile:
    """The model's drift reference, parsed once per loaded model (drift and scoring both need it)."""
    if "profile" not in model.cache:
        model.cache["profile"] = drift.ReferenceProfile.from_dict(json.loads((model.path / retrain.PROFILE_FILE).read_text()))
    return model.cache["profile"]


def prediction_drift(profile: drift.ReferenceProfile, accumulator: drift.CurrentAccumulator, config: JobConfig) -> list[dict]:
    """The drift row of the model's own scores (current vs its holdout scores)."""
    report = drift.compute_drift(profile, accumulator, config.drift)
    return [row for row in report.to_rows() if row["kind"] == "prediction"]
