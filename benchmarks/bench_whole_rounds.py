"""Section 7 (b), every round kept: the small job's contenders interleaved ``--rounds`` times (default 3),
this checkout against ``--before DIR`` (an earlier ``batchml/``), each a whole process on a fresh copy.
Prints each round's wall and step timings and the median per contender, with the load average.

    .venv/bin/python benchmarks/bench_whole_rounds.py --before /tmp/before [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_whole as bw  # noqa: E402
import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    template = bw.compiled_template(bw.small_template(common.Sizes.of(False).rows))  # a later night: champion compiled
    as_of, start, end = bw.D0 + dt.timedelta(days=bw.NEW_DAYS), bw.D0.date(), (bw.D0 + dt.timedelta(days=bw.NEW_DAYS - 1)).date()
    model = template / "warehouse" / "models" / bw.SMALL / "v1"
    minimal = [f"read_parquet('{{root}}/data/*.parquet')", "event_id", "landed_at", f"{bw.D0}", f"{as_of}", str(model)]
    rounds: dict[str, list[dict]] = {}
    print(f"load at start {os.getloadavg()}", flush=True)
    for _ in range(args.rounds):
        for name in ("minimal", "run", "run@before", "backfill", "backfill@before"):
            root = bw.fresh_copy(template, f"rounds-{name}")
            if name == "minimal":
                result = bw.timed([common.PYTHON, str(bw.MINIMAL), *[a.format(root=root) for a in minimal], str(root / "minimal.duckdb")])
                result["timings"] = {}
            else:
                command, _, earlier = name.partition("@")
                cli = ["run", bw.SMALL, "--as-of", f"{as_of:%Y-%m-%d %H:%M}"] if command == "run" else \
                      ["backfill", bw.SMALL, "--start", f"{start}", "--end", f"{end}"]
                result = bw.timed([*bw.batchml_command(args.before if earlier else None), "--project", str(root), *cli],
                                  cwd=args.before if earlier else None)
                result.update(bw.run_timings(root / "warehouse" / "warehouse.duckdb"))
            result.pop("stdout"), result.pop("stderr")
            rounds.setdefault(name, []).append(result)
            steps = sum(result["timings"].values())
            print(f"{name:16s} wall {result['wall']:6.2f} s  steps {steps:5.2f} s  {json.dumps(result['timings'])}", flush=True)
    print(f"load at end {os.getloadavg()}")
    base = statistics.median(r["wall"] for r in rounds["minimal"])
    for name, results in rounds.items():
        walls = [r["wall"] for r in results]
        steps = [sum(r["timings"].values()) for r in results]
        print(f"| {name} | median {statistics.median(walls):.2f} s ({statistics.median(walls) / base:.2f}x) | best {min(walls):.2f} s "
              f"({min(walls) / min(r['wall'] for r in rounds['minimal']):.2f}x of best minimal) | steps median {statistics.median(steps):.2f} s |")


if __name__ == "__main__":
    main()
