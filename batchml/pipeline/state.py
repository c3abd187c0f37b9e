"""What a run knows while its steps execute: one object, filled step by step (see ``nightly``)."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from batchml.config import JobConfig
from batchml.data.extract import PullResult
from batchml.models import evaluate, registry
from batchml.models.scoring import ScoreSummary
from batchml.monitoring import drift


@dataclass
class RunState:
    """The state of one run. Set by ``begin`` and ``extract`` (models, the batch, the history the
    triggers weigh), then ``drift``, ``train``/``evaluate`` and ``score``; read by ``commit``."""

    pull_config: JobConfig  # the config's features plus the champion's (JobRun._pull_config)
    # the models
    champion_row: dict | None = None
    champion: registry.LoadedModel | None = None  # the champion after the gate, once it has run
    scorer: tuple[registry.LoadedModel, Future] | None = None  # a model and its predictor, loading (JobRun._preload)
    shadow_model: registry.LoadedModel | None = None  # this run's rejected challenger, for shadow scores
    keep_challenger: bool = False  # commit this run's challenger even though the run fails
    # the batch
    source_columns: dict[str, str] | None = None  # described once, for every pull of the run
    champion_missing: list[str] = field(default_factory=list)  # champion features the source no longer has
    batch: PullResult | None = None
    drift_tally: drift.CurrentAccumulator | None = None  # the batch's valid rows, tallied as they passed
    kept_rows: Path | None = None  # the valid rows, kept only when a later step may read them again
    # the history the retrain triggers weigh
    new_labels: int = 0  # since the last training, counted up to training.retrain.min_new_labels (unset: not counted)
    last_trained: dict | None = None  # the job's most recently trained model (any status)
    answered: frozenset[str] = frozenset()  # triggers its last, unpromoted challenger was trained for
    realised: float | None = None
    performance: list[dict] = field(default_factory=list)  # realised metric rows
    # what the steps found
    drift_report: drift.DriftReport | None = None
    decision: evaluate.GateDecision | None = None
    scored: ScoreSummary = field(default_factory=ScoreSummary)
    scored_by: registry.LoadedModel | None = None  # the model whose scores the scores file holds
    estimated: list[dict] = field(default_factory=list)  # the estimated metric of the stored scores
    prediction_drift: list[dict] = field(default_factory=list)
    shadow_path: Path | None = None
    pending: list[Callable] = field(default_factory=list)  # functions (con) -> None, run inside the commit
