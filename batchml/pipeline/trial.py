"""``batchml try``: a proposed job config put through the nightly gate against the champion, writing nothing.

A team that changes ``configs/<job>.yaml`` or its feature SQL learns on the pull request, not after a
night, whether the change would pass: the candidate is trained as a nightly run trains a challenger
(the same training pull, ``retrain.train_candidate``) and judged by the same gate
(``retrain.gate``: paired bootstrap, guards, speed test) on the same holdout rows as the champion.
Beside the gate: the champion's golden set is re-scored (a changed LightGBM or encoding shows), the
candidate's artifact is reloaded and its own golden set re-scored, and the candidate's training rows
are compared with the champion's drift reference.

Nothing is written where the job lives: the warehouse is opened read-only and only for the pull
(so a try runs beside analysts; a nightly run wanting the file waits for those seconds, and a try
finding a run's write lock waits up to ``BATCHML_LOCK_TIMEOUT``, then says who holds it), no job
lock is taken, and the candidate is trained into a temporary folder that is deleted afterwards.

The default cut-off is the job's watermark, i.e. the data the last nightly run saw: the same
warehouse gives the same answer however often CI reruns it. Example::

    trial = try_config(Project.open(), "vuln_risk", Path("configs/candidates/vuln_risk.better.yaml"))
    trial.would_promote, trial.reason   # (False, 'roc_auc improvement -0.0555 is below min_improvement 0.002')
    to_dict(trial)                      # the JSON form (README: "Trying a config change")
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from batchml.monitoring import drift
from batchml.models import evaluate
from batchml.models import registry
from batchml.storage import model_rows
from batchml.models import retrain
from batchml.storage import runlog
from batchml.config import JobConfig, load_job_config, with_model_classes
from batchml.errors import BatchMLError, ConfigError, ModelError
from batchml.data.extract import read_run_file
from batchml.storage.source import describe_source, set_cutoff
from batchml.pipeline.shared import feature_arrays, load_profile, prediction_drift, pull_training_rows
from batchml.pipeline.shared import refuse_future_cutoff, with_model_features
from batchml.project import Project
from batchml.models.objectives import objective_of
from batchml.models.train import labels
from batchml.storage.warehouse import table_exists

log = logging.getLogger("batchml")

SCHEMA = "batchml.try/1"  # the JSON output's version: fields are only ever added under it


@dataclass
class GoldenCheck:
    """A model's golden set re-scored: how many rows, the largest score difference, or what failed."""

    rows: int = 0
    max_difference: float | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None


@dataclass
class Trial:
    """What ``batchml try`` found: the gate's decision and everything around it."""

    job: str
    config_path: str
    as_of: datetime
    config: JobConfig
    candidate: retrain.Candidate
    candidate_version: int  # the version a nightly run would register it as
    champion: dict | None  # the champion's registry row
    champion_trees: int | None
    decision: evaluate.GateDecision | None  # None: no champion to compare with
    added: list[str]
    removed: list[str]
    golden_champion: GoldenCheck | None
    golden_candidate: GoldenCheck
    drift: list[dict] = field(default_factory=list)  # rows as batchml.drift holds them
    dataset_drift: bool = False
    seconds: float = 0.0

    @property
    def would_promote(self) -> bool:
        """Whether a nightly run would crown the candidate: the gate promotes it, or there is no champion."""
        return self.decision is None or self.decision.outcome == "promoted"

    @property
    def outcome(self) -> str:
        return "no_champion" if self.decision is None else self.decision.outcome

    @property
    def reason(self) -> str:
        if self.decision is None:
            return "no champion yet: a nightly run would make the candidate the first champion"
        return self.decision.reason

    @property
    def exit_code(self) -> int:
        return 0 if self.would_promote else 4


def try_config(project: Project, job: str, config_path: Path | None = None, as_of: datetime | None = None) -> Trial:
    """Train a candidate from ``config_path`` (default: ``configs/<job>.yaml`` as it is now) at ``as_of``
    (default: the job's watermark, else now) and put it through the nightly gate against the champion."""
    started = time.perf_counter()
    config = load_job_config(config_path, job) if config_path else project.job(job)
    if as_of is not None:
        refuse_future_cutoff(as_of, "--as-of")
    with tempfile.TemporaryDirectory(prefix=f"batchml-try-{job}-") as scratch:
        trial = _train_and_judge(project, config, str(config_path or f"configs/{job}.yaml"), as_of, Path(scratch))
    trial.seconds = time.perf_counter() - started
    log.info("%s: try took %.1f s: %s", job, trial.seconds, trial.reason)
    return trial


