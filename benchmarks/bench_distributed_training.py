"""Distributed training benchmark: the same training window fitted locally and on a 2-worker Dask cluster.

Setup (outside every timing): ``rows`` labeled findings x 35 features (``common.make_rows``), pulled
through batchml's extract and split by time as a nightly run splits them (fit / validation tail /
holdout, ``training.holdout_days``). Then ``models.train.fit`` (this process) and
``cluster.training.fit_on_cluster`` (``training.engine: dask``) on a fresh
``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``, with and without forced bins.
Peak RSS: this process's ``VmHWM`` reset (``/proc/self/clear_refs``) before the local fit; each
worker's ``VmHWM`` read from the worker after its fit (fresh workers per cluster).

    python benchmarks/bench_distributed_training.py [--rows N]     # prints the Markdown section
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import DATA, Sizes


def labeled_split(rows: int):
    import pyarrow.compute as pc

    from batchml.data.extract import LABEL
    from batchml.models.train import split_by_time

    config_dict = common.job_config(Sizes.of(True))
    config_dict["training"]["params"] = {"num_leaves": 63, "learning_rate": 0.1, "num_boost_round": 100, "early_stopping_rounds": 20}
    config_dict["training"]["holdout_days"] = 3
    config = common.load_config(config_dict)
    table = common.normalised_rows(config_dict, common.make_rows(rows, seed=5, start=common.T0), DATA / "dtrain")
    table = table.filter(pc.is_valid(table.column(LABEL)))
    return config, split_by_time(table, config)


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def holdout_auc(trained, split) -> float:
    from batchml.models import evaluate
    from batchml.models.train import labels, predict

    return evaluate.compute_metrics(labels(split.holdout), predict(trained.booster, split.holdout, trained.spec))["roc_auc"]


def on_cluster(config, split, workers: int) -> tuple:
    import distributed

    from batchml.cluster.training import fit_on_cluster

    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        started = time.perf_counter()
        trained = fit_on_cluster(split, config, client)
        seconds = time.perf_counter() - started
        rss = sorted(client.run(common.peak_rss_mb).values())
    return trained, seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=400_000)
    args = parser.parse_args()
    from batchml.models.train import fit

    config, split = labeled_split(args.rows)
    reset_peak()
    started = time.perf_counter()
    local = fit(split, config)
    local_seconds, local_rss = time.perf_counter() - started, common.peak_rss_mb()
    lines = [f"## Distributed training: {split.fit.num_rows:,} fit + {split.validation.num_rows:,} validation rows x 35 features, "
             f"holdout {split.holdout.num_rows:,}",
             "", "| engine | seconds | trees kept | peak RSS (MiB) | holdout ROC AUC |", "|---|---:|---:|---|---:|",
             f"| local (this process) | {local_seconds:.1f} | {local.best_iteration} | {local_rss:.0f} (process, incl. the data) | {holdout_auc(local, split):.5f} |"]
    for forced in (False, True):
        training = config.training.model_copy(update={"forced_bins": forced})
        trained, seconds, rss = on_cluster(config.model_copy(update={"training": training}), split, 2)
        lines.append(f"| dask, 2 workers{', forced bins' if forced else ''} | {seconds:.1f} | {trained.best_iteration} | "
                     f"{' / '.join(f'{r:.0f}' for r in rss)} (per worker) | {holdout_auc(trained, split):.5f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
