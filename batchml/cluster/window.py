"""The training window read by the workers themselves (``training.engine: dask`` over Parquet).

Each worker pulls its share of the window's files and row groups (planned from the footers as the
scoring engine plans a night, :mod:`~batchml.cluster.plan`) through the local engine's own SQL:
the point-in-time training filter (only rows landed and labeled before the cut-off), the data
contract, the duplicate rule ranked against the other shares' copies of a key. It keeps the valid
rows sorted as the local split sorts the window (event time, then entity id).

The split is decided on the client from small per-share answers, exactly as
:func:`~batchml.models.train.split_by_time` decides it over the whole window:

1. the latest event time of each share -> the holdout start (``holdout_days`` before the latest);
2. each share's count of rows before it and the keys of its last rows -> the validation tail's
   first key (the ``validation_fraction`` of those rows with the latest keys);
3. each share's validation and holdout rows (small: collected for early stopping and the gate),
   its fit row count, event-time range, label values and categorical level counts (summed: the
   encoder's level lists, as :func:`~batchml.data.features.fit_spec` ranks them).

The fit rows never reach the client: each share's matrix is built on its worker with the encoder,
dealt out row by row to every worker (worker to worker) and kept there (persisted futures) for
``lightgbm.dask``; the reference profile is merged from the parts (:mod:`batchml.cluster.reference`).
"""

from __future__ import annotations

import logging
import operator
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import ipc

from batchml.cluster import plan
from batchml.cluster.tasks import Partition, Rivals, pull_share, share_connection
from batchml.config import JobConfig
from batchml.data.extract import ENTITY, EVENT_TIME, PullResult, read_run_file, training_filter
from batchml.data.features import FeatureSpec, level_counts, spec_from_counts, to_matrix
from batchml.data.sources import parquet_location
from batchml.errors import DataError
from batchml.models.objectives import objective_of
from batchml.models.train import Split, TrainedModel, labels
from batchml.storage.lake import STAGING
from batchml.storage.source import register_object_store
from batchml.storage.warehouse import memory_connection

log = logging.getLogger("batchml")

ORDER = [(EVENT_TIME, "ascending"), (ENTITY, "ascending")]  # split_by_time's order


@dataclass(frozen=True)
class Cut:
    """Where the split falls: rows at or after ``holdout_start`` are held out; of the others, those
    whose (event time, entity id) is at or after ``validation`` are the validation tail."""

    holdout_start: datetime | None  # None: the window is empty
    validation: tuple | None  # None: no validation tail


@dataclass
class WindowShare:
    """One worker's share of the window after the pull (its valid rows stay in ``staging``)."""

    index: int
    worker: str
    staging: str
    pulled: PullResult
    valid: int
    latest: datetime | None


@dataclass
class HeldShare:
    """One share's part of the split: what the client collects, and a summary of its fit rows."""

    validation: pa.Table
    holdout: pa.Table
    fit_rows: int
    fit_range: tuple[datetime | None, datetime | None]
    label_values: np.ndarray
    levels: dict[str, Counter]


@dataclass
class ResidentWindow:
    """The window on the cluster: the split's collected parts and the shares holding the fit rows."""

    split: Split  # fit: no rows (they are on the workers); validation and holdout: collected
    shares: list[WindowShare]
    held: list[HeldShare]
    cut: Cut
    pulled: PullResult
    fit_rows: int = 0
    spec: FeatureSpec | None = None
    matrices: list = field(default_factory=list)  # (x future, y future, rows) per share with fit rows

    @property
    def fit_range(self) -> tuple[datetime | None, datetime | None]:
        lows = [h.fit_range[0] for h in self.held if h.fit_range[0] is not None]
        highs = [h.fit_range[1] for h in self.held if h.fit_range[1] is not None]
        return (min(lows) if lows else None, max(highs) if highs else None)


# -- on the workers ------------------------------------------------------------------------------


