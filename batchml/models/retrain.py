"""Continuous training: when to retrain, how a challenger is built, and the gate it must pass.

A challenger is trained point-in-time (``train``), stored as a registry artifact with its drift
reference profile and golden set, and compared with the champion on **the same holdout rows**
(``evaluate.decide``). The decision and every figure behind it go to ``batchml.model_events``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchml.monitoring import drift
from batchml.models import evaluate
from batchml.models import registry
from batchml.config import JobConfig
from batchml.errors import ModelError
from batchml.data.features import FeatureSpec, categorical_values, numeric_values, to_matrix
from batchml.models.objectives import objective_of
from batchml.models.train import Split, TrainedModel, fit, labels, predict, split_by_time

PROFILE_FILE = "profile.json"
GOLDEN_FILE = registry.GOLDEN_FILE
GOLDEN_ROWS = 256
LATENCY_ROWS = 5_000  # enough for a stable ratio; the full batch is timed in benchmarks
LATENCY_ROUNDS = 7  # turns of champion and challenger; the minimum of each is kept


@dataclass
class Candidate:
    """A freshly trained model, written to its artifact folder but not yet registered."""

    version: int
    trained: TrainedModel
    split: Split
    holdout_scores: np.ndarray
    metrics: dict
    folder: Path
    sha256: str
    manifest_sha256: str
    dropped: dict[str, int] = field(default_factory=dict)  # rule -> labeled rows of the window left out (quarantined)

    def registry_row(self, job: str, run_id: str, as_of: datetime, status: str) -> dict:
        t = self.trained
        return {
            "job": job, "version": self.version, "status": status, "created_at": as_of, "run_id": run_id,
            "train_start": t.train_start, "train_end": t.train_end, "train_rows": t.train_rows,
            "holdout_rows": self.split.holdout.num_rows, "metrics": self.metrics, "params": t.params,
            "artifact_path": str(self.folder), "sha256": self.sha256, "manifest_sha256": self.manifest_sha256,
            "rows_dropped": sum(self.dropped.values()), "drop_reasons": json.dumps(self.dropped) if self.dropped else None,
        }


def due_triggers(
    config: JobConfig,
    *,
    champion: dict | None,
    as_of: datetime,
    force: bool,
    dataset_drift: bool | None,
    new_labels: int,
    realised: float | None,
    champion_spec: FeatureSpec | None = None,
    last_trained: dict | None = None,
    answered: frozenset[str] | set[str] = frozenset(),
) -> list[str]:
    """The retrain triggers that fire for this run, in a fixed order (``champion_spec``: what the
    champion eats, for ``features_changed``).

    ``age`` counts from the job's last training (``last_trained``, whatever its outcome), not from
    the champion's: a champion that keeps beating its challengers would otherwise be "too old" every
    night. ``answered``: the triggers (``drift``, ``decay``) a challenger was already trained for under
    this champion and not promoted; they stay silent, since retraining for them would build the same
    challenger from nearly the same rows, until new labels (``new_labels``) or age call for one."""
    rules = config.training.retrain
    fired = []
    if champion is None:
        fired.append("no_champion")
    if force:
        fired.append("forced")
    if champion is not None:
        trained_at = max(champion["created_at"], last_trained["created_at"]) if last_trained else champion["created_at"]
        if rules.every_days and as_of - trained_at >= timedelta(days=rules.every_days):
            fired.append("age")
        if rules.on_drift and dataset_drift and "drift" not in answered:
            fired.append("drift")
        if rules.min_new_labels and new_labels >= rules.min_new_labels:
            fired.append("new_labels")
        holdout = _holdout_metric(champion, config.promotion.metric)
        if rules.max_decay and realised is not None and holdout is not None and "decay" not in answered:
            decay = objective_of(config.label.objective).improvement(config.promotion.metric, realised, holdout)
            if decay > rules.max_decay:
                fired.append("decay")
        if champion_spec is not None and any(feature_change(config, champion_spec)):
            fired.append("features_changed")
    return fired


def feature_change(config: JobConfig, spec: FeatureSpec) -> tuple[list[str], list[str]]:
    """(features the config adds, features it drops) compared with a model's ``spec``; a feature
    that changed kind (numeric <-> categorical) is in both."""
    ours = [*((n, "numeric") for n in config.features.numeric), *((n, "categorical") for n in config.features.categorical)]
    theirs = [*((n, "numeric") for n in spec.numeric), *((n, "categorical") for n in spec.categorical)]
    return [n for n, kind in ours if (n, kind) not in theirs], [n for n, kind in theirs if (n, kind) not in ours]


def describe_change(config: JobConfig, spec: FeatureSpec, version: int) -> str | None:
    """``config adds [a], drops [b] vs champion v3``, or None when the feature sets are the same."""
    added, dropped = feature_change(config, spec)
    if not added and not dropped:
        return None
    parts = [f"adds [{', '.join(added)}]" if added else "", f"drops [{', '.join(dropped)}]" if dropped else ""]
    return f"config {', '.join(p for p in parts if p)} vs champion v{version}"


def retrain_then_promote(job: str) -> str:
    """The way out when the champion needs columns the source lost (said by runs and by ``check``)."""
    return (f"train a challenger on the current features with `batchml run {job} --force-retrain` and, if the gate cannot "
            f"compare them, promote it by hand with `batchml models promote {job} N`")


def _holdout_metric(champion: dict, metric: str) -> float | None:
    metrics = champion.get("metrics")
    metrics = json.loads(metrics) if isinstance(metrics, str) else (metrics or {})
    return (metrics.get("holdout") or {}).get(metric)


def build_profile(split: Split, trained: TrainedModel, holdout_scores: np.ndarray, seed: int) -> drift.ReferenceProfile:
    """The drift reference: the rows the model learnt from, and its own holdout scores."""
    reference = pa.concat_tables([split.fit, split.validation])
    numeric = {n: numeric_values(reference, n) for n in trained.spec.numeric}
    categorical = {n: categorical_values(reference, n) for n in trained.spec.categorical}
    return drift.build_profile(numeric, categorical, scores=holdout_scores if len(holdout_scores) else None, seed=seed)


def train_candidate(config: JobConfig, table: pa.Table, models_root: Path, version: int, as_of: datetime,
                    dropped: dict[str, int] | None = None, fitter: Callable[[Split, JobConfig], TrainedModel] = fit) -> Candidate:
    """Train, profile and write the artifact of challenger ``version`` from the training rows
    (``dropped``: rule -> labeled rows of the window the pull quarantined, recorded with the model;
    ``fitter``: this process's :func:`~batchml.models.train.fit`, or the Dask cluster's
    (``training.engine: dask``, :mod:`batchml.cluster.training`): the rest is the same for both)."""
    split = split_by_time(table, config)
    trained = fitter(split, config)
    return candidate_of(config, split, trained, models_root, version, as_of, dropped,
                        lambda scores: build_profile(split, trained, scores, config.training.seed))


def candidate_of(config: JobConfig, split: Split, trained: TrainedModel, models_root: Path, version: int, as_of: datetime,
                 dropped: dict[str, int] | None, profile_of: Callable[[np.ndarray], drift.ReferenceProfile]) -> Candidate:
    """Evaluate, profile and write the artifact of a trained challenger (``profile_of(holdout
    scores)``: its reference profile, from the rows it learnt from wherever they are)."""
    holdout_scores = predict(trained.booster, split.holdout, trained.spec)
    y_holdout = labels(split.holdout, config, trained.classes)
    metrics = {"holdout": _safe_metrics(y_holdout, holdout_scores, config), "best_iteration": trained.best_iteration}
    folder = registry.model_dir(models_root, config.job, version)
    registry.clear_orphan(folder)
    folder.mkdir(parents=True)
    profile = profile_of(score_of(trained.objective, holdout_scores))
    (folder / PROFILE_FILE).write_text(_json(profile.to_dict()))
    write_golden(folder / GOLDEN_FILE, split, trained, config)
    manifest = {
        "job": config.job, "version": version, **trained.spec.to_dict(), "params": trained.params,
        "train_start": trained.train_start, "train_end": trained.train_end, "train_rows": trained.train_rows,
        "holdout_rows": split.holdout.num_rows, "rows_dropped": dict(dropped or {}), "metrics": metrics, "as_of": as_of,
        "encoding": "categorical value -> index in categories[feature]; unseen or null -> NaN (missing); numeric as float64",
        "objective": trained.objective,
        **({"classes": trained.classes} if trained.classes is not None else {}),
    }
    sha, manifest_sha = registry.write_artifact(folder, trained.booster, manifest)
    return Candidate(version, trained, split, holdout_scores, metrics, folder, sha, manifest_sha, dict(dropped or {}))


def _json(data: dict) -> str:
    return json.dumps(data, separators=(",", ":"))


def _safe_metrics(y: np.ndarray, p: np.ndarray, config: JobConfig | None = None) -> dict:
    objective = objective_of(config.label.objective if config else None)
    if len(y) == 0 or objective.problem(y) or (objective.name != "regression" and len(np.unique(y)) < 2):
        return {}
    return objective.compute_metrics(y, p)


def score_of(objective: str | None, raw: np.ndarray) -> np.ndarray:
    """The one number per row the scores table holds (multiclass: the predicted class's probability)."""
    return objective_of(objective).score(raw) if len(raw) else np.asarray(raw, dtype=np.float64).reshape(0)


def write_golden(path: Path, split: Split, trained: TrainedModel, config: JobConfig) -> None:
    """A few holdout (or training) rows with the model's scores: re-scored by ``batchml check``."""
    source = split.holdout if split.holdout.num_rows else split.validation
    rows = source.slice(0, GOLDEN_ROWS).select(trained.spec.features)
    scores = score_of(trained.objective, predict(trained.booster, rows, trained.spec))
    pq.write_table(rows.append_column("__score", pa.array(scores, pa.float64())), str(path))


def check_golden(model: registry.LoadedModel, tolerance: float = 1e-12) -> tuple[int, float]:
    """Re-score the golden set; returns (rows, largest score difference). Raises if any moved."""
    table = pq.read_table(str(model.path / GOLDEN_FILE))
    scores = score_of(model.manifest.get("objective"), predict(model.booster, table, model.spec))
    expected = table.column("__score").to_numpy()
    worst = float(np.max(np.abs(scores - expected))) if len(scores) else 0.0
    if worst > tolerance:
        raise ModelError(
            f"model {model.job} v{model.version}: golden-set scores moved by up to {worst:.3g} "
            f"(LightGBM, numpy or the encoding changed); investigate before scoring with it"
        )
    return len(scores), worst


def timed_rows(holdout: pa.Table) -> int:
    return max(LATENCY_ROWS, holdout.num_rows)


def _timing_matrix(spec, holdout: pa.Table) -> np.ndarray:
    matrix = to_matrix(holdout, spec)
    if len(matrix) == 0:
        return matrix
    return np.ascontiguousarray(np.resize(matrix, (timed_rows(holdout), matrix.shape[1])))


def _cpu_seconds(booster, matrix: np.ndarray) -> float:
    """CPU seconds of one single-threaded predict. LightGBM runs a one-thread predict on the calling
    thread, so this thread's CPU clock counts the model's work and nothing of the other processes
    that take the core away meanwhile (which a wall clock counts)."""
    started = time.thread_time()
    booster.predict(matrix, num_threads=1)
    return time.thread_time() - started


def scoring_work(booster, spec, holdout: pa.Table) -> float:
    """The work a predict does per row, counted rather than timed: the mean, over the timed rows,
    of the tree nodes the row walks (each split it is tested at, plus the leaf of every tree).

    A count is a property of the model and the rows alone, so the same two models get the same
    ratio on an idle and on a loaded machine, every time. It tracks the time: on the demo's eight
    models the ratio of counts was within 2.5 % of the ratio of CPU times (benchmarks/gate_latency.py)."""
    matrix = _timing_matrix(spec, holdout)
    if len(matrix) == 0:
        return 0.0
    leaves = np.asarray(booster.predict(matrix, pred_leaf=True, num_threads=1), dtype=np.int64).reshape(len(matrix), -1)
    depths = _leaf_depths(booster)
    walked = sum(depths[tree][leaves[:, tree]] for tree in range(leaves.shape[1]))
    return float(np.mean(walked)) + leaves.shape[1]


def _leaf_depths(booster) -> list[np.ndarray]:
    """Per tree, the depth of each leaf (by leaf index): the splits a row tests on its way there."""
    out = []
    for tree in booster.dump_model()["tree_info"]:
        depth: dict[int, int] = {}
        stack = [(tree["tree_structure"], 0)]
        while stack:
            node, level = stack.pop()
            if "split_index" in node:
                stack += [(node["left_child"], level + 1), (node["right_child"], level + 1)]
            else:  # a leaf; a single-leaf tree has no leaf_index
                depth[node.get("leaf_index", 0)] = level
        out.append(np.array([depth[i] for i in range(len(depth))], dtype=np.int64))
    return out


def timed_pair(champion: tuple, challenger: tuple, holdout: pa.Table, rounds: int = LATENCY_ROUNDS) -> tuple[float, float]:
    """(champion, challenger) seconds to score ``timed_rows(holdout)`` rows on one thread, each a
    ``(booster, spec)``: the minimum of ``rounds`` CPU-time measurements, taken in turns.

    Measured so that the ratio is a property of the two models, not of the machine's load: CPU time
    leaves out the time other processes hold the core; taking turns puts both models under the same
    conditions (a busy sibling hyper-thread, a slower clock), which a ratio cancels; the minimum drops
    the rounds an interrupt or a cold cache lengthened. Only the time per row (``latency_floor_us``)
    comes from it: the gate's ratio is counted (:func:`scoring_work`)."""
    matrices = [_timing_matrix(spec, holdout) for _, spec in (champion, challenger)]
    if any(len(m) == 0 for m in matrices):
        return 0.0, 0.0
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, (booster, _) in enumerate((champion, challenger)):
            best[i] = min(best[i], _cpu_seconds(booster, matrices[i]))
    return best[0], best[1]


def gate(candidate: Candidate, champion: registry.LoadedModel, config: JobConfig) -> evaluate.GateDecision:
    """Champion and challenger on the challenger's holdout rows: the same rows for both."""
    holdout = candidate.split.holdout
    missing = [name for name in champion.spec.features if name not in holdout.column_names]
    if missing:  # the source lost a column the champion needs: only a person can weigh the two
        return evaluate.undecided(config.promotion, f"champion v{champion.version} cannot be scored on the holdout: the source "
                                  f"no longer has {', '.join(missing)}; promote challenger v{candidate.version} by hand "
                                  f"(`batchml models promote {config.job} {candidate.version}`)")
    classes = candidate.trained.classes
    if classes != champion.manifest.get("classes"):  # class i must mean the same class to both models
        return evaluate.undecided(config.promotion, f"champion v{champion.version} predicts classes {champion.manifest.get('classes')} "
                                  f"but challenger v{candidate.version} predicts {classes}, so the gate cannot compare them; "
                                  f"promote it by hand (`batchml models promote {config.job} {candidate.version}`)")
    y = labels(holdout, config, classes)
    p_champion = predict(champion.booster, holdout, champion.spec)
    champion_model, challenger_model = (champion.booster, champion.spec), (candidate.trained.booster, candidate.trained.spec)
    # the ratio from counted work (load cannot move it); the time per row, for latency_floor_us, from CPU time
    work = (scoring_work(*champion_model, holdout), scoring_work(*challenger_model, holdout))
    champion_seconds, challenger_seconds = timed_pair(champion_model, challenger_model, holdout)
    return evaluate.decide(y, p_champion, candidate.holdout_scores, config.promotion, champion_seconds, challenger_seconds,
                           seed=config.training.seed, timed_rows=timed_rows(holdout), work=work,
                           objective=objective_of(config.label.objective))
