"""Streaming scoring: record batches in, score rows out, memory bounded by the batch size.

Each batch is encoded exactly as the model's ``model.json`` says (float64 — float32 input moves
LightGBM scores by up to 0.01), predicted, banded, and given reason codes: the top
``scoring.reasons`` features by contribution (log-odds units) that pushed the score *up*, for the
rows in ``scoring.reason_bands`` (see ``reasons`` for what each method costs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import numpy as np
import pyarrow as pa

from batchml.config import JobConfig, thread_count
from batchml.data.arrays import from_numpy, repeat, strings
from batchml.data.extract import ENTITY, EVENT_TIME
from batchml.data.features import to_matrix
from batchml.models.objectives import Outputs, objective_of
from batchml.models.reasons import REASON_TYPE, PathExplainer, leaf_indices, shap_contributions, top_reasons
from batchml.models.registry import MODEL_FILE, LoadedModel



log = logging.getLogger("batchml")

class Predictor(Protocol):
    """Anything that turns a float64 feature matrix into LightGBM's predictions (probabilities,
    values, or rows x classes probabilities for multiclass).

    ``concurrent_batches``: how many batches may be predicted at once, each with ``threads=1``
    (1: one batch at a time, with every core)."""

    name: str
    concurrent_batches: int

    def predict(self, matrix: np.ndarray, threads: int | None = None) -> np.ndarray: ...


@dataclass
class LightGBMPredictor:
    model: LoadedModel
    name: str = "lightgbm"
    concurrent_batches: int = 1  # one Booster, one predict at a time; LightGBM spreads it over the cores

    def predict(self, matrix: np.ndarray, threads: int | None = None) -> np.ndarray:
        return self.model.booster.predict(matrix, num_threads=threads or thread_count(len(matrix)))


def make_predictor(model: LoadedModel, engine: str = "auto", warn: Callable[[str], None] | None = None) -> Predictor:
    """The fastest predictor available for ``engine`` (compiled trees fall back to LightGBM)."""
    if engine in ("auto", "compiled"):
        try:
            from batchml.models.compiled import compiled_predictor
        except ImportError:
            compiled_predictor = None
        if compiled_predictor is not None:
            predictor = compiled_predictor(model, required=engine == "compiled", warn=warn)
            if predictor is not None:
                return predictor
    return LightGBMPredictor(model)


def load_for_scoring(model: LoadedModel, config: JobConfig, warn: Callable[[str], None] | None = None) -> Predictor:
    """``model``'s predictor, with what its reason codes read loaded too (the leaves library, the
    path tables): 0.2-0.3 s of loading and checking that can overlap other work, such as DuckDB
    counting the rows, instead of holding up the first batch."""
    predictor = make_predictor(model, config.scoring.engine, warn)
    if config.scoring.reasons and config.scoring.reason_method == "path":
        _compiled_leaves(model, config)
        path_explainer(model)
    return predictor


def for_batch(predictor: Predictor, model: LoadedModel, config: JobConfig, rows: int,
              warn: Callable[[str], None] | None = None) -> Predictor:
    """``predictor``, or compiled trees built now: ``engine: auto`` about to score ``rows`` rows of a
    model below ``compiled.AUTO_MIN_LEAVES`` (not compiled at its promotion) with LightGBM compiles
    it when a batch this big pays for the compile (``compiled.compile_pays``)."""
    if config.scoring.engine != "auto" or not isinstance(predictor, LightGBMPredictor):
        return predictor
    try:
        from batchml.models.compiled import compiled_for_batch
    except ImportError:
        return predictor
    leaves = bool(config.scoring.reasons) and config.scoring.reason_method == "path"
    return compiled_for_batch(model, rows, leaves=leaves, warn=warn) or predictor


def prepare_engine(model: LoadedModel, engine: str, warn: Callable[[str], None] | None = None, *, every_size: bool = False) -> None:
    """At promotion: compile the new champion's trees now, so nightly runs only load them.

    ``auto`` compiles large models only (``compiled.AUTO_MIN_LEAVES``; smaller ones when a run first
    scores a batch big enough, see :func:`for_batch`) unless ``every_size`` (``batchml models
    compile``: asked for); ``compiled`` always; without lleaves installed this does nothing and
    scoring stays on LightGBM."""
    if engine == "lightgbm":
        return
    try:
        from batchml.models.compiled import precompile
    except ImportError:
        return
    precompile(model, force=every_size or engine == "compiled", warn=warn)


def band_codes(scores: np.ndarray, config: JobConfig) -> tuple[np.ndarray, list[str]]:
    """Band per score as an index into the returned names: the highest band whose threshold the
    score reaches, else ``low`` (the last name). Small integers, not strings: counting, choosing the
    rows that get reasons and building the Arrow column stay vectorised."""
    edges = config.band_edges  # highest threshold first
    names = [name for name, _ in edges] + ["low"]
    codes = np.full(len(scores), len(edges), dtype=np.int32)
    for code in range(len(edges) - 1, -1, -1):  # lowest first, so a higher band overwrites it
        codes[scores >= edges[code][1]] = code
    return codes, names


def reason_codes(model: LoadedModel, matrix: np.ndarray, wanted: np.ndarray, config: JobConfig,
                 predicted: np.ndarray | None = None) -> pa.Array:
    """Top-``scoring.reasons`` contributions for rows where ``wanted`` is true; null for the others.

    ``path`` reads each row's leaves from a verified compiled leaves library when ``scoring.engine``
    allows compiled trees and one exists (``compiled.compiled_leaves``), else with LightGBM's pred_leaf.
    ``predicted`` (multiclass): each row's predicted class; its contributions are those towards that
    class (the trees of that class only).
    """
    rows = np.flatnonzero(wanted)
    k = config.scoring.reasons
    if k == 0 or len(rows) == 0:
        return pa.nulls(len(matrix), REASON_TYPE)
    chosen = matrix[rows]
    towards = None if predicted is None else predicted[rows]
    if config.scoring.reason_method == "shap":
        contributions = shap_contributions(model.booster, chosen, towards)
    else:
        compiled = _compiled_leaves(model, config)
        leaves = compiled.predict(chosen) if compiled is not None else leaf_indices(model.booster, chosen)
        contributions = path_explainer(model).contributions(leaves, towards)
    return top_reasons(contributions, model.spec.features, rows, len(matrix), k)


def _compiled_leaves(model: LoadedModel, config: JobConfig):
    """The model's verified leaves library when ``scoring.engine`` allows compiled trees, else None."""
    if config.scoring.engine not in ("auto", "compiled"):
        return None
    from batchml.models.compiled import compiled_leaves

    return compiled_leaves(model, required=config.scoring.engine == "compiled")


