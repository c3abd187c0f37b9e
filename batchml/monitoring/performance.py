"""How the champion does once labels arrive (realised) and before they do (estimated).

Realised: labels whose ``available_at`` falls since the previous run are joined to the score each
entity had at the time (the newest nightly or replay score as of this run: ``storage.labels``), and the primary metric
is computed per event day and model version, plus an overall row (``event_day`` NULL) for the
current champion — that figure drives the ``decay`` retrain trigger.

Estimated: before labels arrive, confidence-based performance estimation (as NannyML's CBPE) from
the champion's own probabilities, recorded only when its holdout calibration error is small enough
for the estimate to mean anything.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np

from batchml.models import evaluate
from batchml.config import JobConfig
from batchml.models.objectives import objective_of
from batchml.models.registry import LoadedModel

CBPE_MAX_ECE = 0.05  # above this holdout calibration error, estimated performance is not trusted


def metric_rows(metric: str, rows: list[tuple], objective: str = "binary") -> list[dict]:
    """(label, score, event day, model version) tuples -> one row per day and version, plus one
    overall row per version (``event_day`` None). ``objective``: the job's ``label.objective``
    (regression and multiclass figures come from ``objectives``; ``positives`` is then null)."""
    if not rows:
        return []
    if objective != "binary":
        return _objective_rows(objective_of(objective), metric, rows)
    y = np.array([r[0] for r in rows], dtype=np.int8)
    p = np.array([r[1] for r in rows], dtype=np.float64)
    days = np.array([r[2] for r in rows], dtype=object)
    versions = np.array([r[3] for r in rows])
    out = []
    for day in sorted(set(days)):
        for version in sorted(set(versions[days == day])):
            mask = (days == day) & (versions == version)
            out.append(_row(metric, y[mask], p[mask], day, int(version)))
    for version in sorted(set(versions)):
        mask = versions == version
        out.append(_row(metric, y[mask], p[mask], None, int(version)))
    return out


def _objective_rows(objective, metric: str, rows: list[tuple]) -> list[dict]:
    days = [r[2] for r in rows]
    versions = [r[3] for r in rows]
    groups = [(day, version) for day in sorted(set(days)) for version in sorted({v for d, v in zip(days, versions) if d == day})]
    groups += [(None, version) for version in sorted(set(versions))]
    out = []
    for day, version in groups:
        chosen = [r for r in rows if r[3] == version and (day is None or r[2] == day)]
        value = objective.realised(metric, [r[0] for r in chosen], [r[1] for r in chosen])
        out.append({"model_version": int(version), "event_day": day, "metric": metric, "value": value, "n": len(chosen),
                    "positives": None, "estimated": False})
    return out


def overall(rows: list[dict], version: int | None) -> float | None:
    """The champion's realised metric over every label that arrived (None if not computable)."""
    for row in rows:
        if row["event_day"] is None and row["model_version"] == version and not row["estimated"]:
            return row["value"]
    return None


def _row(metric: str, y: np.ndarray, p: np.ndarray, day, version: int) -> dict:
    value = None
    if len(y) and len(np.unique(y)) == 2:  # a metric of one class is undefined, not zero
        value = float(evaluate.compute_metrics(y, p)[metric])
    return {"model_version": version, "event_day": day, "metric": metric, "value": value, "n": int(len(y)),
            "positives": int(y.sum()), "estimated": False}


def estimated(config: JobConfig, champion: LoadedModel, scores: np.ndarray, as_of: datetime) -> list[dict]:
    """Today's estimated metric from the champion's probabilities (CBPE), if it is calibrated enough."""
    metric = config.promotion.metric
    if not objective_of(config.label.objective).estimates_performance:
        return []  # CBPE needs calibrated probabilities of one outcome: no sound estimate for values or several classes
    holdout = champion.manifest.get("metrics", {}).get("holdout", {})
    if len(scores) < 100 or holdout.get("ece", 1.0) > CBPE_MAX_ECE:
        return []
    try:
        value = evaluate.estimate_metric(metric, scores)
    except ValueError:  # e.g. every probability 0: nothing to rank
        return []
    return [{"model_version": champion.version, "event_day": as_of.date(), "metric": metric, "value": value,
             "n": int(len(scores)), "positives": None, "estimated": True}]