def pull_window_share(part: Partition, rivals: Rivals | None) -> WindowShare:
    """Pull the share's rows of the training window through the data contract and keep its valid
    rows, sorted as the local split sorts them, in a staging run file."""
    from distributed import get_worker

    raw, staging = part.path(STAGING, "-window-raw.arrow"), part.path(STAGING, "-window.arrow")
    with share_connection(part) as con:
        pulled = pull_share(con, part, rivals, raw)
    rows = read_run_file(raw).sort_by(ORDER)
    raw.unlink(missing_ok=True)
    with ipc.new_file(str(staging), rows.schema) as writer:  # a share with no rows in the window too
        writer.write_table(rows)
    latest = pc.max(rows.column(EVENT_TIME)).as_py() if rows.num_rows else None
    return WindowShare(part.index, get_worker().address, str(staging), pulled, rows.num_rows, latest)


def _rest_rows(rows: pa.Table, cut: Cut) -> int:
    """Rows before the holdout start: a prefix, the rows being sorted by event time."""
    if cut.holdout_start is None:
        return rows.num_rows
    start = pa.scalar(cut.holdout_start, rows.schema.field(EVENT_TIME).type)
    return rows.num_rows - (pc.sum(pc.greater_equal(rows.column(EVENT_TIME), start)).as_py() or 0)


def share_tail(staging: str, cut: Cut, rows: int) -> tuple[int, pa.Table]:
    """The share's count of rows before the holdout, and the keys of the last ``rows`` of them."""
    table = read_run_file(Path(staging))
    rest = _rest_rows(table, cut)
    take = min(rows, rest)
    return rest, table.slice(rest - take, take).select([EVENT_TIME, ENTITY])


def _parts(staging: str, cut: Cut) -> tuple[pa.Table, pa.Table, pa.Table]:
    """The share's (fit, validation, holdout) rows."""
    table = read_run_file(Path(staging))
    rest = _rest_rows(table, cut)
    head = table.slice(0, rest)
    in_tail = 0
    if cut.validation is not None and rest:
        at, entity = cut.validation
        times, ids = head.column(EVENT_TIME), head.column(ENTITY)
        at_scalar, id_scalar = pa.scalar(at, times.type), pa.scalar(entity, ids.type)
        later = pc.or_(pc.greater(times, at_scalar), pc.and_(pc.equal(times, at_scalar), pc.greater_equal(ids, id_scalar)))
        in_tail = pc.sum(later).as_py() or 0
    return head.slice(0, rest - in_tail), head.slice(rest - in_tail), table.slice(rest)


def share_held(staging: str, cut: Cut, categorical: list[str], config: JobConfig) -> HeldShare:
    fit, validation, holdout = _parts(staging, cut)
    span = pc.min_max(fit.column(EVENT_TIME)).as_py() if fit.num_rows else {"min": None, "max": None}
    values = np.unique(labels(fit, config)) if config.label.objective != "multiclass" else np.empty(0)
    return HeldShare(validation, holdout, fit.num_rows, (span["min"], span["max"]), values, level_counts(fit, categorical))


def share_matrix(staging: str, cut: Cut, spec: FeatureSpec, config: JobConfig) -> tuple[np.ndarray, np.ndarray]:
    """The share's fit rows encoded (the model's matrix) and their labels: kept on this worker."""
    fit, _, _ = _parts(staging, cut)
    return np.ascontiguousarray(to_matrix(fit, spec)), labels(fit, config)


# -- on the client -------------------------------------------------------------------------------


