"""What a job's YAML may say (``configs/<job>.yaml``): one pydantic model per section, validated on load.

Every model forbids unknown keys, so a typo is an error rather than a silently ignored setting.
Secrets (SMTP) never live here: they come from the environment (:mod:`batchml.config.settings`).
"""

from __future__ import annotations

import json
import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from batchml.errors import did_you_mean
from batchml.models.objectives import ALL_METRICS, objective_for, objective_of


IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
JOB_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
DEFAULT_MEMORY_LIMIT = "256MB"


def check_identifier(name: str, what: str = "identifier") -> str:
    """Return ``name`` if it is a plain SQL identifier (letters, digits, underscore), else raise."""
    if not isinstance(name, str) or not IDENTIFIER.fullmatch(name):  # fullmatch: `$` lets a trailing newline through
        raise ValueError(f"{what} {name!r} must be letters, digits and underscores, starting with a letter")
    return name


def check_qualified(name: str, what: str = "table") -> str:
    """Return ``schema.table`` or ``table`` if every part is a plain identifier."""
    parts = name.split(".") if isinstance(name, str) else [name]
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"{what} {name!r} must be 'table' or 'schema.table'")
    for part in parts:
        check_identifier(part, what)
    return name


# batchml's own tables (runs, models, quarantine, ...): no job reads or writes them by name
BATCHML_SCHEMA = "batchml"


def outside_batchml(name: str, what: str) -> str:
    """``name`` unless it is in the ``batchml`` schema (DuckDB names are case-insensitive)."""
    if "." in name and name.split(".")[0].lower() == BATCHML_SCHEMA:
        raise ValueError(f"{name} is in the {BATCHML_SCHEMA} schema, which holds batchml's own tables; "
                         f"use another schema, e.g. scores.<job> for scores or raw.<table> for a source")
    return name


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(Strict):
    """Where new rows come from and which columns drive incremental pulls."""

    table: str | None = Field(None, description="A DuckDB table or view in the warehouse, e.g. raw.vuln_findings.")
    parquet: str | None = Field(None, description="A Parquet path or glob, relative to the project directory.")
    entity_id: str = Field(description="Column identifying a record; scores are keyed by it.")
    event_time: str = Field(description="When the record happened (drives training windows and backfills).")
    watermark: str = Field(description="A timestamp that increases as rows land; drives incremental pulls.")
    watermark_partition: str | None = Field(None, description="Hive partition key of source.parquet (day=YYYY-MM-DD/ folders) holding the UTC date of each row's watermark: a night reads only the folders of its days.")

    @field_validator("table")
    @classmethod
    def _table(cls, v: str | None) -> str | None:
        return None if v is None else outside_batchml(check_qualified(v, "source.table"), "source.table")

    @field_validator("entity_id", "event_time", "watermark", "watermark_partition")
    @classmethod
    def _column(cls, v: str | None) -> str | None:
        return None if v is None else check_identifier(v, "column")

    @model_validator(mode="after")
    def _one_source(self) -> SourceConfig:
        if (self.table is None) == (self.parquet is None):
            raise ValueError("give exactly one of source.table or source.parquet")
        if self.watermark_partition and self.parquet is None:
            raise ValueError("source.watermark_partition names a hive partition key of source.parquet files; a table has none")
        return self


class FeaturesConfig(Strict):
    """Model inputs. Numeric features are fed as float64; categoricals are encoded by the model's level list."""

    numeric: list[str] = Field(default_factory=list, description="Numeric feature columns.")
    categorical: list[str] = Field(default_factory=list, description="Categorical feature columns (strings).")
    sql: str | None = Field(
        None,
        description="Optional SELECT (file path relative to the project) deriving features from a relation named `source`.",
    )

    @field_validator("numeric", "categorical")
    @classmethod
    def _columns(cls, v: list[str]) -> list[str]:
        for name in v:
            check_identifier(name, "feature")
        if len(set(v)) != len(v):
            raise ValueError("feature names must be unique")
        return v

    @model_validator(mode="after")
    def _some(self) -> FeaturesConfig:
        if not self.numeric and not self.categorical:
            raise ValueError("list at least one numeric or categorical feature")
        if set(self.numeric) & set(self.categorical):
            raise ValueError(f"features both numeric and categorical: {sorted(set(self.numeric) & set(self.categorical))}")
        return self

    @property
    def all(self) -> list[str]:
        """Model input columns in model order: numeric first, then categorical."""
        return [*self.numeric, *self.categorical]


