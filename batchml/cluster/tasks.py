"""What runs on the Dask workers. Each task gets picklable values, reads the source's Parquet
files with a worker-local in-memory DuckDB (never the warehouse), writes its rows to the lake under
a name of its own attempt, and returns what the client needs to decide and to commit.

The batch is split by a hash of the entity id, not by file: the duplicate rule compares rows of
the same entity, so every row of an entity must meet in one partition, however the files are cut.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from batchml.monitoring import drift
from batchml.models import registry
from batchml.config import JobConfig
from batchml.data.extract import PullResult, run_file_batches, run_file_schema
from batchml.storage.source import pull, set_cutoff
from batchml.models.scoring import ScoreSummary, make_predictor, score_batches
from batchml.storage.lake import QUARANTINE, QUARANTINE_SCHEMA, SCORES, STAGING, PartFile, part_path, quarantine_rows, write_part
from batchml.storage.warehouse import memory_connection, quote_ident
from batchml.storage.writeback import scores_schema



@dataclass(frozen=True)
class Partition:
    """One task's share of the run: rows matching ``where`` whose entity id hashes to ``index``."""

    config: JobConfig
    project_root: Path
    lake: Path
    run_id: str
    as_of: datetime
    where: str  # the batch filter, on the source's raw columns
    columns: dict[str, str]  # the source's columns and types, described once by the client
    index: int
    count: int
    memory_limit: str = "256MB"
    pause: tuple[str, float] | None = None  # the client's BATCHML_PAUSE_AT/_SECONDS: crash tests stop a task at a known point

    def filter(self) -> str:
        return f"({self.where}) AND hash({quote_ident(self.config.source.entity_id)}) % {self.count} = {self.index}"

    def path(self, kind: str, suffix: str = ".parquet") -> Path:
        return part_path(self.lake, self.config.job, kind, self.run_id, self.index, suffix)


@dataclass
class CheckedPart:
    """A partition pulled and checked: counts for the batch rules, its drift tally, its files."""

    index: int
    staging: str  # the pulled rows (Arrow IPC run file), read again by the scoring task
    pulled: PullResult
    null_counts: dict[str, int]
    quarantine: PartFile
    drift: drift.CurrentAccumulator | None

    @property
    def valid(self) -> int:
        return self.pulled.rows - sum(self.pulled.by_rule.values())


@dataclass(frozen=True)
class ModelRef:
    """A registered model as workers load it: from its folder, verified against these hashes."""

    job: str
    version: int
    artifact_path: str
    sha256: str
    manifest_sha256: str

    @classmethod
    def of(cls, model: registry.LoadedModel) -> ModelRef:
        manifest = registry.sha256_file(model.path / registry.MANIFEST_FILE)  # as verified when the client loaded it
        return cls(model.job, model.version, str(model.path), model.sha256, manifest)


@dataclass
class ScoredPart:
    index: int
    scores: PartFile
    summary: ScoreSummary
    prediction: drift.CurrentAccumulator
    sample: np.ndarray  # a share of the scores, for the estimated performance


def check_partition(part: Partition, profile: drift.ReferenceProfile | None) -> CheckedPart:
    """Pull the partition's rows through the data contract (the local engine's own SQL) into a
    staging run file, write its quarantined rows to the lake and tally its valid rows for drift."""
    staging = part.path(STAGING, ".arrow")
    con = memory_connection(part.memory_limit, threads=1)
    try:
        set_cutoff(con, part.as_of)
        pulled = pull(con, part.config, part.project_root, part.filter(), staging, columns=part.columns)
        quarantine = _write_quarantine(con, part, staging)
    finally:
        con.close()
    valid = pulled.rows - sum(pulled.by_rule.values())
    null_counts = {name: round(share * valid) for name, share in pulled.null_fractions.items()}  # the shares of exact counts
    return CheckedPart(part.index, str(staging), pulled, null_counts, quarantine, _tally(profile, staging, part.index, valid))


def _write_quarantine(con, part: Partition, staging: Path) -> PartFile:
    """The rejected rows as ``batchml.quarantine`` stores them (the id cast by DuckDB, as the local engine does)."""
    rejected = pa.Table.from_batches(list(run_file_batches(staging, valid=False)), schema=run_file_schema(staging))
    table = quarantine_rows(con, rejected)
    return write_part(table.to_batches(), QUARANTINE_SCHEMA, part.path(QUARANTINE), QUARANTINE, part.index)


def _tally(profile: drift.ReferenceProfile | None, staging: Path, index: int, valid: int) -> drift.CurrentAccumulator | None:
    if profile is None or valid == 0:
        return None
    from batchml.pipeline.shared import feature_arrays

    accumulator = drift.CurrentAccumulator(profile, seed=index + 1)  # distinct seeds: the merged sample stays uniform
    for batch in run_file_batches(staging):
        accumulator.update(**feature_arrays(batch, profile))
    return accumulator


def _threads_of_this_worker() -> None:
    """Predict with the worker's own threads (one per core it was given), not every core of the
    machine: two one-thread workers on two cores would otherwise run four predict threads."""
    if "BATCHML_THREADS" in os.environ:
        return
    try:
        from distributed import get_worker

        os.environ["BATCHML_THREADS"] = str(max(1, get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):  # not on a Dask worker
        pass


_MODELS: dict[ModelRef, registry.LoadedModel] = {}  # per worker process: loaded (and compiled) once


def _load(ref: ModelRef) -> registry.LoadedModel:
    if ref not in _MODELS:
        _MODELS[ref] = registry.load({"job": ref.job, "version": ref.version, "artifact_path": ref.artifact_path,
                                      "sha256": ref.sha256, "manifest_sha256": ref.manifest_sha256})
    return _MODELS[ref]


def score_partition(part: Partition, staging: str, ref: ModelRef, scored_at: datetime, keep_share: float,
                    score_profile: drift.ReferenceProfile) -> ScoredPart:
    """Score the partition's valid rows with the model (its predictor chosen, compiled and verified
    on this worker as the local engine does) into a scores file in the lake."""
    config = part.config
    _threads_of_this_worker()
    if part.pause and part.pause[0] == "score_partition":
        time.sleep(part.pause[1])
    model = _load(ref)
    predictor = make_predictor(model, config.scoring.engine)
    summary = ScoreSummary()
    prediction = drift.CurrentAccumulator(score_profile, seed=part.index + 1)
    rng = np.random.default_rng([config.training.seed, part.index])
    kept: list[np.ndarray] = []

    def observe(batch: pa.RecordBatch, scores: np.ndarray) -> None:
        prediction.update({}, {}, scores=scores)
        kept.append(scores if keep_share >= 1.0 else scores[rng.random(len(scores)) < keep_share])

    batches = score_batches(run_file_batches(Path(staging)), model, predictor, config, run_id=part.run_id,
                            scored_at=scored_at, summary=summary, on_scores=observe)
    schema = scores_schema(run_file_schema(Path(staging)), config)
    scores = write_part(batches, schema, part.path(SCORES), SCORES, part.index)
    return ScoredPart(part.index, scores, summary, prediction, np.concatenate(kept) if kept else np.empty(0))