def pull_window(client, gather, config: JobConfig, pull_config: JobConfig, root: Path, lake: Path, run_id: str,
                as_of: datetime, columns: dict[str, str], memory_limit: str, con) -> ResidentWindow:
    """Pull the training window on the workers and split it as ``split_by_time`` would (``gather``:
    the caller's, mapping task failures; ``con``: a DuckDB connection for the footers)."""
    from batchml.cluster.connect import worker_count
    from batchml.cluster.run import share_rivals

    register_object_store(con, pull_config.source.parquet)
    units = plan.plan(con, pull_config, parquet_location(pull_config.source.parquet, root), plan.Bounds(None, as_of, hive_days=False))
    shares = plan.balance(units, worker_count(client)) or [None]
    where = training_filter(config, as_of)
    parts = [Partition(pull_config, root, lake, run_id, as_of, where, columns, index, len(shares), share, memory_limit)
             for index, share in enumerate(shares)]
    rivals = share_rivals(client, parts, gather, config.job)
    pulled = sorted(gather([client.submit(pull_window_share, part, rivals[part.index], key=f"window-{run_id}-{part.index}",
                                          pure=False) for part in parts], "pulling the training window"), key=lambda s: s.index)
    latest = [s.latest for s in pulled if s.latest is not None]
    cut = Cut(max(latest) - timedelta(days=config.training.holdout_days) if latest else None, None)
    cut = Cut(cut.holdout_start, _validation_start(client, gather, config, pulled, cut))
    held = gather([client.submit(share_held, s.staging, cut, list(config.features.categorical), config, pure=False,
                                 workers=[s.worker], allow_other_workers=True) for s in pulled], "splitting the training window")
    validation = _concat([h.validation for h in held])
    holdout = _concat([h.holdout for h in held])
    fit = validation.slice(0, 0)
    window = ResidentWindow(Split(fit, validation, holdout), pulled, held, cut, _merged_pull(pulled, lake),
                            fit_rows=sum(h.fit_rows for h in held))
    return window


def _validation_start(client, gather, config: JobConfig, shares: list[WindowShare], cut: Cut) -> tuple | None:
    """The first key of the validation tail: of the rows before the holdout, the last
    ``validation_fraction`` (at least one), as ``split_by_time`` counts them."""
    total = sum(s.valid for s in shares)
    bound = max(1, int(total * config.training.validation_fraction))  # >= the tail's size: rest <= total
    answers = gather([client.submit(share_tail, s.staging, cut, min(bound, s.valid), pure=False, workers=[s.worker],
                                    allow_other_workers=True) for s in shares], "splitting the training window")
    rest = sum(count for count, _ in answers)
    tail = min(rest, max(1, int(rest * config.training.validation_fraction)))
    if tail == 0:
        return None
    keys = pa.concat_tables([k for _, k in answers]).sort_by(ORDER)
    first = keys.slice(keys.num_rows - tail, 1)
    return first.column(EVENT_TIME)[0].as_py(), first.column(ENTITY)[0].as_py()


def _concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables, promote_options="permissive").sort_by(ORDER)


def _merged_pull(shares: list[WindowShare], folder) -> PullResult:
    by_rule: Counter[str] = Counter()
    for s in shares:
        by_rule.update(s.pulled.by_rule)
    return PullResult(folder, sum(s.pulled.rows for s in shares), dict(by_rule), {}, None)


def encode_on_workers(client, gather, window: ResidentWindow, config: JobConfig) -> FeatureSpec:
    """The encoder, from the summed level counts. (:func:`build_matrices` then deals each share's
    fit rows out row by row to every worker: the workers train on about equal rows even when the
    shares are time-ordered (the latest share holding the holdout), and each bins its features on
    a sample of the whole window, not on one period.) Raises as local training does when there is too little to fit."""
    if window.fit_rows < config.training.min_train_rows:
        held = (f", {window.split.holdout.num_rows} more are held out (the last {config.training.holdout_days} days)"
                if window.split.holdout.num_rows else "")
        raise DataError(f"only {window.fit_rows} labeled rows to train {config.job} on (min_train_rows "
                        f"{config.training.min_train_rows}){held}; wait for more labels or lower training.min_train_rows")
    values = np.unique(np.concatenate([h.label_values for h in window.held]))
    problem = objective_of(config.label.objective).trainable_problem(values)
    if problem:
        raise DataError(f"training rows for {config.job} {problem}")
    counts: dict[str, Counter] = {name: Counter() for name in config.features.categorical}
    for h in window.held:
        for name, counted in h.levels.items():
            counts[name].update(counted)
    window.spec = spec_from_counts(config.features.numeric, config.features.categorical, counts)
    return window.spec