class LabelConfig(Strict):
    """The target and when it became known (training only ever sees labels known before the cut-off)."""

    column: str = Field(description="Label column: 0/1 or boolean (binary), a finite number (regression), a class (multiclass).")
    available_at: str = Field(description="Timestamp column: when the label became known.")
    objective: Literal["binary", "regression", "multiclass"] = Field(
        "binary", description="What the model predicts: binary (P(label = 1)), regression (the value), multiclass (one of "
        "label.classes). Sets LightGBM's objective, the metrics and what the scores table holds (README \"Objectives\").")
    classes: list[str] | None = Field(
        None, description="multiclass: the classes (label values as text, e.g. \"fraud\" or \"2\"); null: those of the "
        "first training window, sorted, kept by every later model. A label outside them is left out as unlabeled, with a warning.")

    @field_validator("column", "available_at")
    @classmethod
    def _column(cls, v: str) -> str:
        return check_identifier(v, "column")

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (len(v) < 2 or len(set(v)) != len(v) or not all(v)):
            raise ValueError(f"label.classes must list at least two distinct, non-empty classes, got {v}")
        return v

    @model_validator(mode="after")
    def _classes_are_multiclass(self) -> LabelConfig:
        if self.classes is not None and self.objective != "multiclass":
            raise ValueError(f"label.classes is for label.objective multiclass, not {self.objective}; remove it or set the objective")
        return self


