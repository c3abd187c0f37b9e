"""What nightly runs, backfills, drift runs, ``batchml try`` and the Dask engine share: the
training pull, the features a pull adds for the champion, drift tallies and profiles, the
crash-test pauses and the cut-off check."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
from pyarrow import ipc

from batchml.config import JobConfig
from batchml.data.extract import PullResult, training_filter
from batchml.data.features import FeatureSpec, categorical_values, numeric_values
from batchml.errors import ConfigError
from batchml.models import registry, retrain
from batchml.models.objectives import objective_of
from batchml.monitoring import drift
from batchml.storage.source import odd_labels, pull

log = logging.getLogger("batchml")


def checkpoint(step: str) -> None:
    """Crash-test aid: with ``BATCHML_PAUSE_AT=<step>`` the run announces itself and waits there,
    so a test can ``kill -9`` it at a known point (after extract / train / score, inside commit)."""
    if os.environ.get("BATCHML_PAUSE_AT") == step:
        print(f"batchml: paused at {step} (pid {os.getpid()})", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("BATCHML_PAUSE_SECONDS", "60")))


FUTURE_TOLERANCE = timedelta(minutes=1)


def refuse_future_cutoff(as_of: datetime, what: str) -> None:
    """A cut-off after now would move the watermark past rows that have not landed yet: once they
    land they would be before it, and never pulled."""
    now = registry.utcnow()
    if as_of > now + FUTURE_TOLERANCE:
        raise ConfigError(f"{what} {as_of:%Y-%m-%d %H:%M} UTC is in the future (now {now:%Y-%m-%d %H:%M} UTC); "
                          f"rows landing before it later would never be scored: use a past cut-off, or none for now")



def pull_training_rows(con, config: JobConfig, pull_config: JobConfig, root: Path, as_of: datetime, path: Path,
                       columns: dict[str, str] | None = None, warn=log.warning) -> PullResult:
    """The labeled rows a challenger trained at ``as_of`` learns from (its holdout included) into run file
    ``path``. ``pull_config`` is ``config`` with the champion's features added (:func:`with_model_features`):
    the holdout must hold the champion's columns too, for the gate. Used by nightly runs and ``batchml try``."""
    pulled = pull(con, pull_config, root, training_filter(config, as_of), path, columns=columns)
    warn_odd_labels(con, config, root, as_of, warn)
    if pulled.by_rule:  # every labeled row of the window trains or judges, unless the contract rejects it
        reasons = ", ".join(f"{rule}: {n}" for rule, n in sorted(pulled.by_rule.items()))
        warn(f"{sum(pulled.by_rule.values())} of {pulled.rows} labeled row(s) in the training window left out of "
             f"training and holdout ({reasons}); see batchml.models.drop_reasons")
    return pulled


def warn_odd_labels(con, config: JobConfig, root: Path, as_of: datetime, warn=log.warning) -> None:
    """Warn about the training window's labels the objective cannot read (left out as unlabeled)."""
    odd, values = odd_labels(con, config, root, training_filter(config, as_of, labeled_only=False))
    if odd:
        warn(objective_of(config.label.objective).odd_labels_message(odd, values, config.label.column))


def feature_arrays(batch: pa.RecordBatch, profile: drift.ReferenceProfile) -> dict:
    """The batch's columns of the features ``profile`` holds, for the drift accumulator."""
    return {
        "numeric": {n: numeric_values(batch, n) for n in profile.numeric},
        "categorical": {n: categorical_values(batch, n) for n in profile.categorical},
    }


def tallied_and_kept(batches: Iterator[pa.RecordBatch], tally: drift.CurrentAccumulator | None,
                     profile: drift.ReferenceProfile | None, kept: Path | None) -> Iterator[pa.RecordBatch]:
    """``batches`` passed on, each tallied for drift (when ``tally``) and written to the run file
    ``kept`` (when given) on the way: the pull's one pass, on either engine."""
    writer = None
    try:
        for batch in batches:
            if tally is not None:
                tally.update(**feature_arrays(batch, profile))
            if kept is not None:
                writer = writer or ipc.new_file(str(kept), batch.schema)
                writer.write_batch(batch)
            yield batch
    finally:
        if writer is not None:
            writer.close()


def with_model_features(config: JobConfig, spec: FeatureSpec, leave_out: tuple[str, ...] | list[str] = ()) -> JobConfig:
    """``config`` pulling a model's features too (except ``leave_out``); a name the config already
    has keeps the config's kind. Training still reads the features of ``config`` itself."""
    extra = [name for name in spec.features if name not in config.features.all and name not in leave_out]
    features = config.features.model_copy(update={
        "numeric": [*config.features.numeric, *(n for n in extra if n in spec.numeric)],
        "categorical": [*config.features.categorical, *(n for n in extra if n in spec.categorical)],
    })
    return config.model_copy(update={"features": features})


def load_profile(model: registry.LoadedModel) -> drift.ReferenceProfile:
    """The model's drift reference, parsed once per loaded model (drift and scoring both need it)."""
    if "profile" not in model.cache:
        model.cache["profile"] = drift.ReferenceProfile.from_dict(json.loads((model.path / retrain.PROFILE_FILE).read_text()))
    return model.cache["profile"]


def prediction_drift(profile: drift.ReferenceProfile, accumulator: drift.CurrentAccumulator, config: JobConfig) -> list[dict]:
    """The drift row of the model's own scores (current vs its holdout scores)."""
    report = drift.compute_drift(profile, accumulator, config.drift)
    return [row for row in report.to_rows() if row["kind"] == "prediction"]
