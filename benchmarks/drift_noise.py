"""False alarms of the default drift suite on stable data, by batch size (chooses ``drift.min_rows``).

Reference and current come from the same distribution: the demo's pre-upgrade findings (no scanner
upgrade, no concept change), 11 features as in ``configs/vuln_risk.yaml``. The reference profile is
built from 120 days (~48,000 rows, as the demo's first champion sees); each trial draws a current
batch of n rows at random from the 80 days after it and runs the default suite (PSI for numeric and
categorical features, drift at PSI >= 0.2, dataset drift when >= 30 % of the features drift).
Every flag is a false alarm. PSI's noise grows as its bins empty: its expected value on stable data
is about (bins - 1) / n, 0.36 at n = 25 for 10 bins, above the 0.2 threshold.

    .venv/bin/python benchmarks/drift_noise.py [--trials 200]    # prints a Markdown table
"""

from __future__ import annotations

import argparse
import datetime as dt

import numpy as np
import pyarrow as pa

from batchml.demo import data as demo_data
from batchml.monitoring import drift
from batchml.config import DriftConfig

NUMERIC = ["cvss_base", "epss", "days_since_published", "dependency_depth", "downloads_log", "n_references", "internet_exposed"]
CATEGORICAL = ["ecosystem", "severity", "attack_vector", "asset_criticality"]
SIZES = (25, 50, 100, 150, 200, 300, 500, 5_000)
REFERENCE_DAYS, CURRENT_DAYS = 120, 80


def _arrays(table: pa.Table) -> tuple[dict, dict]:
    numeric = {n: np.asarray(table.column(n).to_numpy(zero_copy_only=False), dtype=np.float64) for n in NUMERIC}
    categorical = {n: np.asarray(table.column(n).to_pylist(), dtype=object) for n in CATEGORICAL}
    return numeric, categorical


def measure(trials: int, seed: int = 5) -> list[dict]:
    findings = demo_data.generate_findings(dt.date(2026, 1, 1), REFERENCE_DAYS + CURRENT_DAYS, seed=seed, shift_day=-1)
    cut = np.datetime64(dt.datetime(2026, 1, 1) + dt.timedelta(days=REFERENCE_DAYS), "us")
    found = findings.column("found_at").to_numpy()
    reference = findings.filter(pa.array(found < cut))
    pool = findings.filter(pa.array(found >= cut))
    profile = drift.build_profile(*_arrays(reference), seed=seed)
    config = DriftConfig(min_rows=1)  # judge every batch, however small: this is what the default guards against
    rng = np.random.default_rng(seed)
    out = []
    for n in SIZES:
        dataset, any_feature, shares = 0, 0, []
        for _ in range(trials):
            batch = pool.take(pa.array(rng.choice(pool.num_rows, size=n, replace=False)))
            current = drift.CurrentAccumulator(profile)
            current.update(*_arrays(batch))
            report = drift.compute_drift(profile, current, config)
            dataset += report.dataset_drift
            any_feature += report.drifted_count > 0
            shares.append(report.drifted_count / report.feature_count)
        out.append({"rows": n, "dataset": dataset / trials, "any": any_feature / trials, "share": float(np.mean(shares)),
                    "reference": reference.num_rows})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args()
    rows = measure(args.trials)
    print(f"stable data, reference {rows[0]['reference']:,} rows, {args.trials} batches per size, default suite (PSI >= 0.2, "
          f"dataset drift at >= 30 % of 11 features)\n")
    print("| batch rows | false dataset drift | batches with any feature flagged | features flagged (mean share) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['rows']:,} | {r['dataset']:.1%} | {r['any']:.1%} | {r['share']:.1%} |")


if __name__ == "__main__":
    main()