class ValidationConfig(Strict):
    """The data contract each extracted row must meet (violators are quarantined with a reason)."""

    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict, description="Inclusive [low, high] per numeric feature.")
    max_null_fraction: dict[str, float] = Field(default_factory=dict, description="Largest allowed share of nulls per feature.")
    max_quarantine_fraction: float = Field(0.05, ge=0, le=1, description="A batch with a larger quarantined share is rejected (exit 3).")

    @field_validator("ranges")
    @classmethod
    def _ranges(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for name, (low, high) in v.items():
            check_identifier(name, "validation.ranges key")
            if not (math.isfinite(low) and math.isfinite(high)):  # leave a side open with a wide finite bound
                raise ValueError(f"range for {name} must have finite bounds, not [{low}, {high}]; use e.g. [0, 1e300]")
            if low > high:
                raise ValueError(f"range for {name} has low {low} > high {high}")
        return v

    @field_validator("max_null_fraction")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        for name, share in v.items():
            check_identifier(name, "validation.max_null_fraction key")
            if not 0 <= share <= 1:
                raise ValueError(f"max_null_fraction for {name} must be within [0, 1], got {share}")
        return v


# drift rows that are not features but take a drift.thresholds override (see batchml.drift)
DRIFT_ROWS = ("__score__", "__multivariate__")
MIN_DRIFT_ROWS = 200  # measured: benchmarks/drift_noise.py, README "Drift"


class DriftConfig(Strict):
    """How drift is measured against the champion's reference profile."""

    numeric_method: Literal["psi", "ks", "wasserstein", "jensen_shannon"] = Field("psi", description="Method for numeric features.")
    categorical_method: Literal["chi2", "psi", "jensen_shannon"] = Field("psi", description="Method for categorical features.")
    psi_threshold: float = Field(0.2, gt=0, description="PSI at or above this is drift.")
    p_value: float = Field(0.01, gt=0, lt=1, description="ks/chi2: a p-value below this is drift.")
    wasserstein_threshold: float = Field(0.1, gt=0, description="Wasserstein distance / reference std at or above this is drift.")
    jensen_shannon_threshold: float = Field(0.1, gt=0, description="Jensen-Shannon distance (base 2) at or above this is drift.")
    thresholds: dict[str, float] = Field(default_factory=dict, description="Per-feature threshold overrides.")
    dataset_drift_share: float = Field(0.3, gt=0, le=1, description="Drifted share of features that counts as dataset drift.")
    multivariate: bool = Field(False, description="Also train a domain classifier (reference vs current) and report its AUROC.")
    min_rows: int = Field(MIN_DRIFT_ROWS, ge=1, description="A batch with fewer valid rows is measured and stored, but nothing "
                          "is flagged: no dataset drift, no retrain, no mail (below this size the default suite false-alarms "
                          "on stable data; see README \"Drift\").")


class RetrainConfig(Strict):
    """When a challenger is trained."""

    every_days: int | None = Field(7, ge=1, description="Retrain when the job's last training (whatever its outcome) is this many days old (null: never by age).")
    on_drift: bool = Field(True, description="Retrain when dataset drift is detected.")
    min_new_labels: int | None = Field(500, ge=1, description="Retrain when this many labels arrived since the last training.")
    max_decay: float | None = Field(0.05, gt=0, description="Retrain when the champion's realised metric falls this far below its holdout figure.")


# The LightGBM parameters a job may set: how the trees grow, never where LightGBM runs or what it
# reads and writes. Left out on purpose: network and distributed settings (tree_learner,
# num_machines, machines, local_listen_port, time_out: they make a run bind a port and wait for
# peers while it holds the job's lock), file inputs and outputs (input_model, output_model,
# forcedsplits_filename, ...), threads (BATCHML_THREADS), the objective and metric (batchml's
# own), the seed (training.seed) and devices (gpu_*). Canonical names and their common aliases.
TRAINING_PARAMS = frozenset({
    "num_boost_round", "early_stopping_rounds",
    "boosting", "boosting_type", "learning_rate", "eta", "num_leaves", "max_leaves", "max_depth",
    "min_data_in_leaf", "min_child_samples", "min_sum_hessian_in_leaf", "min_child_weight",
    "bagging_fraction", "subsample", "bagging_freq", "subsample_freq", "pos_bagging_fraction", "neg_bagging_fraction",
    "feature_fraction", "colsample_bytree", "feature_fraction_bynode", "colsample_bynode", "extra_trees",
    "lambda_l1", "reg_alpha", "lambda_l2", "reg_lambda", "min_gain_to_split", "min_split_gain",
    "drop_rate", "max_drop", "skip_drop", "xgboost_dart_mode", "uniform_drop", "top_rate", "other_rate",
    "path_smooth", "max_bin", "min_data_in_bin", "max_cat_to_onehot", "max_cat_threshold", "cat_l2", "cat_smooth",
    "min_data_per_group", "is_unbalance", "scale_pos_weight", "linear_tree", "linear_lambda", "use_missing",
    "zero_as_missing", "max_delta_step",
})


class TrainingConfig(Strict):
    """How models are trained (point-in-time: only labels known before the cut-off)."""

    window_days: int = Field(180, ge=1, description="Train on labeled rows whose event time is within this many days of the cut-off.")
    holdout_days: int = Field(14, ge=1, description="The most recent days of labeled rows, never trained on; used to compare models.")
    validation_fraction: float = Field(0.15, gt=0, lt=0.5, description="Latest share of the training window used for early stopping.")
    min_train_rows: int = Field(200, ge=10, description="Fewer labeled rows than this: no model is trained.")
    seed: int = Field(42, description="Random seed for training and bootstrap.")
    params: dict[str, float | int | str | bool] = Field(
        default_factory=lambda: {"num_leaves": 31, "learning_rate": 0.05, "num_boost_round": 400, "early_stopping_rounds": 40},
        description="LightGBM parameters; num_boost_round and early_stopping_rounds are taken out for lightgbm.train.",
    )
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    engine: Literal["local", "dask"] = Field("local", description="local: LightGBM in this process; dask: lightgbm.dask (data-parallel) "
                                             "on the execution cluster (execution.scheduler / --cluster / BATCHML_DASK_SCHEDULER; "
                                             "none given: a LocalCluster here). See README \"Scaling out\".")
    time_out_minutes: int = Field(2, ge=1, description="engine dask: LightGBM's network time_out; a training worker that "
                                  "leaves is detected at once, a silent one within this; the fit is retried once, then the run fails.")
    forced_bins: bool = Field(False, description="engine dask: every worker bins the numeric features on the same edges "
                              "(quantiles of a sample of the fit rows, LightGBM forcedbins_filename) instead of its own rows' "
                              "edges. Off by default: measured no closer to local training (README \"Scaling out\").")

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict) -> dict:
        refused = sorted(set(v) - TRAINING_PARAMS)
        if refused:
            raise ValueError(f"{', '.join(refused)}: not a parameter a job may set (allowed: the tree-growing parameters "
                             f"listed in README.md, e.g. num_leaves, learning_rate, min_data_in_leaf); remove it")
        return v


