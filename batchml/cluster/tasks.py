"""What runs on the Dask workers. Each task gets picklable values, reads the source's Parquet
files with a worker-local in-memory DuckDB (never the warehouse), writes its rows to the lake under
a name of its own attempt, and returns what the client needs to decide and to commit.

Each task reads its own share of the night's files and row groups (``cluster.plan``), so its work
is proportional to its share. The duplicate rule compares the rows of one (entity id, event time)
key, which may lie in several shares: before the pull, each task writes its keys to the lake's
staging folder, bucketed by a hash of the key (:func:`partition_keys`); one task per bucket finds
the keys held by more than one share (:func:`shared_keys`); and each task then ranks its copies of
those keys against the other shares' copies (read for those keys only), so every task picks the
same winner as one pass over the night would.
"""

from __future__ import annotations

import glob
import itertools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from batchml.monitoring import drift
from batchml.models import registry
from batchml.cluster.plan import Unit, units_sql
from batchml.config import JobConfig, thread_count
from batchml.data.extract import PullResult, run_file_batches, run_file_schema
from batchml.storage.source import ValidRows, pull, register_object_store, set_cutoff
from batchml.models.scoring import ScoreSummary, make_predictor, score_batches
from batchml.storage.lake import QUARANTINE, QUARANTINE_SCHEMA, SCORES, STAGING, PartFile, part_path, quarantine_rows, write_part
from batchml.storage.warehouse import memory_connection, quote_ident, quote_literal
from batchml.storage.writeback import scores_schema
from batchml.pipeline.score_step import ESTIMATE_SAMPLE
from batchml.pipeline.shared import tallied_and_kept


@dataclass(frozen=True)
class Partition:
    """One task's share of the run: rows matching ``where`` in its ``units`` (None: the whole source)."""

    config: JobConfig
    project_root: Path
    lake: Path
    run_id: str
    as_of: datetime
    where: str  # the batch filter, on the source's raw columns
    columns: dict[str, str]  # the source's columns and types, described once by the client
    index: int
    count: int
    units: tuple[Unit, ...] | None = None
    memory_limit: str = "256MB"
    pause: tuple[str, float] | None = None  # the client's BATCHML_PAUSE_AT/_SECONDS: crash tests stop a task at a known point

    def source(self, units: tuple[Unit, ...] | None = None) -> str | None:
        """SELECT over this share's rows (or ``units``'), None for the whole source."""
        units = self.units if units is None else units
        return None if units is None else units_sql(units, self.columns)

    def path(self, kind: str, suffix: str = ".parquet") -> Path:
        return part_path(self.lake, self.config.job, kind, self.run_id, self.index, suffix)


@dataclass(frozen=True)
class Rivals:
    """Keys of this share that other shares hold too, and those shares' units (read for these keys
    only); whether the share holds a key twice itself (None: not known, the pull finds out)."""

    keys: pa.Table  # __id, __at: the entity id and event time, as the source stores them
    units: tuple[Unit, ...]
    repeated: bool | None = None


@dataclass(frozen=True)
class ModelRef:
    """A registered model as workers load it: from its folder, verified against these hashes."""

    job: str
    version: int
    artifact_path: str
    sha256: str
    manifest_sha256: str
    libraries: tuple[tuple[str, str], ...] = ()  # the compiled libraries registered for it (file, sha256): loaded, not rebuilt

    @classmethod
    def of(cls, model: registry.LoadedModel) -> ModelRef:
        manifest = registry.sha256_file(model.path / registry.MANIFEST_FILE)  # as verified when the client loaded it
        # registered, or built and verified by the client in this run (registered at its commit)
        libraries = {**model.libraries, **{built["file"]: built["sha256"] for built in model.unregistered}}
        return cls(model.job, model.version, str(model.path), model.sha256, manifest, tuple(sorted(libraries.items())))


@dataclass
class ScoredPart:
    index: int
    scores: PartFile
    summary: ScoreSummary
    prediction: drift.CurrentAccumulator
    sample: np.ndarray  # a share of the scores, for the estimated performance


