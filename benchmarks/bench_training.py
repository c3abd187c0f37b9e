"""Training benchmark: what batchml adds around ``lightgbm.train``.

Same rows (35 features, pulled through batchml's extract into the normalised schema), same split
and same parameters (the shipped default: 31 leaves, learning rate 0.05, up to 400 rounds, early
stopping after 40) on both sides:

- **batchml**: ``retrain.train_candidate`` — split by time, fit (level lists, matrices,
  ``lightgbm.train`` with early stopping), holdout metrics, drift profile, golden set, artifact.
- **bare LightGBM**: ``lightgbm.train`` on the fit/validation matrices, built before the clock
  starts (how a LightGBM user holding numpy arrays would call it).

    python benchmarks/bench_training.py [--quick]     # prints the Markdown section
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import DATA, T0, TRAIN_START, Sizes, ratio

PARAMS = {"num_leaves": 31, "learning_rate": 0.05, "num_boost_round": 400, "early_stopping_rounds": 40}
REPEATS = 2


def _bare(config, split) -> tuple[float, int]:
    """Seconds and rounds of ``lightgbm.train`` with batchml's parameters on prepared matrices."""
    import lightgbm as lgb

    from batchml.config import thread_count
    from batchml.data.features import fit_spec, to_matrix
    from batchml.models.train import labels, lightgbm_params

    spec = fit_spec(split.fit, config.features.numeric, config.features.categorical)
    params, rounds, early = lightgbm_params(config)
    params.setdefault("num_threads", thread_count(split.fit.num_rows))
    x_fit, y_fit = to_matrix(split.fit, spec), labels(split.fit)
    x_valid, y_valid = to_matrix(split.validation, spec), labels(split.validation)
    started = time.perf_counter()
    train_set = lgb.Dataset(x_fit, y_fit, feature_name=spec.features, categorical_feature=spec.categorical_indices)
    valid_set = lgb.Dataset(x_valid, y_valid, reference=train_set, categorical_feature=spec.categorical_indices)
    booster = lgb.train(params, train_set, num_boost_round=rounds, valid_sets=[valid_set], callbacks=[lgb.early_stopping(early, verbose=False)])
    return time.perf_counter() - started, booster.best_iteration or booster.current_iteration()


def _batchml(config, table, folder: Path) -> dict:
    from batchml.models import retrain

    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    candidate = retrain.train_candidate(config, table, folder, 1, T0)
    total = time.perf_counter() - started
    return {"total": total, "fit": candidate.trained.seconds, "rounds": candidate.trained.best_iteration}


def measure(quick: bool = False) -> dict:
    from batchml.models.train import split_by_time

    sizes = Sizes.of(quick)
    config_dict = common.job_config(sizes)
    config_dict["training"]["params"] = dict(PARAMS)
    config = common.load_config(config_dict)
    scratch = DATA / "training"
    table = common.normalised_rows(config_dict, common.make_rows(sizes.training_rows, 11, TRAIN_START), scratch / "pull")
    split = split_by_time(table, config)
    ours = min((_batchml(config, table, scratch / "models") for _ in range(REPEATS)), key=lambda r: r["total"])
    bare = min((_bare(config, split) for _ in range(REPEATS)), key=lambda r: r[0])
    shutil.rmtree(scratch, ignore_errors=True)
    return {"rows": table.num_rows, "fit_rows": split.fit.num_rows, "validation_rows": split.validation.num_rows,
            "holdout_rows": split.holdout.num_rows, "batchml": ours, "bare": bare[0], "bare_rounds": bare[1]}


def markdown(f: dict) -> str:
    ours, bare = f["batchml"], f["bare"]
    return "\n".join([
        f"## 4. Training overhead: {f['rows']:,} labeled rows × 35 features",
        "",
        (f"Split by time: {f['fit_rows']:,} fit, {f['validation_rows']:,} validation (early stopping), {f['holdout_rows']:,} holdout. "
        f"Parameters {json.dumps(PARAMS)}; best of {REPEATS} runs each."),
        "",
        "| what | seconds | vs bare lightgbm.train | rounds |",
        "|---|---:|---:|---:|",
        f"| bare `lightgbm.train` (matrices prepared before the clock) | {bare:.2f} | 1.00× | {f['bare_rounds']} |",
        f"| batchml `train.fit` (level lists + matrices + lightgbm.train) | {ours['fit']:.2f} | {ratio(ours['fit'], bare)} | {ours['rounds']} |",
        f"| batchml `retrain.train_candidate` (fit + metrics, profile, golden set, artifact) | {ours['total']:.2f} | {ratio(ours['total'], bare)} | |",
        "",
        f"- Overhead of batchml around the fit: {ours['total'] - ours['fit']:.2f} s; of `train.fit` over bare LightGBM: {ours['fit'] - bare:+.2f} s.",
        "",
        f"<!-- figures: {json.dumps(f, default=str)} -->",
        "",
    ])


def run(quick: bool = False) -> str:
    return markdown(measure(quick))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(run(parser.parse_args().quick))


if __name__ == "__main__":
    main()
