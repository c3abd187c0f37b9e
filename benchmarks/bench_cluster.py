"""Dask engine benchmark: the same nightly run on the local engine and on Dask with 1 and 2 workers.

Setup (outside every timing): ``rows`` new rows x 35 features as Parquet chunks (``common``), the
300-tree x 63-leaf champion registered in a fresh warehouse per run, the job reading the chunks
with ``source.parquet``. Each run is one nightly run (``run_job``; retraining off, no mail): pull
with the data contract, drift of every feature, score (compiled trees where available), commit. The
Dask runs use a fresh ``LocalCluster(n_workers=N, threads_per_worker=1, processes=True)`` started
by this process (its start is outside the timing), so each worker's peak RSS (``VmHWM``) and CPU
seconds are read from the worker itself afterwards. Scores are compared with the local engine's,
bitwise. A last run on 2 workers SIGKILLs one worker process halfway through (half the time of the
run without a kill after its scoring task started: half its share is done again), and checks every
row is scored once (score rows and distinct ids equal the batch).

    python benchmarks/bench_cluster.py [--quick]     # prints the Markdown section

Sizes from the environment: ``BATCHML_BENCH_CLUSTER_ROWS`` (throughput runs, default the issue's
10,000,000; --quick 400,000) and ``BATCHML_BENCH_CLUSTER_RSS_ROWS`` (comma-separated peak-RSS runs
on 2 workers, default 10,000,000,40,000,000; --quick 200,000,800,000).
The Parquet rows are generated in 1M-row chunks of 131,072-row row groups (never all in memory) and
cached in ``.data``.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import AS_OF, DATA, JOB, Sizes, fmt_s, ratio

LAKE = DATA / "cluster"
# Rows per row group of the source's chunks (DuckDB writes 122,880). A 1M-row row group (pyarrow's
# default) failed under DuckDB 2.0's Parquet prefetching (one 293 MiB buffer per row group), which
# batchml now turns off (storage.warehouse); smaller row groups still keep each task's buffer small
ROW_GROUP = 131_072


def sizes_of(quick: bool) -> tuple[int, tuple[int, ...]]:
    """(rows of the throughput runs, rows of the peak-RSS runs)."""
    rows, rss = (400_000, (200_000, 800_000)) if quick else (10_000_000, (10_000_000, 40_000_000))
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
    for chunk in common.row_chunks(rows, sizes.chunk, row_group=ROW_GROUP):
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


def process_cpu_seconds() -> float:
    """This process's CPU time so far (user + system, every thread): run on each worker."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def one_run(rows: int, sizes: Sizes, row: dict, workers: int | None, kill: float | None = None) -> dict:
    """A nightly run on the local engine (``workers`` None) or on a fresh LocalCluster of ``workers``
    (``kill``: one worker process SIGKILLed that many seconds after scoring has started)."""
    from batchml.pipeline.nightly import run_job
    from batchml.project import Project

    root = project(rows, sizes, row, "local" if workers is None else f"dask{workers}")
    proj = Project.open(root)
    load = common.load_average()
    if workers is None:
        started = time.perf_counter()
        run = run_job(proj, JOB, as_of=AS_OF, notify=False)
        return {"wall": time.perf_counter() - started, "score": run.timings.get("score"), "run": run, "root": root, "rss": [],
                "load": (load, common.load_average())}
    from distributed import Client, LocalCluster

    said: list[str] = []
    listener, logger = _Listener(said), logging.getLogger("batchml")
    level = logger.level
    logger.addHandler(listener)
    logger.setLevel(logging.INFO)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        cpu_before = client.run(process_cpu_seconds)
        started, client_cpu = time.perf_counter(), time.process_time()
        if kill is not None:
            run, killed_at = run_with_a_kill(client, kill, lambda: run_job(proj, JOB, as_of=AS_OF, notify=False,
                                                                      cluster=cluster.scheduler_address))
        else:
            run, killed_at = run_job(proj, JOB, as_of=AS_OF, notify=False, cluster=cluster.scheduler_address), None
        wall, client_cpu = time.perf_counter() - started, time.process_time() - client_cpu
        if kill is not None:
            client.wait_for_workers(workers, timeout=60)
        cpu_after = client.run(process_cpu_seconds)
        rss = sorted(client.run(common.peak_rss_mb).values())
    logger.removeHandler(listener)
    logger.setLevel(level)
    # a killed worker's CPU is lost with it; its successor's counts from its start
    cpu = [cpu_after[w] - cpu_before.get(w, 0.0) for w in cpu_after]
    return {"wall": wall, "score": run.timings.get("score"), "run": run, "root": root, "rss": rss, "cpu": sorted(cpu),
            "client_cpu": client_cpu, "killed_at": killed_at, "load": (load, common.load_average()),
            "keys_step": workers > 1 and not any("lies in two partitions" in message for message in said)}


