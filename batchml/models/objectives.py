"""What each ``label.objective`` means, in one place: binary, regression, multiclass.

An :class:`Objective` says, for its kind of label,

- how the label column reads in SQL (``label_sql``) and which values count as labeled (``labeled_sql``);
- LightGBM's objective (``lightgbm_params``) and the training targets (``targets``);
- how LightGBM's output becomes what is stored (``outputs``): ``score`` (binary: P(positive);
  regression: the predicted value; multiclass: the probability of the predicted class) and, for
  multiclass, the predicted class and one probability per class;
- its metrics (name -> higher is better), computed on a holdout or on arrived labels, and the
  paired bootstrap of the gate (the same resampling as ``evaluate.paired_bootstrap``: every metric
  is a function of per-row resample counts, so 1000 resamples are a few matrix operations);
- whether performance can be estimated before labels arrive (CBPE: binary only).

Pure numpy: no IO. Imported by ``config`` for the metric names, so nothing heavy at the top.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

BINARY_METRICS = {"roc_auc": True, "average_precision": True, "ks": True, "log_loss": False, "brier": False, "ece": False}
REGRESSION_METRICS = {"rmse": False, "mae": False, "r2": True}
MULTICLASS_METRICS = {"multi_logloss": False, "accuracy": True, "macro_f1": True}
LOG_LOSS_EPS = 1e-15


@dataclass(frozen=True)
class Outputs:
    """What a batch of predictions becomes in the scores table."""

    score: np.ndarray  # (rows,) float64
    predicted: np.ndarray | None = None  # multiclass: (rows,) index into the model's classes
    probabilities: np.ndarray | None = None  # multiclass: (rows, classes)


class Objective:
    """The common part; each objective below overrides what differs."""

    name: str
    lightgbm: str
    metrics: dict[str, bool]
    default_metric: str
    default_guard: dict[str, float]
    estimates_performance = False  # CBPE needs calibrated probabilities of one outcome: binary only
    check_name = "comparable"  # the gate's check that the holdout can compare models
    label_types = "a number"

    # --- SQL of the label column (``column`` is quoted already) ---------------------------------

    def label_sql(self, column: str) -> str:
        return f"try_cast({column} AS DOUBLE)"

    def labeled_sql(self, column: str, classes: list[str] | None) -> str:
        return f"isfinite(try_cast({column} AS DOUBLE))"

    def label_type_ok(self, duckdb_type: str, number_or_boolean: bool) -> bool:
        """Whether the label column's DuckDB type suits the objective (a wrong one is refused up front)."""
        return number_or_boolean and duckdb_type != "BOOLEAN"

    def odd_value_sql(self, column: str) -> str:
        """The value of a present-but-unlabeled label, as listed in warnings."""
        return f"CAST({column} AS VARCHAR)"

    def odd_labels_message(self, count: int, values: list, column: str) -> str:
        shown = ", ".join(str(v) for v in values)
        return (f"{count} row(s) in the training window have a {column} (label.column) that is not a finite number "
                f"({shown}) and were left out as unlabeled; fix or drop those labels")

    # --- training ---------------------------------------------------------------------------------

    def lightgbm_params(self, classes: list[str] | None) -> dict:
        return {"objective": self.lightgbm}

    def classes(self, labels: np.ndarray, configured: list[str] | None) -> list[str] | None:
        return None

    def targets(self, labels: np.ndarray, classes: list[str] | None) -> np.ndarray:
        return np.asarray(labels, dtype=np.float64)

    def trainable_problem(self, y: np.ndarray) -> str | None:
        """Why the fit rows cannot train a model (ends "training rows for JOB ..."), or None."""
        return "have a single label value; wait for varied labels" if len(np.unique(y)) < 2 else None

    # --- predictions ------------------------------------------------------------------------------

    def outputs(self, raw: np.ndarray) -> Outputs:
        return Outputs(np.asarray(raw, dtype=np.float64).reshape(len(raw)))

    def score(self, raw: np.ndarray) -> np.ndarray:
        return self.outputs(raw).score

    # --- metrics ----------------------------------------------------------------------------------

    def improvement(self, metric: str, champion, challenger):
        """How much better the challenger's figure is: positive means better (elementwise too)."""
        delta = challenger - champion
        return delta if self.metrics[metric] else -delta

    def problem(self, y: np.ndarray) -> str | None:
        """Why labels ``y`` cannot compare models (a message), or None."""
        return "there are no labels" if len(y) == 0 else None

    def paired(self, y, p_champion, p_challenger):
        y = np.asarray(y)
        p_champion, p_challenger = np.asarray(p_champion, dtype=np.float64), np.asarray(p_challenger, dtype=np.float64)
        if len(p_champion) != len(y) or len(p_challenger) != len(y):
            raise ValueError(f"y has {len(y)} rows but the predictions have {len(p_champion)} and {len(p_challenger)}")
        return y, p_champion, p_challenger

    # --- realised performance: arrived labels and what the scores table stored for their rows ----

    stored_prediction = "score"  # the scores table's column the metrics read

    def realised(self, metric: str, labels: list, stored: list) -> float | None:
        """``metric`` of the stored predictions against the arrived labels; None where undefined."""
        y, p = np.asarray(labels, dtype=np.float64), np.asarray(stored, dtype=np.float64)
        if len(y) == 0 or self.problem(y):
            return None
        return self.compute_metrics(y, p)[metric]


