"""The nightly run on the Dask engine: the same steps and decisions, the rows on the workers.

Only the steps that touch every row move, in one pass as on the local engine: one task per
partition reads its own share of the files and row groups (:mod:`~batchml.cluster.plan`), checks
it against the data contract, tallies drift and scores it with the champion of the night's start
(:func:`~batchml.cluster.tasks.check_partition`). A champion crowned or promoted later in the run
scores the rows the tasks kept for it (:func:`~batchml.cluster.tasks.score_partition`), so the
stored scores are the champion's after the gate, as locally. The client merges the
counts, makes every decision exactly as :class:`~batchml.pipeline.nightly.NightlyRun` does (``DaskNightlyRun`` is one),
and commits the run row, watermark, drift, quarantine, registry changes and the manifest of the
run's lake files in its one transaction. Training stays on the client.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchml.monitoring import drift
from batchml.monitoring import performance
from batchml.models import registry
from batchml.models.scoring import ScoreSummary
from batchml.pipeline.backfill import BackfillRun
from batchml.cluster.connect import open_client, scheduler_address, worker_count
from batchml.cluster import plan
from batchml.cluster.tasks import (CheckedPart, ModelRef, Partition, Rivals, ScoredPart, ScoreOrder, check_partition,
                                   key_buckets, partition_keys, score_partition, shared_keys)
from batchml.config import JobConfig, distributed_source_problem
from batchml.errors import BatchMLError, ClusterError, ConfigError
from batchml.data.extract import PullResult, run_file_schema
from batchml.data.sources import parquet_location
from batchml.storage.source import describe_source, register_object_store, row_group_ranges
from batchml.pipeline.nightly import JobRun, NightlyRun
from batchml.pipeline.score_step import ESTIMATE_SAMPLE
from batchml.pipeline.shared import load_profile, prediction_drift
from batchml.project import Project
from batchml.storage import lake
from batchml.storage.writeback import scores_schema

log = logging.getLogger("batchml")
SHARES_PER_WORKER = 2


class DaskRun(JobRun):
    """What a run on a Dask cluster changes, for any kind of run: its pull, drift tally and scoring
    run as tasks; its steps are the kind's own (``_steps`` wraps them in the client)."""

    def _on_cluster(self, cluster: str | None) -> None:
        config, project = self.config, self.project
        self.address = scheduler_address(config, cluster)
        self.lake = project.home / "lake"
        self.client = None
        self.partitions: list[Partition] = []
        self.checked: list[CheckedPart] = []
        self.scored_parts: list[ScoredPart] = []
        self.shadow_parts: list[lake.PartFile] = []

    def _preloads_champion(self) -> bool:
        return False  # each task loads the champion on its worker

    def _own_folders(self) -> tuple[Path, ...]:
        """The job's lake: its scores views read the committed files (and nothing else of the lake)."""
        return (lake.job_root(self.lake, self.config.job),)

    def _steps(self) -> None:
        try:
            distributed_source_problem(self.config)
        except ValueError as exc:
            raise ConfigError(f"configs/{self.config.job}.yaml: {exc}") from None
        self._sweep()
        try:
            with open_client(self.config, self.address) as client:
                self.client = client
                super()._steps()
        finally:
            self.client = None
            lake.remove_staging(self.lake, self.config.job, self.run.run_id)

    def _sweep(self) -> None:
        """Files of runs that died before their commit, and other attempts of retried tasks."""
        with self._connect() as con:
            lake.refuse_local_table(con, self.config)  # before the cluster works for a commit that would fail
            removed = lake.sweep(con, self.lake, self.config.job, self.run.started_at, keep_run=self.run.run_id)
        if removed:
            log.info("%s: swept %d lake file(s) no committed run lists", self.config.job, removed)

    def _gather(self, futures: list, what: str) -> list:
        """The tasks' results, in the order of ``futures``, each fetched as soon as its task ends and
        its future released: a worker lost later takes no finished result with it (the scheduler
        would compute a result still held only in its memory again)."""
        from distributed import as_completed

        order = {future.key: i for i, future in enumerate(futures)}
        results: list = [None] * len(futures)
        try:
            for future, result in as_completed(futures, with_results=True):
                results[order[future.key]] = result
                future.release()
            return results
        except BatchMLError:
            raise
        except Exception as exc:  # a task failed for good (after the scheduler's retries)
            raise ClusterError(f"{what} failed on the Dask cluster{f' at {self.address}' if self.address else ''}: "
                               f"{type(exc).__name__}: {exc}") from exc

    # -- extract and drift: one task per partition ---------------------------------------------

    def _pull_batch(self, con, where: str) -> PullResult:
        config = self._pull_config(con)
        columns = self.state.source_columns or describe_source(con, config, self.project.root)
        profile = self._drift_reference() if self.state.champion is not None and self.run.kind in ("nightly", "replay") else None
        register_object_store(con, config.source.parquet)
        units = plan.plan(con, config, parquet_location(config.source.parquet, self.project.root), self._watermark_bounds())
        # two shares per worker: a worker lost mid-run costs the share it was on, not half the night
        shares = plan.balance(units, SHARES_PER_WORKER * worker_count(self.client)) or [None]  # none can hold the night: one task, to say so
        parts = [Partition(config, self.project.root, self.lake, self.run.run_id, self.run.as_of, where, columns, index,
                           len(shares), share, self.project.settings.memory_limit, task_pause())
                 for index, share in enumerate(shares)]
        rivals = self._rivals(con, config, parts)
        # as the local engine's pull: with a champion, each task scores its rows as it reads them (one
        # pass); the valid rows are kept only when a later step may read them again
        planned = sum(unit.rows for share in shares if share for unit in share)  # from the footers: at least the night's rows
        keep_share = min(1.0, ESTIMATE_SAMPLE / planned) if planned else None
        order = self._score_order(keep_share) if self._scores_in_pass() and not self.state.champion_missing else None
        keep = self._keeps_rows()
        task = "score" if order is not None else "check"
        sample_size = drift.current_sample_size(config.drift)
        futures = [self.client.submit(check_partition, part, profile, rivals[part.index], order, keep, sample_size,
                                      key=f"{task}-{self.run.run_id}-{part.index}", pure=False)
                   for part in parts]
        self.partitions = parts
        self.checked = sorted(self._gather(futures, "pulling the batch"), key=lambda c: c.index)
        tallies = [c.drift for c in self.checked if c.drift is not None]
        self.state.drift_tally = merged(tallies)
        if order is not None:
            self._scored([c.scored for c in self.checked])
        return merged_pull(self.checked, lake.job_root(self.lake, self.config.job))

    def _watermark_bounds(self) -> plan.Bounds:
        return plan.Bounds(self.run.watermark_from, self.run.as_of, hive_days=True)  # extract.batch_filter's

    def _rivals(self, con, config: JobConfig, parts: list[Partition]) -> list[Rivals | None]:
        """What each share's duplicate rule ranks against; nothing when no entity id can lie in two
        shares (their ids' ranges, from the footers, do not meet): the keys step is skipped."""
        shares = [part.units for part in parts]
        if len(parts) > 1 and all(shares):
            files = sorted({unit.file for share in shares for unit in share})
            if plan.disjoint_keys(shares, row_group_ranges(con, files, config.source.entity_id)):
                log.info("%s: no %s lies in two partitions (footer statistics): each ranks its own duplicates",
                         self.config.job, config.source.entity_id)
                return [None] * len(parts)
        return share_rivals(self.client, parts, self._gather, self.config.job)

    def _current_drift(self, profile: drift.ReferenceProfile) -> drift.CurrentAccumulator:
        return self.state.drift_tally if self.state.drift_tally is not None else drift.CurrentAccumulator(profile)

    # -- scoring: one task per partition, with the (possibly new) champion ---------------------------

    def _score(self) -> None:
        """The pass scored the partitions with the champion of the night's start; one crowned or
        promoted since scores the kept rows again (``ScoreStep._score``)."""
        if self.state.champion is None:
            self._wait_for_model()
            return
        self._require_fed()
        if self.state.scored_by is not self.state.champion:
            if any(checked.staging is None for checked in self.checked):  # _keeps_rows keeps them whenever a challenger can be trained
                raise RuntimeError(f"v{self.state.champion.version} was promoted but the run kept no rows to score")
            self._score_on_cluster()
        if self.config.promotion.shadow:
            self._shadow_on_cluster()

    def _score_order(self, keep_share: float | None, model: registry.LoadedModel | None = None, kind: str = lake.SCORES) -> ScoreOrder:
        """What the tasks need to score with ``model`` (the champion): one ``scored_at`` for the run."""
        model = model or self.state.champion
        profile = drift.ReferenceProfile({}, {}, load_profile(model).score)  # prediction drift: the scores' distribution only
        return ScoreOrder(ModelRef.of(model), registry.utcnow(), keep_share, profile, kind)

    def _shadow_on_cluster(self) -> None:
        """``promotion.shadow``: the newest challenger scores the same partitions into shadow lake
        files (``scores.<job>_shadow`` reads the committed ones), as ``ScoreStep._score_shadow``."""
        challenger = self._shadow_challenger()
        if challenger is None:
            return
        pulled = run_file_schema(Path(self.checked[0].staging)).names
        missing = [name for name in challenger.spec.features if name not in pulled]
        if missing:  # a challenger from before a change of the feature list
            self._warn(f"no shadow scores: challenger v{challenger.version} needs {', '.join(missing)}, which this run did not pull")
            return
        order = self._score_order(0.0, challenger, lake.SHADOW)
        futures = [self.client.submit(score_partition, part, checked.staging, order, key=f"shadow-{self.run.run_id}-{part.index}", pure=False)
                   for part, checked in zip(self.partitions, self.checked)]
        self.shadow_parts = [p.scores for p in self._gather(futures, "shadow scoring")]

    def _score_on_cluster(self) -> None:
        """Score the kept rows of every partition with the champion (crowned or promoted in this run)."""
        order = self._score_order(min(1.0, ESTIMATE_SAMPLE / max(self.valid_rows, 1)))
        # keys of their own: the pass's tasks were "score-<run>-<partition>", which the scheduler may still hold
        futures = [self.client.submit(score_partition, part, checked.staging, order, key=f"rescore-{self.run.run_id}-{part.index}",
                                      pure=False)
                   for part, checked in zip(self.partitions, self.checked)]
        self._scored(self._gather(futures, "scoring"))

    def _scored(self, parts: list[ScoredPart]) -> None:
        """Take the partitions' scores as the run's: rows, bands, prediction drift, estimated performance."""
        self.run.champion_version = self.state.champion.version
        for superseded in self.scored_parts:  # the pass's scores by the champion the gate replaced: no manifest will list them
            Path(superseded.scores.path).unlink(missing_ok=True)
        self.scored_parts = sorted(parts, key=lambda s: s.index)
        self.state.scored = ScoreSummary()
        self.run.rows_scored = self.state.scored.rows = sum(p.summary.rows for p in self.scored_parts)
        for part in self.scored_parts:
            self.state.scored.bands.update(part.summary.bands)
            self.state.scored.predict_seconds += part.summary.predict_seconds
            self.state.scored.reason_seconds += part.summary.reason_seconds
            self.state.scored.predictor = part.summary.predictor
        self.state.scored_by = self.state.champion
        profile = drift.ReferenceProfile({}, {}, load_profile(self.state.champion).score)
        tally = merged([p.prediction for p in self.scored_parts]) or drift.CurrentAccumulator(profile)
        self.state.prediction_drift = prediction_drift(profile, tally, self.config)
        sample = np.concatenate([p.sample for p in self.scored_parts]) if self.scored_parts else np.empty(0)
        self.state.estimated = performance.estimated(self.config, self.state.champion, sample, self.run.as_of)
        log.info("%s: scored %d rows with v%d on %d partition(s) (%s)", self.config.job, self.run.rows_scored,
                 self.state.champion.version, len(self.scored_parts), self.state.scored.predictor)

    # -- commit: manifests and views instead of table inserts ----------------------------------------

    def _write_scores(self, con) -> None:
        now = registry.utcnow()
        if self.scored_parts:
            lake.record_manifest(con, self.run.run_id, self.config.job, [p.scores for p in self.scored_parts], now)
        elif self.run.kind in ("nightly", "replay") and self.checked and not lake.scores_exist(con, self.config):
            # the first runs without a champion: analysts can query the (empty) view already
            lake.record_manifest(con, self.run.run_id, self.config.job, [self._empty_scores()], now)
        if self.shadow_parts:
            lake.record_manifest(con, self.run.run_id, self.config.job, self.shadow_parts, now)
        lake.refresh_scores_views(con, self.config)

    def _own_scores(self) -> tuple[Path, ...] | None:
        """The run's committed lake files: linked for analysts, not written a second time."""
        return tuple(Path(p.scores.path) for p in self.scored_parts) or None

    def _empty_scores(self) -> lake.PartFile:
        schema = scores_schema(run_file_schema(Path(self.checked[0].staging)), self.config)
        path = lake.part_path(self.lake, self.config.job, lake.SCORES, self.run.run_id, 0)
        return lake.write_part([], schema, path, lake.SCORES, 0)

    def _write_quarantine(self, con) -> None:
        if not self.duties.quarantine or not self.run.rows_quarantined:
            return
        parts = [c.quarantine for c in self.checked if c.quarantine.rows]
        now = registry.utcnow()
        lake.record_manifest(con, self.run.run_id, self.config.job, parts, now)
        lake.insert_quarantine(con, self.run.run_id, self.config.job, parts, now)