METRIC_NAMES = ALL_METRICS  # of every objective; a job may name only its own objective's (JobConfig._objective)


class PromotionConfig(Strict):
    """The gate a challenger must pass to replace the champion."""

    metric: Literal["roc_auc", "average_precision", "log_loss", "brier", "ece", "ks", "rmse", "mae", "r2", "multi_logloss", "accuracy",
                    "macro_f1"] = Field("roc_auc", description="Primary metric, of the job's objective (binary: roc_auc, "
                                        "average_precision, ks, log_loss, brier, ece; regression: rmse, mae, r2; multiclass: "
                                        "multi_logloss, accuracy, macro_f1). Default: roc_auc, rmse, multi_logloss.")
    min_improvement: float = Field(0.002, ge=0, description="Smallest improvement of the primary metric that promotes.")
    require_significance: bool = Field(True, description="Also require the bootstrap interval's lower bound to be above 0.")
    bootstrap_resamples: int = Field(1000, ge=100, description="Paired bootstrap resamples of the holdout.")
    min_holdout_rows: int = Field(200, ge=1, description="Fewer holdout rows than this: no decision.")
    guard: dict[str, float] = Field(default_factory=lambda: {"log_loss": 0.01}, description="Max allowed worsening of other metrics "
                                    "(of the job's objective). Default for regression: none; multiclass: {\"accuracy\": 0.01}.")
    max_latency_ratio: float = Field(1.5, gt=0, description="Challenger scoring work / champion's (tree nodes a row walks, counted on the holdout: the same on an idle or a busy machine) must not exceed this.")
    latency_floor_us: float = Field(0.0, ge=0, description="A challenger scoring a row in fewer microseconds than this (one thread) passes the latency test whatever its ratio (0: the ratio always applies). For small models, where an early-stopped champion of a few trees would keep out every larger challenger over milliseconds.")
    shadow: bool = Field(False, description="The latest challenger also scores new rows into scores.<job>_shadow.")

    @field_validator("guard")
    @classmethod
    def _guard(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(METRIC_NAMES))
        if unknown:
            raise ValueError(f"unknown guard metric {unknown}; choose from {list(METRIC_NAMES)}")
        return v


class ScoringConfig(Strict):
    """Where and how scores are written."""

    table: str | None = Field(None, description="Scores table (schema.table); default scores.<job>.")
    bands: dict[str, float] = Field(default_factory=lambda: {"high": 0.5, "medium": 0.2}, description="Band name -> lowest score in it; below all: low. "
                                    "Regression: values of the prediction, no default (no bands: risk_band is null); multiclass: "
                                    "probabilities of the predicted class, no default.")
    reasons: int = Field(3, ge=0, le=20, description="Top feature contributions kept per score; 0 turns reason codes off.")
    reason_bands: list[str] | None = Field(["high"], description="Compute reasons only for these bands (null: every band); others get null.")
    reason_method: Literal["path", "shap"] = Field("path", description="path: tree-path attributions (about a predict plus a sparse sum); shap: TreeSHAP via pred_contrib (100x a predict).")
    engine: Literal["auto", "lightgbm", "compiled"] = Field("auto", description="Predict with LightGBM or with compiled trees (lleaves).")
    batch_size: int = Field(50_000, ge=1000, description="Rows per scoring batch (memory is bounded by this, not by the run).")

    @field_validator("table")
    @classmethod
    def _table(cls, v: str | None) -> str | None:
        return None if v is None else outside_batchml(check_qualified(v, "scoring.table"), "scoring.table")

    @field_validator("bands")
    @classmethod
    def _bands(cls, v: dict[str, float]) -> dict[str, float]:
        if not all(math.isfinite(edge) for edge in v.values()):
            raise ValueError(f"band thresholds must be finite numbers, got {v}")
        if "low" in v:
            raise ValueError("'low' is the band below every threshold; name the bands with thresholds otherwise")
        return v


# one bare address: a comma, a space, a display name or a line break would put a second recipient
# (or a header) into the To line that the SMTP envelope does not have
EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")