def _train_and_judge(project: Project, config: JobConfig, shown_path: str, as_of: datetime | None, scratch: Path) -> Trial:
    champion_row, champion, as_of, version, config = _pull(project, config, as_of, scratch / "train.arrow")
    candidate = retrain.train_candidate(config, read_run_file(scratch / "train.arrow"), scratch / "models", version, as_of)
    added, removed = retrain.feature_change(config, champion.spec) if champion else ([], [])
    trial = Trial(
        job=config.job, config_path=shown_path, as_of=as_of, config=config, candidate=candidate, candidate_version=version,
        champion=champion_row, champion_trees=champion.booster.num_trees() if champion else None,
        decision=retrain.gate(candidate, champion, config) if champion else None, added=added, removed=removed,
        golden_champion=_golden(champion) if champion else None,
        golden_candidate=_golden_of_candidate(candidate, config.job, as_of),
    )
    if champion is not None:
        trial.drift, trial.dataset_drift = _drift_against(champion, candidate, config)
    return trial


def _pull(project: Project, config: JobConfig, as_of: datetime | None,
          path: Path) -> tuple[dict | None, registry.LoadedModel | None, datetime, int, JobConfig]:
    """The champion and the training rows a nightly run at ``as_of`` would train on, read-only (and the
    config as a run reads it: a multiclass job keeps its champion's classes)."""
    with project.connect(read_only=True) as con:
        has_registry = table_exists(con, "batchml.models")
        champion_row = model_rows.champion(con, config.job) if has_registry else None
        watermark = runlog.watermark(con, config.job) if table_exists(con, "batchml.watermarks") else None
        as_of = as_of or watermark or registry.utcnow()
        _refuse_before_champion(champion_row, as_of)
        champion = registry.load(champion_row) if champion_row else None
        if champion is not None:
            config = with_model_classes(config, champion.manifest.get("classes"))
        set_cutoff(con, as_of)  # feature SQL sees the source as of the cut-off, as in a run
        columns = describe_source(con, config, project.root)
        pull_config = config
        if champion is not None:  # the holdout must feed the champion too (what the source still has)
            pull_config = with_model_features(config, champion.spec, leave_out=[n for n in champion.spec.features if n not in columns])
        pull_training_rows(con, config, pull_config, project.root, as_of, path, columns=columns,
                           warn=lambda message: log.warning("%s: %s", config.job, message))
        version = model_rows.next_version(con, config.job) if has_registry else 1
    return champion_row, champion, as_of, version, config


def _refuse_before_champion(champion: dict | None, as_of: datetime) -> None:
    """As a nightly run refuses to: a holdout before the champion's cut-off may hold rows it learnt from."""
    if champion is not None and as_of < champion["created_at"]:
        raise ConfigError(f"--as-of {as_of:%Y-%m-%d %H:%M} is before champion v{champion['version']}'s own cut-off "
                          f"({champion['created_at']:%Y-%m-%d %H:%M}): its holdout would overlap what the champion learnt "
                          f"from; use a later cut-off, or none (the job's watermark)")


def _golden(model: registry.LoadedModel) -> GoldenCheck:
    try:
        rows, worst = retrain.check_golden(model)
    except BatchMLError as exc:
        return GoldenCheck(error=str(exc))
    return GoldenCheck(rows, worst)


def _golden_of_candidate(candidate: retrain.Candidate, job: str, as_of: datetime) -> GoldenCheck:
    """The candidate's artifact loaded back as a run would load it (hashes verified) and its golden set
    re-scored: the files a promotion would register reproduce the scores the gate judged."""
    try:
        return _golden(registry.load(candidate.registry_row(job, "try", as_of, registry.CHALLENGER)))
    except ModelError as exc:
        return GoldenCheck(error=str(exc))


def _drift_against(champion: registry.LoadedModel, candidate: retrain.Candidate, config: JobConfig) -> tuple[list[dict], bool]:
    """The candidate's training rows against the champion's drift reference (the features both have),
    and its holdout scores against the champion's: how far apart the two models' worlds are."""
    spec = candidate.trained.spec
    reference = load_profile(champion)
    features = reference.restricted(spec.numeric, spec.categorical)
    features = drift.ReferenceProfile(features.numeric, features.categorical)  # scores are compared apart
    accumulator = drift.CurrentAccumulator(features)
    for rows in (candidate.split.fit, candidate.split.validation):
        if rows.num_rows:
            accumulator.update(**feature_arrays(rows, features))
    report = drift.compute_drift(features, accumulator, config.drift)
    scores = drift.ReferenceProfile({}, {}, reference.score)
    score_accumulator = drift.CurrentAccumulator(scores)
    if len(candidate.holdout_scores):
        score_accumulator.update({}, {}, scores=retrain.score_of(candidate.trained.objective, candidate.holdout_scores))
    return report.to_rows() + prediction_drift(scores, score_accumulator, config), report.dataset_drift


# --- the figures, for every output format --------------------------------------------------------


