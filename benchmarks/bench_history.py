"""How long the history page takes to build, and how big it is: for the demo and for a year.

A year: 365 nightly runs of a job with 50 features, fabricated straight into a DuckDB warehouse
(runs, their feature, missing-rate and prediction drift rows, realised and estimated performance, a
challenger a week through the gate, a rollback, a few failed and rejected nights, and 5,000 scores a
night: 1.8M score rows). The page is then built as a nightly run builds it
(``reporting.write_history``), timed in three parts: reading the warehouse, drawing and rendering,
writing the file.

    python benchmarks/bench_history.py                      # the year, plus a fresh 14-night demo
    python benchmarks/bench_history.py --demo-dir /tmp/demo # the year, plus an existing demo project
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from batchml.reports import deliver as reporting  # noqa: E402
from batchml.project import Project  # noqa: E402
from batchml.reports.history import HistoryData, build_history  # noqa: E402
from batchml.storage import score_summaries  # noqa: E402
from batchml.storage.warehouse import connect, migrate  # noqa: E402

JOB = "vuln_risk"
NIGHTS = 365
FEATURES = 50
SCORES_PER_NIGHT = 5_000
START = datetime(2025, 11, 28)
STEPS = {"extract": 1.2, "validate": 0.3, "drift": 0.8, "train": 6.0, "evaluate": 2.5, "score": 3.0, "commit": 0.6}


def fabricate_year(root: Path, seed: int = 3) -> Project:
    """A project whose warehouse holds a year of nightly runs of JOB (no source data: the page never reads it)."""
    rng = np.random.default_rng(seed)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "configs" / f"{JOB}.yaml", root / "configs" / f"{JOB}.yaml")
    project = Project.open(root)
    features = [f"feature_{i:02d}" for i in range(FEATURES)]
    # a few features drift more and more over the year; the rest wander around their reference
    trend = np.full(FEATURES, 0.2)
    trend[:6] = np.linspace(0.5, 3.0, 6)
    runs, drift, performance, events = [], [], [], []
    champion = 1
    for night in range(NIGHTS):
        as_of = START + timedelta(days=night)
        run_id = f"{JOB}-{as_of:%Y%m%dT020000}-{night:06x}"
        status = "failed" if night % 53 == 17 else "rejected" if night % 71 == 30 else "succeeded"
        rows = int(rng.integers(2_000, 9_000))
        quarantined = int(rng.integers(0, 40)) if status != "rejected" else rows // 10
        ratio = trend * (0.3 + night / NIGHTS) * rng.lognormal(0, 0.5, FEATURES)
        drifted = ratio >= 1.0
        challenger = champion + 1 if night % 7 == 3 else None
        promoted = challenger is not None and night % 28 == 3
        timings = {step: round(seconds * rng.lognormal(0, 0.2), 3) for step, seconds in STEPS.items()
                   if challenger or step not in ("train", "evaluate")}
        runs.append((run_id, JOB, "nightly", status, as_of, as_of + timedelta(hours=2), as_of + timedelta(hours=2, seconds=20),
                     rows, quarantined, rows - quarantined if status == "succeeded" else 0, champion, challenger,
                     promoted and status == "succeeded", "ValueError: column feature_07 is not a number" if status == "failed" else None,
                     bool(drifted.mean() >= 0.1), json.dumps(timings), sum(timings.values())))
        if status != "succeeded":
            continue
        for i, feature in enumerate(features):
            drift.append((run_id, JOB, feature, "psi", "feature", float(ratio[i] * 0.2), None, 0.2, bool(drifted[i]), 50_000, rows))
            drift.append((run_id, JOB, feature, "missing_rate", "missing_rate", 0.0, None, 0.1, False, 50_000, rows))
        drift.append((run_id, JOB, "__score__", "psi", "prediction", 0.05, None, 0.2, False, 50_000, rows))
        realised_day = (as_of - timedelta(days=30)).date()
        performance += [(run_id, JOB, champion, realised_day, "roc_auc", 0.85 - night / 4000 + rng.normal(0, 0.01), 400, False),
                        (run_id, JOB, champion, None, "roc_auc", 0.85, 400, False),
                        (run_id, JOB, champion, as_of.date(), "roc_auc", 0.86 + rng.normal(0, 0.005), rows, True)]
        if challenger:
            diff = float(rng.normal(0.001, 0.002))
            outcome = "promoted" if promoted else "rejected"
            gate = {"outcome": outcome, "reason": f"roc_auc improvement {diff:+.4f}", "metric": "roc_auc",
                    "bootstrap": {"diff": diff, "low": diff - 0.0025, "high": diff + 0.0025, "resamples": 1000},
                    "checks": {"min_holdout_rows": True, "min_improvement": promoted, "significance": promoted, "latency": True}}
            events.append((JOB, challenger, outcome, run_id, gate["reason"], json.dumps(gate), "batchml", as_of, champion))
            champion = challenger if promoted else champion
    events.append((JOB, champion - 1, "rollback", None, "v%d scored badly on the new scanner" % champion, "{}", "ops",
                   START + timedelta(days=200, hours=9), champion))
    with connect(project.warehouse) as con:
        migrate(con)
        con.executemany("INSERT INTO batchml.runs (run_id, job, kind, status, as_of, started_at, finished_at, rows_extracted, "
                        "rows_quarantined, rows_scored, champion_version, challenger_version, promoted, error, dataset_drift, "
                        "timings, total_seconds) VALUES (" + ", ".join("?" * 17) + ")", runs)
        names = ("run_id", "job", "feature", "method", "kind", "statistic", "p_value", "threshold", "drifted", "n_reference", "n_current")
        con.register("fabricated_drift", pa.table({name: column for name, column in zip(names, zip(*drift))},
                                                  schema=pa.schema([(n, pa.float64() if n in ("statistic", "p_value", "threshold") else
                                                                    pa.bool_() if n == "drifted" else pa.int64() if n.startswith("n_") else pa.string())
                                                                    for n in names])))
        con.execute("INSERT INTO batchml.drift BY NAME SELECT * FROM fabricated_drift")
        con.executemany("INSERT INTO batchml.performance (run_id, job, model_version, event_day, metric, value, n, estimated) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", performance)
        con.executemany("INSERT INTO batchml.model_events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", events)
        con.execute("CREATE TABLE scores.vuln_risk (finding_id BIGINT, score DOUBLE, risk_band VARCHAR, model_version INTEGER, "
                    "run_id VARCHAR, scored_at TIMESTAMP, event_time TIMESTAMP)")
        con.execute(f"""INSERT INTO scores.vuln_risk
            SELECT row_number() OVER (), s, CASE WHEN s >= 0.5 THEN 'high' WHEN s >= 0.2 THEN 'medium' ELSE 'low' END,
                   champion_version, run_id, started_at, as_of - INTERVAL 1 DAY
            FROM (SELECT r.*, power(random(), 2.5 - 0.5 * (epoch(as_of) - epoch(TIMESTAMP '{START}')) / (86400 * {NIGHTS})) AS s
                  FROM batchml.runs r, range({SCORES_PER_NIGHT}) WHERE r.status = 'succeeded')""")
    return project


def timed_build(project: Project) -> dict:
    """Read, draw and render, write, as ``reporting.write_history`` does, each part timed."""
    config = project.job(JOB)
    folder = project.reports / JOB
    started, cpu = time.perf_counter(), time.process_time()
    with project.connect(read_only=True) as con:
        data = reporting.load_history_data(con, config, None, folder)
    read = time.perf_counter()
    page = build_history(data, path=str(folder / "history.html"))
    built = time.perf_counter()
    path = reporting.write_page(page.html_file(), folder / "history.html")
    done = time.perf_counter()
    return {"nights": len(data.nights), "features": len({r["feature"] for r in data.drift}), "read": read - started,
            "draw_render": built - read, "write": done - built, "total": done - started, "cpu": time.process_time() - cpu,
            "bytes": path.stat().st_size, "mail_bytes": len(page.html_email) + sum(len(png) for png in page.images.values()),
            "path": path}


def demo_project(directory: Path | None) -> Project:
    if directory is not None:
        return Project.open(directory)
    from batchml.demo.build import run_demo

    root = Path(tempfile.mkdtemp(prefix="batchml-history-demo-"))
    run_demo(root)
    return Project.open(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", type=Path, help="an existing demo project (default: build one)")
    parser.add_argument("--keep", type=Path, help="build the year's project here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    build_history(HistoryData(job=JOB, metric="roc_auc"))  # imports and fonts loaded before timing anything
    year_root = args.keep or Path(tempfile.mkdtemp(prefix="batchml-history-year-"))
    started = time.perf_counter()
    year = fabricate_year(year_root)
    print(f"fabricated a year in {time.perf_counter() - started:.1f} s: {year.warehouse}")
    results = {"demo": timed_build(demo_project(args.demo_dir)), "year, no summaries (the page scans the scores)": timed_build(year)}
    with connect(year.warehouse) as con:  # as each night's commit would have stored them
        score_summaries.fill_missing(con, JOB, year.job(JOB).scores_table)
    results["year"] = timed_build(year)
    print(f"\nload average {' / '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| history page | nights | features | read | draw + render | write | total (wall) | CPU | file | as a mail |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['nights']} | {r['features']} | {r['read']:.2f} s | {r['draw_render']:.2f} s | {r['write']:.3f} s | "
              f"{r['total']:.2f} s | {r['cpu']:.2f} s | {r['bytes'] / 1024:.0f} KB | {r['mail_bytes'] / 1024:.0f} KB |")
    for name, r in results.items():
        print(f"{name}: {r['path']}")
    if args.keep is None:
        shutil.rmtree(year_root, ignore_errors=True)


if __name__ == "__main__":
    main()
