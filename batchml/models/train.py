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

import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchml.config import JobConfig, thread_count
from batchml.errors import DataError
from batchml.data.extract import EVENT_TIME, LABEL
from batchml.data.features import FeatureSpec, fit_spec, to_matrix


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


def _sorted_by_time(table: pa.Table) -> pa.Table:
    return table.sort_by([(EVENT_TIME, "ascending")])


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


def lightgbm_params(config: JobConfig) -> tuple[dict, int, int | None]:
    """LightGBM params (deterministic, seeded) and the boosting-round settings taken out of them."""
    user = dict(config.training.params)
    rounds = int(user.pop("num_boost_round", 400))
    early = user.pop("early_stopping_rounds", 40)
    params = {
        "objective": "binary",
        "verbosity": -1,
        "seed": config.training.seed,
        "deterministic": True,
        "force_col_wise": True,
        **user,
    }
    return params, rounds, (int(early) if early else None)


def labels(table: pa.Table) -> np.ndarray:
    return np.asarray(table.column(LABEL).to_numpy(zero_copy_only=False), dtype=np.float64)


def trainable_labels(split: Split, config: JobConfig) -> np.ndarray:
    """The fit rows' labels; raises when there are too few rows or a single class to train on."""
    if split.fit.num_rows < config.training.min_train_rows:
        held = f", {split.holdout.num_rows} more are held out (the last {config.training.holdout_days} days)" if split.holdout.num_rows else ""
        raise DataError(
            f"only {split.fit.num_rows} labeled rows to train {config.job} on (min_train_rows "
            f"{config.training.min_train_rows}){held}; wait for more labels or lower training.min_train_rows"
        )
    y_fit = labels(split.fit)
    if len(np.unique(y_fit)) < 2:
        raise DataError(f"training rows for {config.job} hold a single class; wait for both outcomes to be labeled")
    return y_fit


def fit(split: Split, config: JobConfig) -> TrainedModel:
    """Train on ``split.fit`` with early stopping on ``split.validation``."""
    y_fit = trainable_labels(split, config)
    started = time.perf_counter()
    spec = fit_spec(split.fit, config.features.numeric, config.features.categorical)
    params, rounds, early = lightgbm_params(config)
    params.setdefault("num_threads", thread_count(split.fit.num_rows))
    cat = spec.categorical_indices or "auto"
    train_set = lgb.Dataset(to_matrix(split.fit, spec), y_fit, feature_name=spec.features, categorical_feature=cat, free_raw_data=True)
    valid_set = lgb.Dataset(to_matrix(split.validation, spec), labels(split.validation), reference=train_set, categorical_feature=cat)
    callbacks = [lgb.early_stopping(early, verbose=False)] if early and split.validation.num_rows else []
    booster = lgb.train(params, train_set, num_boost_round=rounds, valid_sets=[valid_set], callbacks=callbacks)
    if booster.best_iteration and booster.best_iteration < booster.current_iteration():
        # keep only the trees early stopping chose, so model.txt alone reproduces every score
        booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=booster.best_iteration))
    return trained_model(booster, spec, {**params, "num_boost_round": rounds, "early_stopping_rounds": early}, split, started)


def trained_model(booster: lgb.Booster, spec: FeatureSpec, params: dict, split: Split, started: float) -> TrainedModel:
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
    )


def predict(booster: lgb.Booster, table: pa.Table, spec: FeatureSpec) -> np.ndarray:
    """Probabilities for a (small) table, e.g. the holdout."""
    if table.num_rows == 0:
        return np.empty(0)
    return booster.predict(to_matrix(table, spec), num_threads=thread_count(table.num_rows))