def to_dict(trial: Trial) -> dict:
    """The stable JSON form (``SCHEMA``; documented in README "Trying a config change")."""
    decision, candidate, champion = trial.decision, trial.candidate, trial.champion
    split = candidate.split
    y = labels(split.holdout, trial.config, candidate.trained.classes)
    binary = trial.config.label.objective == "binary"
    return {
        "schema": SCHEMA,
        "job": trial.job,
        "config": trial.config_path,
        "as_of": trial.as_of.isoformat(),
        "would_promote": trial.would_promote,
        "exit_code": trial.exit_code,
        "outcome": trial.outcome,
        "reason": trial.reason,
        "champion": None if champion is None else {
            "version": champion["version"], "trained_as_of": champion["created_at"].isoformat(),
            "trees": trial.champion_trees,
        },
        "candidate": {
            "version": trial.candidate_version, "trees": candidate.trained.best_iteration,
            "features": candidate.trained.spec.features,
            "train_start": candidate.trained.train_start.isoformat(), "train_end": candidate.trained.train_end.isoformat(),
        },
        "features": {"added": trial.added, "removed": trial.removed},
        "rows": {
            "train": candidate.trained.train_rows, "fit": split.fit.num_rows, "validation": split.validation.num_rows,
            "holdout": split.holdout.num_rows, "holdout_positives": int(np.sum(y == 1)) if binary else None,
        },
        "metric": trial.config.promotion.metric,
        "metrics": _metrics(trial),
        "bootstrap": None if decision is None or decision.bootstrap is None else {
            "difference": decision.bootstrap.diff, "low": decision.bootstrap.low, "high": decision.bootstrap.high,
            "resamples": decision.bootstrap.resamples,
        },
        "conditions": conditions(trial),
        "speed": {
            "latency_ratio": None if decision is None else decision.latency_ratio,
            "max_latency_ratio": trial.config.promotion.max_latency_ratio,
            "latency_floor_us": trial.config.promotion.latency_floor_us,
        },
        "golden_set": {
            "champion": None if trial.golden_champion is None else _golden_dict(trial.golden_champion),
            "candidate": _golden_dict(trial.golden_candidate),
        },
        "drift": {
            "dataset_drift": trial.dataset_drift,
            "drifted_features": sum(1 for r in trial.drift if r["kind"] == "feature" and r["drifted"]),
            "features": sum(1 for r in trial.drift if r["kind"] == "feature" and r["error"] is None),
            "rows": [{k: r[k] for k in ("feature", "kind", "method", "statistic", "threshold", "drifted", "error")} for r in trial.drift],
        },
        "seconds": round(trial.seconds, 3),
    }


def _golden_dict(check: GoldenCheck) -> dict:
    return {"passed": check.passed, "rows": check.rows, "max_difference": check.max_difference, "error": check.error}


def _metrics(trial: Trial) -> list[dict]:
    """Per metric: champion, candidate and the candidate's improvement (positive = better)."""
    if trial.decision is None:
        holdout = trial.candidate.metrics.get("holdout") or {}
        return [{"name": name, "champion": None, "candidate": value, "improvement": None} for name, value in holdout.items()]
    ours, theirs = trial.decision.metrics_challenger, trial.decision.metrics_champion
    return [{"name": name, "champion": theirs[name], "candidate": ours[name],
             "improvement": objective_of(trial.config.label.objective).improvement(name, theirs[name], ours[name])}
            for name in ours if name in theirs]


def conditions(trial: Trial) -> list[dict]:
    """Every gate condition in the gate's order, passed or not, with the figures it was judged on."""
    decision = trial.decision
    if decision is None:
        return []
    return [{"name": name, "passed": passed, "detail": _detail(trial, name)} for name, passed in decision.checks.items()]


def _detail(trial: Trial, name: str) -> str:
    decision, promotion = trial.decision, trial.config.promotion
    boot, holdout = decision.bootstrap, trial.candidate.split.holdout
    if name == "min_holdout_rows":
        return f"{holdout.num_rows} holdout rows, at least {promotion.min_holdout_rows} needed"
    if name == "comparable":  # regression, multiclass
        return f"{holdout.num_rows} labeled holdout rows"
    if name == "both_classes":
        positives = int(np.sum(labels(holdout) == 1))
        return f"{positives} positive and {holdout.num_rows - positives} negative holdout rows"
    if name == "min_improvement" and boot is not None:
        return f"{decision.metric} {boot.diff:+.4f}, at least {promotion.min_improvement:g} needed"
    if name == "significance" and boot is not None:
        return f"bootstrap interval [{boot.low:+.4f}, {boot.high:+.4f}]: its lower bound must be above 0"
    if name.startswith("guard_"):
        metric = name.removeprefix("guard_")
        ours, theirs = decision.metrics_challenger.get(metric), decision.metrics_champion.get(metric)
        if ours is not None and theirs is not None:
            worse = -objective_of(trial.config.label.objective).improvement(metric, theirs, ours)
            change = f"worse by {worse:.4f}" if worse > 0 else f"better by {-worse:.4f}"
            return f"{metric} {theirs:.4f} -> {ours:.4f} ({change}), may worsen by {promotion.guard[metric]:g}"
    if name == "latency":
        ratio = "n/a" if decision.latency_ratio is None else f"{decision.latency_ratio:.2f}x"
        floor = f", or under {promotion.latency_floor_us:g} µs a row" if promotion.latency_floor_us else ""
        return f"candidate scoring takes {ratio} the champion's time, at most {promotion.max_latency_ratio:g}x{floor}"
    return decision.reason if not decision.checks.get(name, True) else ""