class DaskNightlyRun(DaskRun, NightlyRun):
    """A :class:`NightlyRun` whose pull, drift tally and scoring run as tasks on a Dask cluster."""

    def __init__(self, project: Project, config: JobConfig, as_of: datetime, kind: str, force_retrain: bool, notify: bool,
                 cluster: str | None = None):
        NightlyRun.__init__(self, project, config, as_of, kind, force_retrain, notify)
        self._on_cluster(cluster)


class DaskBackfillRun(DaskRun, BackfillRun):
    """A backfill on the cluster: the range's partitions pulled, checked and scored in parallel."""

    def __init__(self, project: Project, config: JobConfig, start: date, end: date, version: int | None, dry_run: bool,
                 cluster: str | None = None):
        BackfillRun.__init__(self, project, config, start, end, version, dry_run)
        self._on_cluster(cluster)

    def _watermark_bounds(self) -> plan.Bounds:
        return plan.Bounds(None, self.run.as_of, hive_days=False)  # extract.event_range_filter's

    def _pull_and_score(self) -> None:
        with self._connect() as con:
            self._pull_config(con)
            self._require_fed()
            self.state.batch = self._pull_batch(con, self._batch_filter())
        self._pulled()  # the pass scored the rows (``_pull_batch``)


def share_rivals(client, parts: list[Partition], gather, job: str) -> list[Rivals | None]:
    """For each share, the keys that other shares hold too (the duplicate rule must see every
    row of a key) and whether it holds a key twice itself: the shares' keys written bucketed by
    hash, one task per bucket finds those held twice (``gather``: the caller's, mapping task
    failures). One share has no rivals (its pull finds its own repeats)."""
    if len(parts) < 2:
        return [None] * len(parts)
    run_id, buckets = parts[0].run_id, key_buckets(parts)
    folders = gather([client.submit(partition_keys, part, buckets, key=f"keys-{run_id}-{part.index}", pure=False)
                      for part in parts], "reading the batch's keys")
    limit = parts[0].memory_limit
    found = gather([client.submit(shared_keys, folders, bucket, limit, key=f"shared-{run_id}-{bucket}", pure=False)
                    for bucket in range(buckets)], "finding keys held by several partitions")
    twice = set().union(*(held for _, held in found))
    tables = [table for table, _ in found if table.num_rows]
    if not tables:
        return [Rivals(NO_KEYS, (), part.index in twice) for part in parts]
    shared = pa.concat_tables(tables, promote_options="permissive")
    log.info("%s: %d key(s) occur in more than one partition; their rows are ranked together", job, shared.num_rows)
    rivals: list[Rivals | None] = []
    holders = pc.list_flatten(shared["parts"]).to_numpy()
    key_of = pc.list_parent_indices(shared["parts"]).to_numpy()
    for part in parts:
        mine = shared.take(np.unique(key_of[holders == part.index]))
        others = set(pc.list_flatten(mine["parts"]).to_pylist()) - {part.index}
        units = tuple(u for other in sorted(others) for u in parts[other].units)
        rivals.append(Rivals(mine.select(["__id", "__at"]), units, part.index in twice))
    return rivals


