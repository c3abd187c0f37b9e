"""Distributed training benchmark: the same training window fitted locally and on a 2-worker Dask cluster.

Setup (outside every timing): ``rows`` labeled findings x 35 features (``common.make_rows``), pulled
through batchml's extract and split by time as a nightly run splits them (fit / validation tail /
holdout, ``training.holdout_days``). Then ``models.train.fit`` (this process) and
``cluster.training.fit_on_cluster`` (``training.engine: dask``) on a fresh
``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``, with and without forced bins.
Peak RSS: this process's ``VmHWM`` reset (``/proc/self/clear_refs``) before the local fit; each
worker's ``VmHWM`` read from the worker after its fit (fresh workers per cluster).

    python benchmarks/bench_distributed_training.py [--rows N]     # prints the Markdown section

In ``make bench`` (section 6) the window is ``BATCHML_BENCH_DTRAIN_ROWS`` rows (default 1,000,000;
the issue's size is 5,000,000; --quick 200,000); ``BATCHML_BENCH_FORCED_BINS=1`` adds a run with forced bins.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import DATA, Sizes


LAKE_FILES = 8  # the source as Parquet for the run whose workers read the window
ROW_GROUP = 100_000


def labeled_split(rows: int):
    """The config, the local split of the window, the Parquet copy of the source and a cut-off after every label."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from batchml.data.extract import LABEL
    from batchml.models.train import split_by_time

    config_dict = common.job_config(Sizes.of(True))
    config_dict["training"]["params"] = {"num_leaves": 63, "learning_rate": 0.1, "num_boost_round": 100, "early_stopping_rounds": 20}
    config_dict["training"]["holdout_days"] = 3
    config = common.load_config(config_dict)
    source = common.make_rows(rows, seed=5, start=common.T0).sort_by("ingested_at")
    lake = DATA / f"dtrain-lake-{rows}"
    if not (lake / f"part-{LAKE_FILES - 1}.parquet").exists():
        lake.mkdir(parents=True, exist_ok=True)
        for i, cut in enumerate(np.array_split(np.arange(source.num_rows), LAKE_FILES)):
            pq.write_table(source.slice(int(cut[0]), len(cut)), lake / f"part-{i}.parquet", row_group_size=ROW_GROUP)
    as_of = max(pc.max(source.column("label_at")).as_py(), pc.max(source.column("ingested_at")).as_py()) + dt.timedelta(seconds=1)
    table = common.normalised_rows(config_dict, source, DATA / "dtrain")
    table = table.filter(pc.is_valid(table.column(LABEL)))
    lake_dict = {**config_dict, "source": {**config_dict["source"], "table": None, "parquet": str(lake / "*.parquet")}}
    lake_dict["source"].pop("table")
    return config, split_by_time(table, config), common.load_config(lake_dict), as_of


def window_on_workers(config, as_of, workers: int) -> tuple:
    """The window read by the workers from Parquet, split, trained where its rows are and profiled
    from the parts (``batchml.cluster.window``): seconds for all of it, per-worker peak RSS."""
    import shutil

    import distributed

    from batchml.cluster import window
    from batchml.storage.source import describe_source
    from batchml.storage.warehouse import memory_connection

    scratch = DATA / "dtrain-workers"
    shutil.rmtree(scratch, ignore_errors=True)
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        gather = window.gatherer(client, None)
        started = time.perf_counter()
        con = memory_connection("2GB", threads=1)
        try:
            columns = describe_source(con, config, scratch)
            resident = window.pull_window(client, gather, config, config, scratch, scratch / "lake", "bench", as_of, columns, "1GB", con)
        finally:
            con.close()
        pulled = time.perf_counter() - started
        trained = window.fit_resident(client, gather, resident, config)
        from batchml.models.train import predict

        window.reference_profile(client, gather, resident, config, predict(trained.booster, resident.split.holdout, trained.spec))
        seconds = time.perf_counter() - started
        rss = sorted(client.run(common.peak_rss_mb).values())
    shutil.rmtree(scratch, ignore_errors=True)
    return trained, resident.split, seconds, pulled, rss


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


def measure(quick: bool, rows: int | None = None) -> dict:
    from batchml.models.train import fit

    rows = rows or int(os.environ.get("BATCHML_BENCH_DTRAIN_ROWS", 200_000 if quick else 1_000_000))
    config, split, lake_config, as_of = labeled_split(rows)
    figures: dict = {"rows": rows, "fit_rows": split.fit.num_rows, "validation_rows": split.validation.num_rows,
                     "holdout_rows": split.holdout.num_rows, "threads": os.environ.get("BATCHML_THREADS", "all cores"),
                     "load_before": common.load_average(), "runs": []}
    reset_peak()
    started = time.perf_counter()
    local = fit(split, config)
    figures["runs"].append({"engine": "local (this process)", "seconds": time.perf_counter() - started, "trees": local.best_iteration,
                            "rss": [common.peak_rss_mb()], "auc": holdout_auc(local, split)})
    for forced in (False, True) if os.environ.get("BATCHML_BENCH_FORCED_BINS") == "1" else (False,):
        training = config.training.model_copy(update={"forced_bins": forced})
        trained, seconds, rss = on_cluster(config.model_copy(update={"training": training}), split, 2)
        figures["runs"].append({"engine": f"dask, 2 workers{', forced bins' if forced else ''}", "seconds": seconds,
                                "trees": trained.best_iteration, "rss": rss, "auc": holdout_auc(trained, split)})
    trained, held, seconds, pulled, rss = window_on_workers(lake_config, as_of, 2)
    same = held.holdout.num_rows == split.holdout.num_rows
    figures["runs"].append({"engine": f"dask, 2 workers, window read by the workers ({pulled:.1f} s of it pull + split; "
                                      f"incl. the merged profile){'' if same else ' (holdout rows differ!)'}",
                            "seconds": seconds, "trees": trained.best_iteration, "rss": rss, "auc": holdout_auc(trained, held)})
    figures["load_after"] = common.load_average()
    return figures


def markdown(figures: dict) -> str:
    runs = figures["runs"]
    local = runs[0]
    lines = [f"## 6. Distributed training: {figures['fit_rows']:,} fit + {figures['validation_rows']:,} validation rows x 35 "
             f"features, holdout {figures['holdout_rows']:,}", "",
             f"The same window ({figures['rows']:,} generated rows, split by time) fitted in this process and on a fresh "
             f"2-worker LocalCluster (threads: {figures['threads']}). Load average (1, 5, 15 min) before: "
             f"{figures['load_before']}, after: {figures['load_after']}.", "",
             "| engine | seconds | vs local | trees kept | peak RSS (MiB) | holdout ROC AUC | AUC − local |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for run in runs:
        rss = f"{run['rss'][0]:.0f} (process, incl. the data)" if run is local else f"{' / '.join(f'{r:.0f}' for r in run['rss'])} (per worker)"
        lines.append(f"| {run['engine']} | {run['seconds']:.1f} | {run['seconds'] / local['seconds']:.2f}x | {run['trees']} | {rss} | "
                     f"{run['auc']:.5f} | {run['auc'] - local['auc']:+.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=400_000)
    args = parser.parse_args()
    print(markdown(measure(False, args.rows)))


if __name__ == "__main__":
    main()