NotifyEvent = Literal["drift", "promotion", "rejection", "failure", "always", "weekly"]


class NotifyConfig(Strict):
    """Who is mailed the run report, and when."""

    email: list[str] = Field(default_factory=list, description="Recipients.")
    on: list[NotifyEvent] = Field(default_factory=lambda: ["drift", "promotion", "rejection", "failure"], description="Events that send a mail; `weekly` also mails the job's history page after the first night of each week (in schedule.timezone).")

    @field_validator("email")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        for address in v:
            if not EMAIL.fullmatch(address):
                raise ValueError(f"{address!r} is not one mail address (user@host, no name, comma or space); "
                                 f"list each recipient as its own item")
        return v


class ScheduleConfig(Strict):
    """When `batchml schedule` runs the job."""

    cron: str = Field("0 2 * * *", description="Crontab expression: five fields (minute hour day month weekday, Sunday = 0) or @daily, @hourly, ...")
    timezone: str = Field("UTC", description="IANA time zone the cron expression is read in.")


class ExecutionConfig(Strict):
    """Where the run's pulls, checks and scoring execute (see README "Scaling out")."""

    engine: Literal["local", "dask"] = Field("local", description="local: one process on this machine; dask: the partitions on a Dask cluster.")
    scheduler: str | None = Field(None, description='Dask scheduler address, e.g. "tcp://host:8786"; null with engine dask: a LocalCluster on this machine. BATCHML_DASK_SCHEDULER and --cluster override it.')
    workers: int | None = Field(None, ge=1, description="LocalCluster worker processes (default: one per core).")


def distributed_source_problem(config: JobConfig) -> None:
    """Raise ValueError when the job cannot run on the Dask engine: its workers read the source's
    Parquet files themselves (they never open the warehouse) and split the batch by entity id, so
    a table source or feature SQL (which may aggregate over every entity) cannot be split."""
    if config.source.parquet is None:
        raise ValueError("execution.engine dask reads source.parquet on its workers (they never open the warehouse): "
                         "export the table to Parquet and set source.parquet, or use engine local")
    if config.features.sql is not None:
        raise ValueError("execution.engine dask does not run features.sql yet (it may aggregate across entities, "
                         "which the workers' partitions split): derive the features into the Parquet files, or use engine local")