class _Listener(logging.Handler):
    """Keeps the run's log messages: whether the keys step ran is said there."""

    def __init__(self, said: list[str]) -> None:
        super().__init__(logging.INFO)
        self.said = said

    def emit(self, record: logging.LogRecord) -> None:
        self.said.append(record.getMessage())


@contextmanager
def _keys_step(forced: bool):
    """The bench's ids grow with the file, so the footers spare the keys step; ``forced``: the run
    takes it anyway, as for a source whose ids can lie in two shares (same rows, same winners)."""
    from batchml.cluster import plan

    real = plan.disjoint_keys
    if forced:
        plan.disjoint_keys = lambda shares, groups: False
    try:
        yield
    finally:
        plan.disjoint_keys = real


def run_with_a_kill(client, delay: float, night) -> tuple:
    """Run ``night`` in a thread and SIGKILL the process of the first worker seen scoring, ``delay``
    seconds after it started (the work it did by then is lost with it); returns (the run, seconds
    into it when the worker was killed)."""
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(run=night()))
    started = time.perf_counter()
    thread.start()
    victim = None
    while victim is None and thread.is_alive():
        victim = next((w for w, keys in client.processing().items() if any(str(k).startswith("score-") for k in keys)), None)
        time.sleep(0.05)
    killed_at = None
    if victim is not None:
        time.sleep(delay)
        os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
        killed_at = time.perf_counter() - started
    thread.join()
    return outcome["run"], killed_at


def scores(root: Path):
    import duckdb

    con = duckdb.connect(str(root / "warehouse" / "warehouse.duckdb"), read_only=True)
    try:
        return con.execute(f"SELECT finding_id, score FROM scores.{JOB} ORDER BY finding_id").fetchnumpy()
    finally:
        con.close()


def scored_once(root: Path, rows: int) -> tuple[int, int, bool]:
    """(score rows, distinct ids, whether both equal the batch's ``rows``)."""
    import duckdb

    con = duckdb.connect(str(root / "warehouse" / "warehouse.duckdb"), read_only=True)
    try:
        count, distinct = con.execute(f"SELECT count(*), count(DISTINCT finding_id) FROM scores.{JOB}").fetchone()
    finally:
        con.close()
    return count, distinct, count == distinct == rows