NO_KEYS = pa.table({"__id": pa.array([], pa.null()), "__at": pa.array([], pa.null())})


def task_pause() -> tuple[str, float] | None:
    step = os.environ.get("BATCHML_PAUSE_AT")
    return (step, float(os.environ.get("BATCHML_PAUSE_SECONDS", "60"))) if step else None


def merged(tallies: list[drift.CurrentAccumulator]) -> drift.CurrentAccumulator | None:
    """One tally of the whole batch from the partitions' (counts are sums)."""
    if not tallies:
        return None
    first = tallies[0]
    for other in tallies[1:]:
        first.merge(other)
    return first


def merged_pull(checked: list[CheckedPart], folder) -> PullResult:
    """The batch's summary from its partitions': rows and rule counts add up, null shares are
    recomputed from the partitions' counts, the latest watermark is the latest of theirs."""
    rows = sum(c.pulled.rows for c in checked)
    by_rule: Counter[str] = Counter()
    nulls: Counter[str] = Counter()
    for c in checked:
        by_rule.update(c.pulled.by_rule)
        nulls.update(c.null_counts)
    valid = sum(c.valid for c in checked)
    shares = {name: count / valid if valid else 0.0 for name, count in nulls.items()}
    latest = [c.pulled.watermark_max for c in checked if c.pulled.watermark_max is not None]
    return PullResult(folder, rows, dict(by_rule), shares, max(latest) if latest else None)