@dataclass(frozen=True)
class ScoreOrder:
    """What a task needs to score its rows: the model, the run's one ``scored_at``, the share of
    scores kept for the estimated performance (None: the task's own share of ``ESTIMATE_SAMPLE``
    rows) and the reference of the prediction drift (a profile of scores only)."""

    ref: ModelRef
    scored_at: datetime
    keep_share: float | None
    profile: drift.ReferenceProfile
    kind: str = SCORES


@dataclass
class CheckedPart:
    """A partition pulled and checked: counts for the batch rules, its drift tally, its files; and,
    when the pass scored it, its scores."""

    index: int
    staging: str | None  # the valid rows (Arrow IPC run file), kept only when a later step reads them again
    pulled: PullResult
    null_counts: dict[str, int]
    quarantine: PartFile
    drift: drift.CurrentAccumulator | None
    scored: ScoredPart | None = None

    @property
    def valid(self) -> int:
        return self.pulled.rows - sum(self.pulled.by_rule.values())


# Keys per hash bucket, at most (about): finding the keys held twice groups a whole bucket in one
# task's DuckDB, so bounded buckets keep a worker's memory flat however big the night (a bucket per
# share grouped 4M keys in 860 MB at 8M rows, and reached the memory limit at 40M)
KEYS_PER_BUCKET = 2_000_000


