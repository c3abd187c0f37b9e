"""Peak RSS of the one-pass nightly run against the backfill, at 1M and 4M rows (default memory_limit).

A shorter form of section 2 (``bench_scoring.rss_runs``: every memory limit) for the nightly run
that scores during its pull. ``.venv/bin/python benchmarks/bench_rss_pass.py``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scoring  # noqa: E402
import common  # noqa: E402


def measure(rows: tuple[int, ...] = (1_000_000, 4_000_000)) -> list[dict]:
    sizes = common.Sizes.of(False)
    row = common.scoring_model(sizes)
    bench_scoring.E2E.mkdir(parents=True, exist_ok=True)
    results = []
    for n in rows:
        template = bench_scoring.template(n, sizes, row)
        for kind in ("nightly", "backfill"):
            # engine lightgbm: the compiled libraries are not registered in these templates (a run would compile them)
            result, _ = bench_scoring.run_e2e(template, common.job_config(sizes, engine="lightgbm"), kind=kind)
            results.append({"rows": n, "kind": kind, "peak_rss_mb": result["peak_rss_mb"], "steps": sum(result["timings"].values()),
                            "timings": result["timings"]})
            print(f"[rss] {kind} {n:,}: {result['peak_rss_mb']:.0f} MB, steps {results[-1]['steps']:.2f} s", file=sys.stderr, flush=True)
    return results


if __name__ == "__main__":
    print(json.dumps(measure()))
