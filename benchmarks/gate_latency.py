"""The gate's speed test, idle and on a loaded machine: does the same pair of models get the same decision?

Takes the models of a demo project (``batchml demo --dir DIR`` first) and times v1 (the first
champion) against every later version on 5,000 rows of the demo's source, ``--repeats`` times each,
in two ways:

- ``wall``: wall-clock best of 3, champion first, then challenger (the gate before #14);
- ``cpu``: ``retrain.timed_pair`` — thread CPU time, minimum of 7 rounds taken in turns (the gate's
  time per row, for ``latency_floor_us``);
- ``work``: ``retrain.scoring_work`` — tree nodes walked per row, counted (the gate's ratio now):
  the same figure on every run, loaded or not.

With ``--burn N`` it starts N processes that spin on a core each for the whole measurement (and
stops them at the end): ``python benchmarks/gate_latency.py --dir /tmp/x`` idle, then with ``--burn 1``.

    .venv/bin/python benchmarks/gate_latency.py --dir DIR [--burn N] [--repeats 10]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import lightgbm as lgb
import numpy as np

from batchml.models import registry
from batchml.models import retrain
from batchml.data.extract import normalised_sql
from batchml.storage.source import source_sql
from batchml.project import Project
from batchml.models.train import split_by_time
from batchml.storage.warehouse import fetch_dicts

MAX_RATIO = 1.5


def wall_best_of_3(booster, matrix) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        booster.predict(matrix, num_threads=1)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--burn", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    project = Project.open(args.dir)
    config = project.job("vuln_risk")
    con = duckdb.connect(str(project.warehouse), read_only=True)
    rows = {r["version"]: r for r in fetch_dicts(con, "SELECT * FROM batchml.models WHERE job = 'vuln_risk'")}
    table = con.sql(f"SELECT * FROM ({normalised_sql(config, source_sql(con, config, project.root), 'true')}) WHERE __rule IS NULL").to_arrow_table()
    con.close()
    holdout = split_by_time(table, config).holdout
    models = {v: registry.load(row) for v, row in sorted(rows.items())}
    burners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.burn)]
    try:
        time.sleep(0.5 if burners else 0)
        champion = models[1]
        print(f"load: {args.burn} core-burning process(es); {args.repeats} measurements per pair; max_latency_ratio {MAX_RATIO}\n")
        print("| pair | trees (champion / challenger) | wall ratio: min-max | wall rejects | cpu ratio: min-max | cpu rejects "
              "| work ratio | work rejects |")
        print("|---|---|---|---|---|---|---|---|")
        for version, model in models.items():
            if version == 1:
                continue
            walls, cpus = [], []
            for _ in range(args.repeats):
                matrices = [retrain._timing_matrix(m.spec, holdout) for m in (champion, model)]
                walls.append(wall_best_of_3(model.booster, matrices[1]) / wall_best_of_3(champion.booster, matrices[0]))
                a, b = retrain.timed_pair((champion.booster, champion.spec), (model.booster, model.spec), holdout)
                cpus.append(b / a)
            work = retrain.scoring_work(model.booster, model.spec, holdout) / retrain.scoring_work(champion.booster, champion.spec, holdout)
            trees = f"{champion.booster.num_trees()} / {model.booster.num_trees()}"
            print(f"| v1 vs v{version} | {trees} | {min(walls):.2f}-{max(walls):.2f} | {sum(w > MAX_RATIO for w in walls)}/{len(walls)} "
                  f"| {min(cpus):.2f}-{max(cpus):.2f} | {sum(c > MAX_RATIO for c in cpus)}/{len(cpus)} | {work:.3f} | "
                  f"{'yes' if work > MAX_RATIO else 'no'} |")
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


if __name__ == "__main__":
    main()
