"""Dask engine benchmark: the same nightly run on the local engine and on Dask with 1 and 2 workers.

Setup (outside every timing): ``rows`` new rows x 35 features as Parquet chunks (``common``), the
300-tree x 63-leaf champion registered in a fresh warehouse per run, the job reading the chunks
with ``source.parquet``. Each run is one nightly run (``run_job``; retraining off, no mail): pull
with the data contract, drift of every feature, score (compiled trees where available), commit. The
Dask runs use a fresh ``LocalCluster(n_workers=N, threads_per_worker=1, processes=True)`` started
by this process (its start is outside the timing), so each worker's peak RSS (``VmHWM``) is read
from the worker itself afterwards. Scores are compared with the local engine's, bitwise.

    python benchmarks/bench_cluster.py [--quick]     # prints the Markdown section

Sizes from the environment (``make bench`` keeps the defaults): ``BATCHML_BENCH_CLUSTER_ROWS``
(throughput runs, default 2,000,000 so that ``make bench`` stays within ~25 minutes; --quick 400,000)
and ``BATCHML_BENCH_CLUSTER_RSS_ROWS`` (comma-separated peak-RSS runs on 2 workers, default
2,000,000,8,000,000; --quick 200,000,800,000). The issue's sizes: 10000000 and 10000000,40000000.
The Parquet rows are generated in 1M-row chunks (never all in memory) and cached in ``.data``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import AS_OF, DATA, JOB, Sizes, fmt_s, ratio

LAKE = DATA / "cluster"


def sizes_of(quick: bool) -> tuple[int, tuple[int, ...]]:
    """(rows of the throughput runs, rows of the peak-RSS runs)."""
    rows, rss = (400_000, (200_000, 800_000)) if quick else (2_000_000, (2_000_000, 8_000_000))
    rows = int(os.environ.get("BATCHML_BENCH_CLUSTER_ROWS", rows))
    listed = os.environ.get("BATCHML_BENCH_CLUSTER_RSS_ROWS")
    return rows, tuple(int(n) for n in listed.split(",")) if listed else rss


def project(rows: int, sizes: Sizes, row: dict, engine: str) -> Path:
    """A fresh project whose source is the first ``rows`` rows' chunks (hard-linked, not copied)."""
    import yaml

    from batchml.storage import model_rows
    from batchml.storage.warehouse import migrate, open_connection, transaction

    root = LAKE / f"project-{engine}"
    shutil.rmtree(root, ignore_errors=True)
    landing = root / "landing"
    landing.mkdir(parents=True)
    for chunk in common.row_chunks(rows, sizes.chunk):
        os.link(chunk, landing / chunk.name)  # hard links: the job's connections may read only its own folders (a symlink leads out)
    config = common.job_config(sizes)
    config["source"] = {"parquet": "landing/*.parquet", "entity_id": "finding_id", "event_time": "found_at", "watermark": "ingested_at"}
    config["execution"] = {"engine": "dask" if engine != "local" else "local"}
    (root / "configs").mkdir()
    (root / "configs" / f"{JOB}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    con = open_connection(root / "warehouse" / "warehouse.duckdb")
    try:
        migrate(con)
        with transaction(con):
            model_rows.register(con, {k: v for k, v in row.items() if k != "built"})
            model_rows.register_libraries(con, JOB, row["version"], row.get("built", []))
            model_rows.make_champion(con, JOB, row["version"], "promoted", run_id=None, reason="benchmark champion", at=common.T0)
    finally:
        con.close()
    return root


def one_run(rows: int, sizes: Sizes, row: dict, workers: int | None) -> dict:
    """A nightly run on the local engine (``workers`` None) or on a fresh LocalCluster of ``workers``."""
    from batchml.pipeline.nightly import run_job
    from batchml.project import Project

    root = project(rows, sizes, row, "local" if workers is None else f"dask{workers}")
    proj = Project.open(root)
    if workers is None:
        started = time.perf_counter()
        run = run_job(proj, JOB, as_of=AS_OF, notify=False)
        return {"wall": time.perf_counter() - started, "score": run.timings.get("score"), "run": run, "root": root, "rss": []}
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        started = time.perf_counter()
        run = run_job(proj, JOB, as_of=AS_OF, notify=False, cluster=cluster.scheduler_address)
        wall = time.perf_counter() - started
        rss = sorted(client.run(common.peak_rss_mb).values())
    return {"wall": wall, "score": run.timings.get("score"), "run": run, "root": root, "rss": rss}


def scores(root: Path):
    import duckdb

    con = duckdb.connect(str(root / "warehouse" / "warehouse.duckdb"), read_only=True)
    try:
        return con.execute(f"SELECT finding_id, score FROM scores.{JOB} ORDER BY finding_id").fetchnumpy()
    finally:
        con.close()


def measure(quick: bool) -> dict:
    import numpy as np

    # the chunks hold 1M-row row groups: DuckDB's default 256MB cannot decode one (a clear error says so)
    os.environ.setdefault("BATCHML_MEMORY_LIMIT", "1GB")

    sizes = Sizes.of(quick)
    rows, rss_rows = sizes_of(quick)
    row = common.scoring_model(sizes)
    from batchml.models import compiled

    model = common.loaded_model(row)
    compiled.precompile(model, force=True)  # once, outside the timings (as at promotion), and registered in each warehouse
    row = {**row, "built": model.take_unregistered()}
    figures: dict = {"rows": rows, "runs": {}, "load_before": common.load_average(), "memory_limit": os.environ["BATCHML_MEMORY_LIMIT"]}
    for name, workers in (("local", None), ("dask, 1 worker", 1), ("dask, 2 workers", 2)):
        result = one_run(rows, sizes, row, workers)
        run = result["run"]
        figures["runs"][name] = {"wall": result["wall"], "score": result["score"], "status": run.status,
                                 "rows_scored": run.rows_scored, "rss": result["rss"]}
        if name == "local":
            expected = scores(result["root"])
        else:
            found = scores(result["root"])
            figures["runs"][name]["bitwise_equal"] = bool(np.array_equal(found["finding_id"], expected["finding_id"])
                                                          and np.array_equal(found["score"], expected["score"]))
    figures["rss"] = {}
    for n in rss_rows:  # the throughput run on 2 workers is the peak-RSS run of its size
        figures["rss"][n] = figures["runs"]["dask, 2 workers"]["rss"] if n == rows else one_run(n, sizes, row, 2)["rss"]
    shutil.rmtree(LAKE, ignore_errors=True)
    figures["load_after"] = common.load_average()
    return figures


def markdown(figures: dict) -> str:
    runs, rows = figures["runs"], figures["rows"]
    local = runs["local"]["wall"]
    lines = [
        "## 5. Dask engine",
        "",
        f"One nightly run of {rows:,} new rows x 35 features read from Parquet (pull + contract, drift, score, commit). "
        f"DuckDB memory limit {figures.get('memory_limit')} per process (`BATCHML_MEMORY_LIMIT`). "
        f"Load average (1, 5, 15 min) before: {figures.get('load_before', '?')}, after: {figures.get('load_after', '?')}.",
        "",
        "| engine | run | rows/s | vs local | peak RSS per worker | scores bitwise equal to local |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        rss = ", ".join(f"{r:.0f} MB" for r in run["rss"]) or "(one process)"
        equal = "—" if name == "local" else ("yes" if run.get("bitwise_equal") else "**no**")
        lines.append(f"| {name} | {fmt_s(run['wall'])} | {run['rows_scored'] / run['wall']:,.0f} | {ratio(run['wall'], local)} | {rss} | {equal} |")
    one, two = runs["dask, 1 worker"]["wall"], runs["dask, 2 workers"]["wall"]
    lines += ["", f"Two workers vs one: {one / two:.2f}x the throughput (target 1.7x on 2 cores). "
              f"Dask engine overhead at 1 worker vs the local engine: {(one / local - 1) * 100:+.0f} % "
              f"(the local engine predicts with both cores; compare 2 workers: {(two / local - 1) * 100:+.0f} %).", ""]
    lines += ["| rows (2 workers) | peak RSS per worker |", "|---|---|"]
    lines += [f"| {n:,} | {', '.join(f'{r:.0f} MB' for r in rss)} |" for n, rss in figures["rss"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(markdown(measure(args.quick)))