def path_explainer(model: LoadedModel) -> PathExplainer:
    """The model's path-attribution tables, built once per loaded model from its model.txt (verified
    against the registry's sha256 when the model was loaded): 0.06 s for 300 trees x 63 leaves."""
    if "path_explainer" not in model.cache:
        model.cache["path_explainer"] = PathExplainer.from_model_text((model.path / MODEL_FILE).read_text(), len(model.spec.features),
                                                                      len(model.manifest.get("classes") or []) or 1)
    return model.cache["path_explainer"]


@dataclass
class ScoreSummary:
    rows: int = 0
    bands: Counter = field(default_factory=Counter)
    predict_seconds: float = 0.0
    reason_seconds: float = 0.0
    predictor: str = ""


def score_batches(
    batches: Iterable[pa.RecordBatch],
    model: LoadedModel,
    predictor: Predictor,
    config: JobConfig,
    *,
    run_id: str,
    scored_at: datetime,
    summary: ScoreSummary,
    on_scores: Callable[[pa.RecordBatch, np.ndarray], None] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Score each normalised batch; yields rows for the scores table, in the order of ``batches``.

    Predicts run in worker threads (lleaves and LightGBM release the GIL) while this thread reads
    and encodes the next batch and finishes earlier ones (bands, reasons, output rows), so reading
    and writing overlap the predict instead of adding to it. A compiled predictor scores
    ``concurrent_batches`` batches at once, one thread each: no thread waits for another's half
    of a batch, and one-thread lleaves does more per core than two threads on one batch. With a
    budget of one thread (``BATCHML_THREADS=1``, as a Dask worker with one thread sets it) the
    predict runs in this thread: overlapping would keep two cores busy (a second worker then
    only competes for them).
    """
    summary.predictor = predictor.name
    wanted_bands = None if config.scoring.reason_bands is None else set(config.scoring.reason_bands)

    workers = max(1, predictor.concurrent_batches) if thread_count() > 1 else 0  # 0: predict in this thread
    timing = threading.Lock()  # workers add to one figure

    def predict(matrix: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        scores = predictor.predict(matrix, threads=1 if workers > 1 else None)
        with timing:  # summed over workers: thread-seconds, not wall time
            summary.predict_seconds += time.perf_counter() - started
        return scores

    objective = objective_of(model.manifest.get("objective"))
    banded = objective.name == "binary" or bool(config.scoring.bands)  # no bands (regression, multiclass): risk_band null

    def finish(batch: pa.RecordBatch, matrix: np.ndarray, raw: np.ndarray) -> pa.RecordBatch:
        outputs = objective.outputs(raw)
        scores = outputs.score
        codes, names = band_codes(scores, config)
        if wanted_bands is None:
            wanted = np.ones(len(scores), bool)
        else:
            wanted = np.isin(codes, [code for code, name in enumerate(names) if name in wanted_bands])
        started = time.perf_counter()
        reasons = reason_codes(model, matrix, wanted, config, outputs.predicted)
        summary.reason_seconds += time.perf_counter() - started
        summary.rows += batch.num_rows
        if banded:
            summary.bands.update({name: int(n) for name, n in zip(names, np.bincount(codes, minlength=len(names))) if n})
        if on_scores is not None:
            on_scores(batch, scores)
        if banded:
            bands = pa.DictionaryArray.from_arrays(from_numpy(codes), strings(names)).dictionary_decode()
        else:
            bands = pa.nulls(len(scores), pa.string())
        return score_rows(batch, scores, bands, reasons, config, model.version, run_id, scored_at,
                          classes=model.manifest.get("classes"), outputs=outputs)

    in_flight: deque[tuple[pa.RecordBatch, np.ndarray, Future]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="batchml-predict") as pool:
        submit = pool.submit if workers else _done_now
        for batch in batches:
            if batch.num_rows == 0:
                continue
            matrix = to_matrix(batch, model.spec)
            in_flight.append((batch, matrix, submit(predict, matrix)))
            if len(in_flight) > workers:  # every worker has a batch: finish the oldest meanwhile
                batch, matrix, scores = in_flight.popleft()
                yield finish(batch, matrix, scores.result())
        while in_flight:
            batch, matrix, scores = in_flight.popleft()
            yield finish(batch, matrix, scores.result())


def _done_now(fn: Callable, *args) -> Future:
    """``fn(*args)`` run here, as an executor's finished future."""
    done: Future = Future()
    done.set_result(fn(*args))
    return done


PROBABILITIES_TYPE = pa.map_(pa.string(), pa.float64())  # class -> probability: probabilities['fraud'] in SQL


def score_rows(batch, scores, bands, reasons, config: JobConfig, version: int, run_id: str, scored_at: datetime,
               classes: list[str] | None = None, outputs: Outputs | None = None) -> pa.RecordBatch:
    """The scores table's rows; a multiclass job's also hold ``predicted_class`` and ``probabilities``."""
    n = batch.num_rows
    rows = pa.RecordBatch.from_arrays(
        [
            batch.column(ENTITY),
            from_numpy(np.asarray(scores, dtype=np.float64)),
            bands,
            from_numpy(np.full(n, version, dtype=np.int32)),
            repeat(run_id, n, pa.string()),
            repeat(scored_at, n, pa.timestamp("us")),
            batch.column(EVENT_TIME),
            reasons,
        ],
        names=[config.source.entity_id, "score", "risk_band", "model_version", "run_id", "scored_at", "event_time", "reasons"],
    )
    if config.label.objective != "multiclass":
        return rows
    predicted_class, probabilities = class_columns(n, classes, outputs)
    return pa.RecordBatch.from_arrays([*rows.columns, predicted_class, probabilities],
                                      names=[*rows.schema.names, "predicted_class", "probabilities"])


def class_columns(n: int, classes: list[str] | None, outputs: Outputs | None) -> tuple[pa.Array, pa.Array]:
    """``predicted_class`` (VARCHAR) and ``probabilities`` (MAP(VARCHAR, DOUBLE), one entry per class in
    the model's order) of a multiclass batch; nulls without predictions (an empty schema)."""
    if outputs is None or outputs.probabilities is None or not classes:
        return pa.nulls(n, pa.string()), pa.nulls(n, PROBABILITIES_TYPE)
    names, k = strings(classes), len(classes)
    keys = pa.DictionaryArray.from_arrays(from_numpy(np.tile(np.arange(k, dtype=np.int32), n)), names).dictionary_decode()
    offsets = from_numpy(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    probabilities = pa.MapArray.from_arrays(offsets, keys, from_numpy(np.asarray(outputs.probabilities, dtype=np.float64).ravel()))
    predicted = pa.DictionaryArray.from_arrays(from_numpy(np.asarray(outputs.predicted, dtype=np.int32)), names).dictionary_decode()
    return predicted, probabilities