class Binary(Objective):
    """0/1 labels; ``score`` is P(positive). Every figure is ``batchml.models.evaluate``'s, as before."""

    name, lightgbm, metrics = "binary", "binary", BINARY_METRICS
    default_metric, default_guard = "roc_auc", {"log_loss": 0.01}
    estimates_performance = True
    check_name = "both_classes"
    label_types = "a number or BOOLEAN (1/true = positive)"

    def label_sql(self, column: str) -> str:
        return f"try_cast({column} AS INTEGER)"

    def labeled_sql(self, column: str, classes: list[str] | None) -> str:
        return f"try_cast({column} AS DOUBLE) IN (0, 1)"

    def label_type_ok(self, duckdb_type: str, number_or_boolean: bool) -> bool:
        return number_or_boolean

    def odd_value_sql(self, column: str) -> str:
        return f"try_cast({column} AS DOUBLE)"

    def odd_labels_message(self, count: int, values: list, column: str) -> str:
        return (f"{count} row(s) in the training window have a {column} (label.column) other than 0/1 "
                f"({', '.join(f'{v:g}' for v in values)}) and were left out as unlabeled; map the label to 0/1")

    def trainable_problem(self, y: np.ndarray) -> str | None:
        return "hold a single class; wait for both outcomes to be labeled" if len(np.unique(y)) < 2 else None

    def problem(self, y: np.ndarray) -> str | None:
        from batchml.models.evaluate import _one_class

        return _one_class(np.asarray(y))

    def paired(self, y, p_champion, p_challenger):
        from batchml.models.evaluate import _paired

        return _paired(y, p_champion, p_challenger)

    def compute_metrics(self, y, p) -> dict[str, float]:
        from batchml.models.evaluate import compute_metrics

        return compute_metrics(y, p)

    def paired_bootstrap(self, y, p_champion, p_challenger, metric: str, resamples: int = 1000, seed: int = 42,
                         confidence: float = 0.95):
        from batchml.models.evaluate import paired_bootstrap

        return paired_bootstrap(y, p_champion, p_challenger, metric, resamples, seed, confidence)


