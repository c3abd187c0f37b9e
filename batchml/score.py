"""Streaming scoring: record batches in, score rows out, memory bounded by the batch size.

Each batch is encoded exactly as the model's ``model.json`` says (float64 — float32 input moves
LightGBM scores by up to 0.01), predicted, banded, and given reason codes: the top
``scoring.reasons`` features by contribution (log-odds units) that pushed the score *up*, for the
rows in ``scoring.reason_bands`` (see ``reasons`` for what each method costs).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
from pyarrow import ipc

from batchml.config import JobConfig, thread_count
from batchml.extract import ENTITY, EVENT_TIME
from batchml.features import to_matrix
from batchml.reasons import REASON_TYPE, PathExplainer, shap_contributions, top_reasons
from batchml.registry import LoadedModel



class Predictor(Protocol):
    """Anything that turns a float64 feature matrix into probabilities."""

    name: str

    def predict(self, matrix: np.ndarray) -> np.ndarray: ...


@dataclass
class LightGBMPredictor:
    model: LoadedModel
    name: str = "lightgbm"

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        return self.model.booster.predict(matrix, num_threads=thread_count(len(matrix)))


def make_predictor(model: LoadedModel, engine: str = "auto", warn: Callable[[str], None] | None = None) -> Predictor:
    """The fastest predictor available for ``engine`` (compiled trees fall back to LightGBM)."""
    if engine in ("auto", "compiled"):
        try:
            from batchml.compiled import compiled_predictor
        except ImportError:
            compiled_predictor = None
        if compiled_predictor is not None:
            predictor = compiled_predictor(model, required=engine == "compiled", warn=warn)
            if predictor is not None:
                return predictor
    return LightGBMPredictor(model)


def prepare_engine(model: LoadedModel, engine: str, warn: Callable[[str], None] | None = None) -> None:
    """At promotion: compile the new champion's trees now, so nightly runs only load them.

    ``auto`` compiles large models only (``compiled.AUTO_MIN_LEAVES``); ``compiled`` always;
    without lleaves installed this does nothing and scoring stays on LightGBM."""
    if engine == "lightgbm":
        return
    try:
        from batchml.compiled import precompile
    except ImportError:
        return
    precompile(model, force=engine == "compiled", warn=warn)


def risk_bands(scores: np.ndarray, config: JobConfig) -> np.ndarray:
    """Band per score: the highest band whose threshold the score reaches, else ``low``."""
    edges = config.band_edges
    conditions = [scores >= threshold for _, threshold in edges]
    return np.select(conditions, [name for name, _ in edges], default="low")


def reason_codes(model: LoadedModel, matrix: np.ndarray, wanted: np.ndarray, config: JobConfig) -> pa.Array:
    """Top-``scoring.reasons`` contributions for rows where ``wanted`` is true; null for the others."""
    rows = np.flatnonzero(wanted)
    k = config.scoring.reasons
    if k == 0 or len(rows) == 0:
        return pa.nulls(len(matrix), REASON_TYPE)
    if config.scoring.reason_method == "shap":
        contributions = shap_contributions(model.booster, matrix[rows])
    else:
        contributions = path_explainer(model).contributions(model.booster, matrix[rows])
    return top_reasons(contributions, model.spec.features, rows, len(matrix), k)


def path_explainer(model: LoadedModel) -> PathExplainer:
    """Built once per loaded model (walking every tree costs about as much as scoring a few thousand rows)."""
    if "path_explainer" not in model.cache:
        model.cache["path_explainer"] = PathExplainer.from_booster(model.booster)
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
    """Score each normalised batch; yields rows for the scores table."""
    reason_bands = set(config.scoring.reason_bands) if config.scoring.reason_bands is not None else None
    summary.predictor = predictor.name
    for batch in batches:
        if batch.num_rows == 0:
            continue
        matrix = to_matrix(batch, model.spec)
        started = time.perf_counter()
        scores = predictor.predict(matrix)
        summary.predict_seconds += time.perf_counter() - started
        bands = risk_bands(scores, config)
        wanted = np.ones(len(scores), bool) if reason_bands is None else np.isin(bands, list(reason_bands))
        started = time.perf_counter()
        reasons = reason_codes(model, matrix, wanted, config)
        summary.reason_seconds += time.perf_counter() - started
        summary.rows += batch.num_rows
        summary.bands.update(dict(zip(*np.unique(bands, return_counts=True))))
        if on_scores is not None:
            on_scores(batch, scores)
        yield score_rows(batch, scores, bands, reasons, config, model.version, run_id, scored_at)


def score_rows(batch, scores, bands, reasons, config: JobConfig, version: int, run_id: str, scored_at: datetime) -> pa.RecordBatch:
    n = batch.num_rows
    return pa.RecordBatch.from_arrays(
        [
            batch.column(ENTITY),
            pa.array(scores, pa.float64()),
            pa.array(bands, pa.string()),
            pa.array(np.full(n, version, dtype=np.int32)),
            pa.repeat(pa.scalar(run_id, pa.string()), n),
            pa.repeat(pa.scalar(scored_at, pa.timestamp("us")), n),
            batch.column(EVENT_TIME),
            reasons,
        ],
        names=[config.source.entity_id, "score", "risk_band", "model_version", "run_id", "scored_at", "event_time", "reasons"],
    )


def write_run_file(batches: Iterable[pa.RecordBatch], path: Path) -> int:
    """Stream batches into one Arrow IPC run file; returns the row count (no file when there are none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    rows = 0
    try:
        for batch in batches:
            if writer is None:
                writer = ipc.new_file(str(path), batch.schema)
            writer.write_batch(batch)
            rows += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows
