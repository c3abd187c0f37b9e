"""Point-in-time training of a LightGBM model on the rows a run may see.

Splits, by event time (never at random, so nothing from the future informs the past):

    |---------------- training window (window_days) ----------------|--- holdout ---|
    |------------- fit -------------|-- validation (early stop) --|  holdout_days |

The holdout is the most recent ``holdout_days`` of labeled rows. It is never trained on and never
used for early stopping; champion and challenger are compared on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchml.models.lgbm import lgb
from batchml.config import JobConfig, thread_count
from batchml.errors import DataError
from batchml.data.extract import ENTITY, EVENT_TIME, LABEL
from batchml.data.features import FeatureSpec, fit_spec, to_matrix
from batchml.models.objectives import objective_of


@dataclass
class Split:
    fit: pa.Table
    validation: pa.Table
    holdout: pa.Table


@dataclass
class TrainedModel:
    booster: lgb.Booster
    spec: FeatureSpec
    params: dict
    train_start: datetime
    train_end: datetime
    train_rows: int
    best_iteration: int
    seconds: float
    objective: str = "binary"
    classes: list[str] | None = None  # multiclass: the booster's class i is classes[i]


def _sorted_by_time(table: pa.Table) -> pa.Table:
    """By event time, then entity id (when pulled): one order however the rows arrived, so the
    Dask engine's shares, each sorted so, give the same split and the same fit rows in order."""
    keys = [(EVENT_TIME, "ascending")] + ([(ENTITY, "ascending")] if ENTITY in table.column_names else [])
    return table.sort_by(keys)


def split_by_time(table: pa.Table, config: JobConfig) -> Split:
    """Fit / validation / holdout by event time; the holdout is the last ``holdout_days``."""
    table = _sorted_by_time(table)
    if table.num_rows == 0:
        return Split(table, table, table)
    latest = pc.max(table.column(EVENT_TIME)).as_py()
    holdout_start = latest - timedelta(days=config.training.holdout_days)
    in_holdout = pc.greater_equal(table.column(EVENT_TIME), pa.scalar(holdout_start, table.schema.field(EVENT_TIME).type))
    holdout = table.filter(in_holdout)
    rest = table.filter(pc.invert(in_holdout))
    # a young job's labeled rows may all fall in the holdout: then nothing is left to fit (fit says so)
    n_valid = min(rest.num_rows, max(1, int(rest.num_rows * config.training.validation_fraction)))
    return Split(rest.slice(0, rest.num_rows - n_valid), rest.slice(rest.num_rows - n_valid), holdout)


def lightgbm_params(config: JobConfig, classes: list[str] | None = None) -> tuple[dict, int, int | None]:
    """LightGBM params (deterministic, seeded) and the boosting-round settings taken out of them."""
    user = dict(config.training.params)
    rounds = int(user.pop("num_boost_round", 400))
    early = user.pop("early_stopping_rounds", 40)
    params = {
        **objective_of(config.label.objective).lightgbm_params(classes),
        "verbosity": -1,
        "seed": config.training.seed,
        "deterministic": True,
        "force_col_wise": True,
        **user,
    }
    return params, rounds, (int(early) if early else None)


def labels(table: pa.Table, config: JobConfig | None = None, classes: list[str] | None = None) -> np.ndarray:
    """The rows' training targets: the label (binary 0/1, regression the value) or, for multiclass,
    the index of its class in ``classes``."""
    if config is None or config.label.objective == "binary":
        return np.asarray(table.column(LABEL).to_numpy(zero_copy_only=False), dtype=np.float64)
    values = table.column(LABEL).to_numpy(zero_copy_only=False)
    return objective_of(config.label.objective).targets(values, classes)


def training_classes(split: Split, config: JobConfig) -> list[str] | None:
    """multiclass: ``label.classes`` (or, kept from the champion, its classes), else the classes of
    the whole training window, sorted. None for the other objectives."""
    window = pa.concat_tables([split.fit, split.validation, split.holdout]).column(LABEL).to_pylist()
    return objective_of(config.label.objective).classes(window, config.label.classes)


def trainable_labels(split: Split, config: JobConfig, classes: list[str] | None = None) -> np.ndarray:
    """The fit rows' labels; raises when there are too few rows or a single class to train on."""
    if split.fit.num_rows < config.training.min_train_rows:
        held = f", {split.holdout.num_rows} more are held out (the last {config.training.holdout_days} days)" if split.holdout.num_rows else ""
        raise DataError(
            f"only {split.fit.num_rows} labeled rows to train {config.job} on (min_train_rows "
            f"{config.training.min_train_rows}){held}; wait for more labels or lower training.min_train_rows"
        )
    y_fit = labels(split.fit, config, classes)
    problem = objective_of(config.label.objective).trainable_problem(y_fit)
    if problem:
        raise DataError(f"training rows for {config.job} {problem}")
    return y_fit


def fit(split: Split, config: JobConfig) -> TrainedModel:
    """Train on ``split.fit`` with early stopping on ``split.validation``."""
    classes = training_classes(split, config)
    y_fit = trainable_labels(split, config, classes)
    started = time.perf_counter()
    spec = fit_spec(split.fit, config.features.numeric, config.features.categorical)
    params, rounds, early = lightgbm_params(config, classes)
    params.setdefault("num_threads", thread_count(split.fit.num_rows))
    cat = spec.categorical_indices or "auto"
    train_set = lgb.Dataset(to_matrix(split.fit, spec), y_fit, feature_name=spec.features, categorical_feature=cat, free_raw_data=True)
    valid_set = lgb.Dataset(to_matrix(split.validation, spec), labels(split.validation, config, classes), reference=train_set, categorical_feature=cat)
    callbacks = [lgb.early_stopping(early, verbose=False)] if early and split.validation.num_rows else []
    booster = lgb.train(params, train_set, num_boost_round=rounds, valid_sets=[valid_set], callbacks=callbacks)
    if booster.best_iteration and booster.best_iteration < booster.current_iteration():
        # keep only the trees early stopping chose, so model.txt alone reproduces every score
        booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=booster.best_iteration))
    return trained_model(booster, spec, {**params, "num_boost_round": rounds, "early_stopping_rounds": early}, split, started,
                         config, classes)


def trained_model(booster: lgb.Booster, spec: FeatureSpec, params: dict, split: Split, started: float,
                  config: JobConfig | None = None, classes: list[str] | None = None) -> TrainedModel:
    """The record of a finished fit (``started``: its ``time.perf_counter()`` at the start)."""
    times = pc.min_max(pa.concat_tables([split.fit, split.validation]).column(EVENT_TIME)).as_py()
    return TrainedModel(
        booster=booster,
        spec=spec,
        params=params,
        train_start=times["min"],
        train_end=times["max"],
        train_rows=split.fit.num_rows + split.validation.num_rows,
        best_iteration=booster.current_iteration(),
        seconds=time.perf_counter() - started,
        objective=config.label.objective if config is not None else "binary",
        classes=classes,
    )


def predict(booster: lgb.Booster, table: pa.Table, spec: FeatureSpec) -> np.ndarray:
    """LightGBM's predictions for a (small) table, e.g. the holdout: probabilities (binary), values
    (regression), one probability per class (multiclass: rows x classes)."""
    if table.num_rows == 0:
        return np.empty(0)
    return booster.predict(to_matrix(table, spec), num_threads=thread_count(table.num_rows))