def measure(quick: bool) -> dict:
    import numpy as np

    # DuckDB's per process, named in the table: its buffer grows towards the limit as a task reads
    # (at 1GB a worker's peak grew 523 -> 631 MB from 1M to 4M rows per worker; at 256MB 528 -> 543 MB)
    os.environ.setdefault("BATCHML_MEMORY_LIMIT", "256MB")

    sizes = Sizes.of(quick)
    rows, rss_rows = sizes_of(quick)
    row = common.scoring_model(sizes)
    from batchml.models import compiled

    model = common.loaded_model(row)
    compiled.precompile(model, force=True)  # once, outside the timings (as at promotion), and registered in each warehouse
    row = {**row, "built": common.verified_libraries(row)}
    figures: dict = {"rows": rows, "runs": {}, "load_before": common.load_average(), "memory_limit": os.environ["BATCHML_MEMORY_LIMIT"]}
    for name, workers, kill in (("local", None, False), ("dask, 1 worker", 1, False), ("dask, 2 workers", 2, False),
                                ("dask, 2 workers, keys step", 2, False), ("dask, 2 workers, one killed", 2, True)):
        # killed halfway through the run without a kill: half of that worker's share is done again
        delay = figures["runs"]["dask, 2 workers"]["wall"] / 2 if kill else None
        with _keys_step(name.endswith("keys step")):
            result = one_run(rows, sizes, row, workers, delay)
        run = result["run"]
        figures["runs"][name] = {"wall": result["wall"], "score": result["score"], "status": run.status,
                                 "rows_scored": run.rows_scored, "rss": result["rss"], "cpu": result.get("cpu", []),
                                 "client_cpu": result.get("client_cpu"), "load": result["load"], "killed_at": result.get("killed_at"),
                                 "keys_step": result.get("keys_step"),
                                 "scored_once": scored_once(result["root"], rows) if workers else None}
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
        f"One nightly run of {rows:,} new rows x 35 features read from Parquet (pull + contract, drift, score, commit, publish). "
        f"DuckDB memory limit {figures.get('memory_limit')} per process (`BATCHML_MEMORY_LIMIT`). "
        f"Load average (1, 5, 15 min) before: {figures.get('load_before', '?')}, after: {figures.get('load_after', '?')}.",
        "",
        "| engine | run | rows/s | vs local | worker CPU s per 1M rows (per worker) | client CPU | peak RSS per worker | "
        "scores bitwise equal to local | load (1 min) before → after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        rss = ", ".join(f"{r:.0f} MB" for r in run["rss"]) or "(one process)"
        equal = "—" if name == "local" else ("yes" if run.get("bitwise_equal") else "**no**")
        cpu = (f"{sum(run['cpu']) / rows * 1e6:.1f} ({', '.join(f'{c / rows * 1e6:.1f}' for c in run['cpu'])})"
               if run.get("cpu") else "—")
        client = f"{run['client_cpu']:.1f} s" if run.get("client_cpu") is not None else "—"
        load = " → ".join(part.split(" / ")[0] for part in run.get("load", ("?", "?")))
        lines.append(f"| {name} | {fmt_s(run['wall'])} | {run['rows_scored'] / run['wall']:,.0f} | {ratio(run['wall'], local)} | "
                     f"{cpu} | {client} | {rss} | {equal} | {load} |")
    one, two = runs["dask, 1 worker"], runs["dask, 2 workers"]
    cpu_one, cpu_two = sum(one["cpu"]) / rows, sum(two["cpu"]) / rows
    keys = ("the keys step ran (ids of two shares could meet)" if two.get("keys_step") else
            "no keys step: the chunks' ids grow with the file, as in an append-only source, and the footers show no id in two shares")
    forced = runs.get("dask, 2 workers, keys step")
    if forced:
        keys += (f"; with the keys step anyway (a source whose ids can meet) {forced['wall']:.2f} s, "
                 f"{one['wall'] / forced['wall']:.2f}x one worker's throughput, {(forced['wall'] / local - 1) * 100:+.0f} % over the local engine")
    lines += ["", f"Two workers vs one: {one['wall'] / two['wall']:.2f}x the throughput (target 1.7x on 2 cores); "
              f"worker CPU per row {cpu_two / cpu_one:.2f}x one worker's (the work added by splitting the night: 1.00x would allow 2x). "
              f"Dask engine overhead vs the local engine, both on the 2 cores: 2 workers {(two['wall'] / local - 1) * 100:+.0f} % "
              f"(target ≤ 15 %); 1 worker (one core) {(one['wall'] / local - 1) * 100:+.0f} %. Duplicate rule on 2 workers: {keys}."]
    killed = runs.get("dask, 2 workers, one killed")
    if killed:
        count, distinct, once = killed["scored_once"]
        at = f"{killed['killed_at']:.1f} s into the run" if killed.get("killed_at") is not None else "never (no scoring task seen)"
        lines += ["", f"A worker SIGKILLed mid-scoring ({at}): the run {killed['status']}, "
                  f"{killed['wall'] / two['wall']:.2f}x the time of the same run without the kill (target ≤ 1.5x); "
                  f"{count:,} score rows, {distinct:,} distinct ids for {rows:,} rows: "
                  f"{'every row scored once' if once else '**rows lost or doubled**'}."]
    lines += ["", "| rows (2 workers) | peak RSS per worker |", "|---|---|"]
    lines += [f"| {n:,} | {', '.join(f'{r:.0f} MB' for r in rss)} |" for n, rss in figures["rss"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(markdown(measure(args.quick)))