def build_matrices(client, window: ResidentWindow, config: JobConfig, workers: list[str]) -> None:
    """Each share's fit matrix built on its worker, dealt out row by row to ``workers`` and kept
    there (persisted futures, in ``window.matrices``). Built anew for each attempt of the fit: a
    retry after a lost worker reads the staged window again rather than trusting lost results."""
    workers = workers or [None]
    matrices = []
    for share, held in zip(window.shares, window.held):
        if held.fit_rows == 0:
            continue
        both = client.submit(share_matrix, share.staging, window.cut, window.spec, config, pure=False, workers=[share.worker],
                             allow_other_workers=True)
        for k, target in enumerate(workers):  # dealt out: every worker a sample of every share
            rows = len(range(k, held.fit_rows, len(workers)))
            if rows == 0:
                continue
            piece = client.submit(every, both, k, len(workers), pure=False, workers=[share.worker], allow_other_workers=True)
            there = {"workers": [target], "allow_other_workers": True} if target else {}
            matrices.append((client.submit(operator.getitem, piece, 0, **there), client.submit(operator.getitem, piece, 1, **there), rows))
    _built([f for x, y, _ in matrices for f in (x, y)])
    window.matrices = matrices


def every(both: tuple[np.ndarray, np.ndarray], k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows k, k + n, k + 2n, ... of a share's matrix and labels."""
    x, y = both
    return np.ascontiguousarray(x[k::n]), np.ascontiguousarray(y[k::n])


def _built(futures: list) -> None:
    """Wait for the fit matrices to be built where they are kept (they are not brought here); a
    failed build raises its task's error (a lost attempt of the fit, retried by ``fit_with_retry``)."""
    from distributed import wait

    wait(futures)
    failed = [f for f in futures if f.status != "finished"]
    if failed:
        failed[0].result()


def resident(window: ResidentWindow, config: JobConfig):
    """Placement (``training.fit_once``) of the fit rows: built on the workers for this attempt."""
    def place(client, workers: list[str]) -> tuple[list, list, list[str]]:
        import dask.array as da

        build_matrices(client, window, config, workers)

        width = len(window.spec.features)
        x_parts = [da.from_delayed(x, shape=(rows, width), dtype=np.float64) for x, _, rows in window.matrices]
        y_parts = [da.from_delayed(y, shape=(rows,), dtype=np.float64) for _, y, rows in window.matrices]
        holders = client.who_has([x for x, _, _ in window.matrices])
        return x_parts, y_parts, sorted({w for found in holders.values() for w in found} or workers)
    return place


def fit_resident(client, gather, window: ResidentWindow, config: JobConfig) -> TrainedModel:
    """Train on the fit rows where they are, cut at the validation tail's early-stopping round."""
    from batchml.cluster.training import cut_at_early_stop, fit_with_retry, recorded_params

    started = time.perf_counter()
    spec = window.spec or encode_on_workers(client, gather, window, config)
    booster, workers = fit_with_retry(client, config, resident(window, config), spec)
    booster = cut_at_early_stop(booster, config, window.split.validation, spec)
    low, high = window.fit_range
    if window.split.validation.num_rows:
        span = pc.min_max(window.split.validation.column(EVENT_TIME)).as_py()
        low, high = min(x for x in (low, span["min"]) if x is not None), max(x for x in (high, span["max"]) if x is not None)
    return TrainedModel(booster=booster, spec=spec, params=recorded_params(config, workers, False, window="workers"),
                        train_start=low, train_end=high, train_rows=window.fit_rows + window.split.validation.num_rows,
                        best_iteration=booster.current_iteration(), seconds=time.perf_counter() - started)


def reference_profile(client, gather, window: ResidentWindow, config: JobConfig, scores: np.ndarray):
    """The challenger's drift reference from the parts of its reference rows (the fit matrices on
    the workers, then the validation tail here): :mod:`batchml.cluster.reference`, equal to the
    profile local training builds from every row (moments to float rounding)."""
    from batchml.cluster.reference import merged_profile

    spec = window.spec
    validation = np.ascontiguousarray(to_matrix(window.split.validation, spec))
    fit_x = [x for x, _, _ in window.matrices]
    offsets = list(np.cumsum([0] + [rows for _, _, rows in window.matrices]))

    def run_on_parts(fn, *args) -> list:
        remote = gather([client.submit(fn, x, i, *args, pure=False) for i, x in enumerate(fit_x)], "profiling the training window")
        return [*remote, fn(validation, len(fit_x), *args)]

    levels: dict[str, Counter] = {name: Counter() for name in spec.categorical}
    for counts in [h.levels for h in window.held] + [level_counts(window.split.validation, spec.categorical)]:
        for name, counted in counts.items():
            levels[name].update(counted)
    rows = window.fit_rows + window.split.validation.num_rows
    missing = {name: rows - sum(counted.values()) for name, counted in levels.items()}
    return merged_profile(run_on_parts, spec.numeric, levels, missing, [int(o) for o in offsets], scores, config.training.seed)


# -- a nightly run's challenger, trained where the rows are ----------------------------------------


def on_workers(config: JobConfig) -> bool:
    """Whether the challenger's window is read by the workers: ``training.engine: dask`` over a
    Parquet source the Dask engine can split (no ``features.sql``). Forced bins need a sample of
    every fit row on the client, so they keep the client's pull."""
    from batchml.config import distributed_source_problem

    if config.training.engine != "dask" or config.training.forced_bins:
        return False
    try:
        distributed_source_problem(config)
    except ValueError:
        return False
    return True


def gatherer(client, address: str | None):
    """``gather(futures, what)``: the results, or one line naming the step when a task failed for good."""
    from batchml.errors import BatchMLError, ClusterError

    def gather(futures: list, what: str) -> list:
        try:
            return client.gather(futures)
        except BatchMLError:
            raise
        except Exception as exc:  # noqa: BLE001 - a task failed after the scheduler's retries
            raise ClusterError(f"{what} failed on the Dask cluster{f' at {address}' if address else ''}: "
                               f"{type(exc).__name__}: {exc}") from exc
    return gather


def train_candidate_on_workers(client, address: str | None, config: JobConfig, pull_config: JobConfig, root: Path, lake: Path,
                               run_id: str, as_of: datetime, columns: dict[str, str], memory_limit: str, models_root: Path,
                               version: int, warn=log.warning):
    """Challenger ``version``: the window read and split on the workers, trained where its fit rows
    are, profiled from the parts, then evaluated and written as every challenger
    (:func:`batchml.models.retrain.candidate_of`)."""
    from batchml.models import retrain

    gather = gatherer(client, address)
    con = memory_connection(memory_limit, threads=1)
    try:
        window = pull_window(client, gather, config, pull_config, root, lake, run_id, as_of, columns, memory_limit, con)
    finally:
        con.close()
    try:
        dropped = window.pulled.by_rule
        if dropped:  # every labeled row of the window trains or judges, unless the contract rejects it
            reasons = ", ".join(f"{rule}: {n}" for rule, n in sorted(dropped.items()))
            warn(f"{sum(dropped.values())} of {window.pulled.rows} labeled row(s) in the training window left out of "
                 f"training and holdout ({reasons}); see batchml.models.drop_reasons")
        trained = fit_resident(client, gather, window, config)
        candidate = retrain.candidate_of(config, window.split, trained, models_root, version, as_of, dropped,
                                         lambda scores: reference_profile(client, gather, window, config, scores))
        return candidate, window.pulled
    finally:
        window.matrices = []  # the workers free the fit rows
        for share in window.shares:
            Path(share.staging).unlink(missing_ok=True)