class Resampled(Objective, ABC):
    """Metrics and the gate's paired bootstrap from one function, ``_weighted``, evaluated on resample
    counts: regression and multiclass. Binary keeps ``evaluate``'s own (the binary gate as before)."""

    def compute_metrics(self, y, p) -> dict[str, float]:
        y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
        counts = np.ones((1, len(y)), dtype=np.int64)
        return {name: float(self._weighted(name, y, p, counts)[0]) for name in self.metrics}

    def paired_bootstrap(self, y, p_champion, p_challenger, metric: str, resamples: int = 1000, seed: int = 42,
                         confidence: float = 0.95):
        """As ``evaluate.paired_bootstrap``: the same resamples (counts) for both models."""
        from batchml.models.evaluate import _CHUNK_CELLS, BootstrapResult, _resample_counts

        y, p_champion, p_challenger = self.paired(y, p_champion, p_challenger)
        problem = self.problem(y)
        if problem:
            raise ValueError(f"cannot bootstrap {metric}: {problem}")
        rng = np.random.default_rng(seed)
        chunk = max(1, _CHUNK_CELLS // len(y))
        diffs = []
        for start in range(0, resamples, chunk):
            counts = _resample_counts(rng, len(y), min(chunk, resamples - start))
            diff = self.improvement(metric, self._weighted(metric, y, p_champion, counts),
                                    self._weighted(metric, y, p_challenger, counts))
            diffs.append(diff[np.isfinite(diff)])  # e.g. R² of a resample whose labels are all one value
        diffs = np.concatenate(diffs)
        if diffs.size == 0:
            raise ValueError(f"cannot bootstrap {metric}: no resample gave a defined value")
        tail = (1 - confidence) / 2
        low, high = np.quantile(diffs, [tail, 1 - tail])
        full = self.compute_metrics(y, p_champion)[metric], self.compute_metrics(y, p_challenger)[metric]
        return BootstrapResult(float(self.improvement(metric, *full)), float(low), float(high), int(diffs.size))

    @abstractmethod
    def _weighted(self, metric: str, y: np.ndarray, p: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """``metric`` once per row of ``counts`` (rows: resamples, columns: how often each row was drawn)."""


class Regression(Resampled):
    """A numeric, finite label; ``score`` is the predicted value (LightGBM ``regression``: L2)."""

    name, lightgbm, metrics = "regression", "regression", REGRESSION_METRICS
    default_metric, default_guard = "rmse", {}

    def problem(self, y: np.ndarray) -> str | None:
        if len(y) == 0:
            return "there are no labels"
        return f"the {len(y)} labels are all {y[0]:g} (R² is undefined)" if np.all(y == y[0]) else None

    def _weighted(self, metric: str, y: np.ndarray, p: np.ndarray, counts: np.ndarray) -> np.ndarray:
        total = counts.sum(axis=1).astype(np.float64)
        error = p - y
        if metric == "rmse":
            return np.sqrt(counts @ error**2 / total)
        if metric == "mae":
            return counts @ np.abs(error) / total
        spread = counts @ y**2 - (counts @ y) ** 2 / total  # weighted sum of squares around the weighted mean
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(spread > 0, 1 - (counts @ error**2) / spread, np.nan)


class Multiclass(Resampled):
    """One of a set of classes (``label.classes``, default: those of the first training window,
    sorted); LightGBM ``multiclass`` (softmax). ``score`` is the probability of the predicted
    class; the model's class ``i`` is ``classes[i]`` (``model.json``)."""

    name, lightgbm, metrics = "multiclass", "multiclass", MULTICLASS_METRICS
    default_metric, default_guard = "multi_logloss", {"accuracy": 0.01}
    label_types = "a string, integer or BOOLEAN (one value per class)"

    def label_sql(self, column: str) -> str:
        return f"CAST({column} AS VARCHAR)"

    def label_type_ok(self, duckdb_type: str, number_or_boolean: bool) -> bool:
        return number_or_boolean or duckdb_type.startswith(("VARCHAR", "ENUM"))

    def labeled_sql(self, column: str, classes: list[str] | None) -> str:
        if not classes:  # the first training takes every class it sees
            return f"{column} IS NOT NULL"
        listed = ", ".join("'" + c.replace("'", "''") + "'" for c in classes)
        return f"CAST({column} AS VARCHAR) IN ({listed})"

    def odd_labels_message(self, count: int, values: list, column: str) -> str:
        shown = ", ".join(repr(v) for v in values)
        return (f"{count} row(s) in the training window have a {column} (label.column) that is not one of the job's "
                f"classes ({shown}) and were left out as unlabeled; map them to a class or add them to label.classes "
                f"(a new class needs a new model: see README \"Objectives\")")

    def lightgbm_params(self, classes: list[str] | None) -> dict:
        return {"objective": "multiclass", "num_class": len(classes or [])}

    def classes(self, labels: np.ndarray, configured: list[str] | None) -> list[str]:
        return list(configured) if configured else sorted({str(v) for v in labels if v is not None})

    def targets(self, labels: np.ndarray, classes: list[str] | None) -> np.ndarray:
        index = {name: i for i, name in enumerate(classes or [])}
        return np.array([index.get(v, -1) for v in labels], dtype=np.float64)

    def trainable_problem(self, y: np.ndarray) -> str | None:
        return "hold a single class; wait for at least two classes to be labeled" if len(np.unique(y)) < 2 else None

    def outputs(self, raw: np.ndarray) -> Outputs:
        probabilities = np.asarray(raw, dtype=np.float64).reshape(len(raw), -1)
        predicted = np.argmax(probabilities, axis=1)
        return Outputs(probabilities[np.arange(len(probabilities)), predicted], predicted, probabilities)

    def paired(self, y, p_champion, p_challenger):
        y = np.asarray(y, dtype=np.int64)
        p_champion, p_challenger = (np.asarray(p, dtype=np.float64).reshape(len(p), -1) for p in (p_champion, p_challenger))
        if len(p_champion) != len(y) or len(p_challenger) != len(y):
            raise ValueError(f"y has {len(y)} rows but the predictions have {len(p_champion)} and {len(p_challenger)}")
        if len(y) and p_champion.shape[1] != p_challenger.shape[1]:
            raise ValueError(f"the models predict {p_champion.shape[1]} and {p_challenger.shape[1]} classes")
        return y, p_champion, p_challenger

    stored_prediction = "probabilities"

    def realised(self, metric: str, labels: list, stored: list) -> float | None:
        """From the stored ``probabilities`` maps (class -> probability, the model's class order);
        a label that is none of the model's classes is left out."""
        if not stored:
            return None
        classes = list(dict(stored[0]).keys())
        index = {name: i for i, name in enumerate(classes)}
        kept = [(index[label], [dict(m)[c] for c in classes]) for label, m in zip(labels, stored) if label in index and m]
        if not kept:
            return None
        y = np.array([k for k, _ in kept], dtype=np.int64)
        return self.compute_metrics(y, np.array([p for _, p in kept], dtype=np.float64))[metric]

    def compute_metrics(self, y, p) -> dict[str, float]:
        y, p, _ = self.paired(y, p, p)
        counts = np.ones((1, len(y)), dtype=np.int64)
        return {name: float(self._weighted(name, y, p, counts)[0]) for name in self.metrics}

    def _weighted(self, metric: str, y: np.ndarray, p: np.ndarray, counts: np.ndarray) -> np.ndarray:
        total = counts.sum(axis=1).astype(np.float64)
        rows = np.arange(len(y))
        if metric == "multi_logloss":
            return -(counts @ np.log(np.clip(p[rows, y], LOG_LOSS_EPS, 1.0))) / total
        predicted = np.argmax(p, axis=1)
        if metric == "accuracy":
            return counts @ (predicted == y) / total
        # macro-F1 over the classes present among the labels or the predictions (as scikit-learn)
        actual, guessed = np.eye(p.shape[1])[y], np.eye(p.shape[1])[predicted]
        true_pos, n_actual, n_guessed = counts @ (actual * guessed), counts @ actual, counts @ guessed
        present = (n_actual + n_guessed) > 0
        f1 = np.divide(2 * true_pos, n_actual + n_guessed, out=np.zeros_like(true_pos), where=present)
        return (f1 * present).sum(axis=1) / present.sum(axis=1)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (Binary(), Regression(), Multiclass())}
ALL_METRICS = tuple(name for o in OBJECTIVES.values() for name in o.metrics)


def objective_of(name: str | None) -> Objective:
    """The objective named by a config or a ``model.json`` (models from before objectives: binary)."""
    return OBJECTIVES[name or "binary"]


def objective_for(metric: str) -> str:
    """The objective whose metric ``metric`` is."""
    return next(o.name for o in OBJECTIVES.values() if metric in o.metrics)