class JobConfig(Strict):
    """One job: configs/<job>.yaml."""

    job: str = Field(description="Job name: lowercase letters, digits, underscores.")
    description: str = Field("", description="What the score means.")
    source: SourceConfig
    features: FeaturesConfig
    label: LabelConfig
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    @field_validator("job")
    @classmethod
    def _job(cls, v: str) -> str:
        if not JOB_NAME.fullmatch(v):
            raise ValueError(f"job name {v!r} must be lowercase letters, digits and underscores")
        return v

    @model_validator(mode="after")
    def _known_features(self) -> JobConfig:
        # a name close to a feature's is one typo on either side: only the source's columns can tell
        # which, so that case is left to describe_source (a missing column, named once)
        for section, names in unknown_feature_names(self).items():
            unknown = [name for name in names if not did_you_mean(name, self.features.all)]
            if unknown:
                raise ValueError(f"{section} names {unknown}, which are not features")
        unknown = sorted(set(self.drift.thresholds) - set(self.features.all) - set(DRIFT_ROWS))
        if unknown:
            hint = did_you_mean(unknown[0], [*self.features.all, *DRIFT_ROWS])
            raise ValueError(f"drift.thresholds names {unknown}{hint}, which are not features (nor {', '.join(DRIFT_ROWS)}); "
                             f"fix the key or add the feature")
        unknown_ranges = sorted(set(self.validation.ranges) & set(self.features.categorical))
        if unknown_ranges:
            raise ValueError(f"validation.ranges applies to numeric features only, not {unknown_ranges}")
        return self

    @model_validator(mode="after")
    def _no_leaking_features(self) -> JobConfig:
        """The label (and when it became known) would let a model learn its own answer; ids and
        times identify or order rows instead of describing them."""
        roles = {self.label.column: "label.column", self.label.available_at: "label.available_at",
                 self.source.entity_id: "source.entity_id", self.source.event_time: "source.event_time",
                 self.source.watermark: "source.watermark"}
        for name in self.features.all:
            if name in roles:
                raise ValueError(f"feature {name!r} is the job's {roles[name]}: a model must not learn from it; "
                                 f"remove it from features (derive a feature from it in features.sql if you need one)")
        return self

    @model_validator(mode="after")
    def _objective(self) -> JobConfig:
        """What the objective changes: its own default metric, guard and bands where the config names
        none, and a metric of another objective refused (its direction and meaning would be wrong)."""
        objective = objective_of(self.label.objective)
        if objective.name != "binary":
            promotion = {key: value for key, value in (("metric", objective.default_metric), ("guard", objective.default_guard))
                         if key not in self.promotion.model_fields_set}
            object.__setattr__(self, "promotion", self.promotion.model_copy(update=promotion))
            scoring = {key: value for key, value in (("bands", {}), ("reason_bands", None))
                       if key not in self.scoring.model_fields_set}
            object.__setattr__(self, "scoring", self.scoring.model_copy(update=scoring))
        choose = f"label.objective is {objective.name}: choose from {', '.join(objective.metrics)}"
        if self.promotion.metric not in objective.metrics:
            metric = self.promotion.metric
            raise ValueError(f"promotion.metric: {metric} is a {objective_for(metric)} metric but {choose}")
        for metric in self.promotion.guard:
            if metric not in objective.metrics:
                raise ValueError(f"promotion.guard: unknown guard metric {metric} (a {objective_for(metric)} metric) for {choose}")
        if objective.name != "binary" and self.training.engine == "dask":
            raise ValueError(f"label.objective {objective.name} trains on the local engine only (training.engine: local, "
                             f"the default; execution.engine: dask still scores on the cluster); Dask training is binary only")
        if objective.name != "regression":  # binary and multiclass scores are probabilities
            outside = {name: edge for name, edge in self.scoring.bands.items() if not 0 < edge <= 1}
            if outside:
                raise ValueError(f"scoring.bands: band thresholds are probabilities in (0, 1]: {outside} can never (or always) "
                                 f"be reached")
        return self

    @model_validator(mode="after")
    def _known_bands(self) -> JobConfig:
        bands = set(self.scoring.bands) | {"low"}
        unknown = sorted(set(self.scoring.reason_bands or []) - bands)
        if unknown:
            raise ValueError(f"scoring.reason_bands names {unknown}, which are not bands (bands: {sorted(bands)})")
        return self

    @model_validator(mode="after")
    def _dask_reads_parquet(self) -> JobConfig:
        if self.execution.engine == "dask":
            distributed_source_problem(self)
        return self

    @property
    def scores_table(self) -> str:
        """Fully qualified scores table, e.g. ``scores.vuln_risk``."""
        table = self.scoring.table or f"scores.{self.job}"
        return table if "." in table else f"scores.{table}"

    @property
    def band_edges(self) -> list[tuple[str, float]]:
        """Bands from the highest threshold down; a score below all of them is ``low``."""
        return sorted(self.scoring.bands.items(), key=lambda kv: -kv[1])


def unknown_feature_names(config: JobConfig) -> dict[str, list[str]]:
    """Per validation setting keyed by feature, the names in it that are not features."""
    known = set(config.features.all)
    found = {"validation.ranges": sorted(set(config.validation.ranges) - known),
             "validation.max_null_fraction": sorted(set(config.validation.max_null_fraction) - known)}
    return {section: names for section, names in found.items() if names}


def with_model_classes(config: JobConfig, classes: list[str] | None) -> JobConfig:
    """A multiclass job without ``label.classes`` keeps the classes of its first model: ``classes``
    (a model's ``model.json``) become the config's, so later trainings, realised performance and
    the unknown-class warnings use them. Any other config is returned as it is."""
    if config.label.objective != "multiclass" or config.label.classes or not classes:
        return config
    return config.model_copy(update={"label": config.label.model_copy(update={"classes": list(classes)})})


def reference_markdown() -> str:
    """The config reference table of README.md, generated from the models' field descriptions."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            key = f"{prefix}{name}"
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, key + ".")
                continue
            if info.is_required():
                default = "*required*"
            else:
                value = info.default_factory() if info.default_factory else info.default
                default = f"`{json.dumps(value, default=str)}`"
            lines.append(f"| `{key}` | {default} | {info.description or ''} |")

    walk(JobConfig, "")
    return "\n".join(lines)