def key_buckets(parts: list[Partition]) -> int:
    """How many hash buckets the shares' keys go to: one per share, more for a big night (planned
    rows, from the footers, over :data:`KEYS_PER_BUCKET`)."""
    planned = sum(unit.rows for part in parts for unit in part.units or ())
    return max(len(parts), -(-planned // KEYS_PER_BUCKET))


def partition_keys(part: Partition, buckets: int) -> str:
    """Write the share's (entity id, event time) keys to a folder of its own attempt, one
    ``__bucket=<n>`` folder per hash bucket (``buckets`` of them); return the folder."""
    src = part.config.source
    entity, event = quote_ident(src.entity_id), quote_ident(src.event_time)
    folder = part.path(STAGING, "-keys")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with share_connection(part) as con:
        con.execute(f"""COPY (SELECT {entity} AS __id, {event} AS __at, {part.index} AS __part,
                                     hash({entity}, {event}) % {buckets} AS __bucket
                              FROM ({part.source()}) WHERE ({part.where}) AND {entity} IS NOT NULL)
                        TO {quote_literal(str(folder))} (FORMAT parquet, PARTITION_BY (__bucket))""")
    return str(folder)


def shared_keys(folders: list[str], bucket: int, memory_limit: str = "256MB") -> tuple[pa.Table, set[int]]:
    """The keys of hash bucket ``bucket`` that more than one share holds, with the shares holding
    them; and the shares that hold one of its keys twice themselves (their pulls rank duplicates).

    The repeated keys first (their lowest and highest share per group: 0.5 s for 4M keys, where
    list(DISTINCT) and count(DISTINCT) over every group took 3.2 s), then the shares of those few."""
    files = sorted(f for folder in folders for f in glob.glob(os.path.join(folder, f"__bucket={bucket}", "*.parquet")))
    if not files:
        return pa.table({}), set()
    con = memory_connection(memory_limit, threads=1)
    try:
        listed = "[" + ", ".join(quote_literal(f) for f in files) + "]"
        keys = f"read_parquet({listed}, hive_partitioning = false, union_by_name = true)"
        repeated = con.sql(f"""SELECT __id, __at, min(__part) AS low, max(__part) AS high
                               FROM {keys} GROUP BY __id, __at HAVING count(*) > 1""").to_arrow_table()
        con.register("__repeated", repeated)
        shared = con.sql(f"""SELECT k.__id, k.__at, list(DISTINCT k.__part ORDER BY k.__part)::INTEGER[] AS parts
                             FROM {keys} k SEMI JOIN (SELECT * FROM __repeated WHERE low <> high) r
                                  ON k.__id = r.__id AND k.__at IS NOT DISTINCT FROM r.__at
                             GROUP BY k.__id, k.__at""").to_arrow_table()
        # a key held twice by one share only; the holders of a shared key rank their copies anyway
        twice = con.sql("SELECT DISTINCT low FROM __repeated WHERE low = high").fetchall()
        return shared, {int(row[0]) for row in twice}
    finally:
        con.close()


def _others_sql(con, part: Partition, rivals: Rivals | None) -> str | None:
    """The other shares' rows of the keys this share holds too (``extract.normalised_sql``'s ``others``)."""
    if rivals is None or rivals.keys.num_rows == 0:
        return None
    con.register("__rivals", rivals.keys)
    src = part.config.source
    entity, event = quote_ident(src.entity_id), quote_ident(src.event_time)
    return (f"SELECT * FROM ({part.source(rivals.units)}) o WHERE ({part.where}) AND EXISTS "
            f"(SELECT 1 FROM __rivals r WHERE r.__id = o.{entity} AND r.__at IS NOT DISTINCT FROM o.{event})")


@contextmanager
def share_connection(part: Partition) -> Iterator:
    """A worker's own in-memory DuckDB connection for one share: the source's object store, the
    cut-off. One DuckDB thread whatever the worker's budget: rows come out in one order in every
    attempt of a task (a retried task writes the same files, draws the same drift sample)."""
    _threads_of_this_worker()
    con = memory_connection(part.memory_limit, threads=1)
    try:
        register_object_store(con, part.config.source.parquet)
        set_cutoff(con, part.as_of)
        yield con
    finally:
        con.close()


def pull_share(con, part: Partition, rivals: Rivals | None, path: Path, valid_rows: ValidRows | None = None) -> PullResult:
    """The share's rows of ``part.where`` through the data contract (the local engine's own SQL, the
    duplicate rule ranking against ``rivals``) into run file ``path`` (with ``valid_rows``: only the
    rejected ones, the valid ones handed to it as they are read: ``source.pull``)."""
    return pull(con, part.config, part.project_root, part.where, path, valid_rows, columns=part.columns,
                source=part.source(), others=_others_sql(con, part, rivals),
                repeated=None if rivals is None else rivals.repeated)


def check_partition(part: Partition, profile: drift.ReferenceProfile | None, rivals: Rivals | None = None,
                    order: ScoreOrder | None = None, keep: bool = True, sample_size: int = drift.CURRENT_SAMPLE_SIZE) -> CheckedPart:
    """One pass over the partition's rows, as the local engine's pull: each row through the data
    contract (the local engine's own SQL, the duplicate rule ranking against ``rivals``; rejected
    rows to the lake's quarantine file), each valid row tallied for drift, scored with ``order``'s
    model into the lake when given, and kept in a staging run file only when ``keep`` (a later
    step reads it again: a champion crowned or promoted in the run rescores, shadow scores). Reading
    the share once, not writing it to staging and reading it back twice, is what keeps the engine's
    cost near the local engine's."""
    rejected = part.path(STAGING, "-rejected.arrow")
    kept = part.path(STAGING, ".arrow") if keep else None
    # distinct seeds: the merged sample stays uniform
    tally = drift.CurrentAccumulator(profile, sample_size=sample_size, seed=part.index + 1) if profile is not None else None
    scored: ScoredPart | None = None

    def valid_rows(batches: Iterator[pa.RecordBatch], rows: int) -> None:
        nonlocal scored
        batches = tallied_and_kept(batches, tally, profile, kept)
        if order is None:
            for _ in batches:
                pass
        else:
            scored = _score_stream(part, batches, rows, order)

    with share_connection(part) as con:
        pulled = pull_share(con, part, rivals, rejected, valid_rows)
        quarantine = _write_quarantine(con, part, rejected)
        if kept is not None and not kept.exists():  # no valid row: an empty run file still has the pulled columns
            ipc.new_file(str(kept), run_file_schema(rejected)).close()
    valid = pulled.rows - sum(pulled.by_rule.values())
    if order is not None and scored is None:  # no valid row: an empty scores file, so every share has one
        scored = _score_stream(part, iter(()), 0, order, run_file_schema(rejected))
    null_counts = {name: round(share * valid) for name, share in pulled.null_fractions.items()}  # the shares of exact counts
    return CheckedPart(part.index, str(kept) if kept else None, pulled, null_counts, quarantine,
                       tally if valid else None, scored)


def _write_quarantine(con, part: Partition, rejected_rows: Path) -> PartFile:
    """The rejected rows as ``batchml.quarantine`` stores them (the id cast by DuckDB, as the local engine does)."""
    rejected = pa.Table.from_batches(list(run_file_batches(rejected_rows, valid=False)), schema=run_file_schema(rejected_rows))
    table = quarantine_rows(con, rejected)
    return write_part(table.to_batches(), QUARANTINE_SCHEMA, part.path(QUARANTINE), QUARANTINE, part.index)


def _threads_of_this_worker() -> None:
    """Every engine of a task works with the worker's own threads (one per core it was given), not
    every core of the machine: two one-thread workers on two cores would otherwise run four
    threads. ``BATCHML_THREADS`` (set here unless the worker's environment sets it) is what
    LightGBM, the compiled trees and the scoring loop (:func:`~batchml.models.scoring.score_batches`)
    read; Arrow's pool is sized to it too (a task's DuckDB has one thread: :func:`share_connection`)."""
    try:
        from distributed import get_worker

        given = get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):  # not on a Dask worker
        return
    os.environ.setdefault("BATCHML_THREADS", str(max(1, given)))
    pa.set_cpu_count(thread_count())


_MODELS: dict[ModelRef, registry.LoadedModel] = {}  # per worker process: loaded (and compiled) once


def _load(ref: ModelRef) -> registry.LoadedModel:
    if ref not in _MODELS:
        _MODELS[ref] = registry.load({"job": ref.job, "version": ref.version, "artifact_path": ref.artifact_path,
                                      "sha256": ref.sha256, "manifest_sha256": ref.manifest_sha256,
                                      registry.LIBRARIES: dict(ref.libraries)})
    return _MODELS[ref]


def score_partition(part: Partition, staging: str, order: ScoreOrder) -> ScoredPart:
    """Score the partition's kept valid rows (its staging run file) with ``order``'s model: a
    champion crowned or promoted after the pass, or the challenger's shadow scores (the client
    knows the batch's valid rows: ``order.keep_share`` is given)."""
    return _score_stream(part, run_file_batches(Path(staging)), 0, order, run_file_schema(Path(staging)))


def _score_stream(part: Partition, batches: Iterator[pa.RecordBatch], rows: int, order: ScoreOrder,
                  schema: pa.Schema | None = None) -> ScoredPart | None:
    """Score ``batches`` (at most ``rows`` rows; ``schema``: theirs, else the first batch's) with
    ``order``'s model (its predictor chosen, compiled and verified on this worker as the local
    engine does) into a scores file in the lake. None when there is no batch and no ``schema``."""
    config = part.config
    _threads_of_this_worker()
    if part.pause and part.pause[0] == "score_partition":
        time.sleep(part.pause[1])
    if schema is None:
        first = next(batches, None)
        if first is None:
            return None
        schema, batches = first.schema, itertools.chain([first], batches)
    model = _load(order.ref)
    predictor = make_predictor(model, config.scoring.engine)
    summary = ScoreSummary()
    prediction = drift.CurrentAccumulator(order.profile, sample_size=0, seed=part.index + 1)  # psi: bin counts, no sample
    rng = np.random.default_rng([config.training.seed, part.index])
    keep_share = order.keep_share if order.keep_share is not None else min(1.0, ESTIMATE_SAMPLE / max(rows, 1))
    kept: list[np.ndarray] = []

    def observe(batch: pa.RecordBatch, scores: np.ndarray) -> None:
        prediction.update({}, {}, scores=scores)
        kept.append(scores if keep_share >= 1.0 else scores[rng.random(len(scores)) < keep_share])

    scored = score_batches(batches, model, predictor, config, run_id=part.run_id, scored_at=order.scored_at,
                           summary=summary, on_scores=observe)
    scores = write_part(scored, scores_schema(schema, config), part.path(order.kind), order.kind, part.index)
    return ScoredPart(part.index, scores, summary, prediction, np.concatenate(kept) if kept else np.empty(0))
