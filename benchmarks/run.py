"""Every benchmark section in one run; side-by-side ratios; ``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/run.py            # full sizes (~15-20 min on 2 cores), writes RESULTS.md
    .venv/bin/python benchmarks/run.py --quick    # small sizes (~3 min), writes .data/RESULTS-quick.md

Sections: 1-2 scoring end to end and its peak RSS (``bench_scoring``), 3 drift (``bench_drift``,
written separately), 4 training overhead (``bench_training``), 5 the Dask engine against the local
one (``bench_cluster``), 6 distributed training against local (``bench_distributed_training``),
7 whole ``batchml run`` / ``backfill`` processes against a minimal hand-written script (``bench_whole``).
Sections 5 and 6 take their sizes from ``BATCHML_BENCH_*`` variables (see their modules);
``--section NAME`` runs one section and prints its Markdown and figures as JSON. A section that fails is reported
in the results with its error; the others still run. All ratios compare figures measured in this
same invocation, on this machine; generated data and models are cached in ``benchmarks/.data/``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

RESULTS = common.ROOT / "RESULTS.md"
QUICK_RESULTS = common.DATA / "RESULTS-quick.md"


# name: (title, module, whether the module offers measure() + markdown(figures) besides run())
SECTIONS = {
    "scoring": ("1-2. Scoring", "bench_scoring", True),
    "drift": ("3. Drift", "bench_drift", False),
    "training": ("4. Training overhead", "bench_training", True),
    "cluster": ("5. Dask engine", "bench_cluster", True),
    "dtraining": ("6. Distributed training", "bench_distributed_training", True),
    "whole": ("7. Whole processes vs a minimal script", "bench_whole", True),
}


def _section(name: str, quick: bool) -> tuple[str, dict | None]:
    """(Markdown, figures) of one section, run in a fresh process (``--section``) so that no section
    inherits another's memory; a failure becomes the section's Markdown instead of a crash."""
    title = SECTIONS[name][0]
    started = time.perf_counter()
    args = [common.PYTHON, __file__, "--section", name, *(["--quick"] if quick else [])]
    done = subprocess.run(args, stdout=subprocess.PIPE, text=True, cwd=common.REPO, check=False)  # progress goes to our stderr
    print(f"[{title}: {time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        result = json.loads(lines[-1])
        return result["markdown"], result["figures"]
    return f"## {title}\n\n**failed** (exit status {done.returncode}); its traceback is in the output of `benchmarks/run.py`.\n", None


def run_section(name: str, quick: bool) -> dict:
    """One section in this process: its module's ``measure`` + ``markdown``, or ``run`` (drift)."""
    title, module, has_figures = SECTIONS[name]
    try:
        bench = importlib.import_module(module)  # bench_drift is written separately and may be missing
        if has_figures:
            figures = bench.measure(quick)
            return {"markdown": bench.markdown(figures), "figures": figures}
        return {"markdown": bench.run(quick), "figures": None}
    except Exception as exc:  # noqa: BLE001 - a benchmark that breaks must not hide the others
        traceback.print_exc()
        return {"markdown": f"## {title}\n\n**failed**: `{type(exc).__name__}: {exc}`\n", "figures": None}


def _floor_row(scoring: dict) -> list[str]:
    """The least the scoring could take here: its CPU-seconds and the compiled predict's, every core busy all the time."""
    none = scoring.get("nopredict")
    if not none:
        return []
    floor = (scoring["compiled_cpu"] + none["steps_cpu"]) / scoring["threads"]
    c = scoring["compiled"]
    return [f"| floor of that scoring on this machine: (compiled predict + the rest) CPU-seconds / {scoring['threads']} cores "
            f"| {floor:.2f} s | {c:.2f} s | {common.speed(floor, c)} | (see section 1) |"]


def _whole_rows(whole: dict | None) -> list[str]:
    """Section 6's targets: whole processes against the minimal script, nightly steps against the backfill's."""
    if not whole:
        return []
    small, big = whole["small"], whole["big"]
    base = small["minimal"]["wall"]
    return [
        f"| `batchml run` vs minimal script, small model, whole processes | {small['run']['wall']:.2f} s | {base:.2f} s | "
        f"{small['run']['wall'] / base:.2f}× | ≤ 1.5× |",
        f"| `batchml backfill` vs minimal script, small model, whole processes | {small['backfill']['wall']:.2f} s | {base:.2f} s | "
        f"{small['backfill']['wall'] / base:.2f}× | ≤ 1.3× |",
        f"| nightly steps vs backfill steps, 300-tree model | {big['run']['steps']:.2f} s | {big['backfill']['steps']:.2f} s | "
        f"{big['run']['steps'] / big['backfill']['steps']:.2f}× | ≤ 1.15× |",
    ]


def summary(scoring: dict | None, training: dict | None, whole: dict | None = None) -> list[str]:
    """The headline ratios, side by side, from figures of this run."""
    lines = ["## Summary (all figures from this run)", "", "| comparison | batchml | baseline | ratio | target |", "|---|---:|---:|---:|---|"]
    if scoring:
        e2e = scoring["e2e"]["default"]
        steps = sum(e2e["timings"].values())
        b, c = scoring["booster"], scoring["compiled"]
        bf = scoring["backfill"]
        scored = sum(bf["timings"].values())
        lines += [
            f"| scoring: read, validate, score, write (`backfill`, steps) vs Booster.predict alone, {scoring['rows']:,} rows | {scored:.2f} s | {b:.2f} s | {common.speed(scored, b)} | ≥ 3× faster |",
            f"| scoring (`backfill`, steps) vs compiled predict alone | {scored:.2f} s | {c:.2f} s | {common.speed(scored, c)} | ≤ 1.3× slower |",
            *_floor_row(scoring),
            f"| nightly run incl. drift (steps) vs Booster.predict alone | {steps:.2f} s | {b:.2f} s | {common.speed(steps, b)} | |",
            f"| nightly run incl. drift (steps) vs compiled predict alone | {steps:.2f} s | {c:.2f} s | {common.speed(steps, c)} | |",
            f"| nightly run (wall, incl. publish + report) vs Booster.predict | {e2e['wall']:.2f} s | {b:.2f} s | {common.speed(e2e['wall'], b)} | |",
            f"| compiled predict vs Booster.predict | {c:.2f} s | {b:.2f} s | {common.speed(c, b)} | |",
            f"| nightly run (steps) vs naive pandas | {steps:.2f} s | {scoring['naive']:.2f} s | {common.speed(steps, scoring['naive'])} | |",
            f"| stored scores vs Booster.predict, max abs diff (nightly / backfill) | {e2e.get('max_diff', float('nan')):.2g} / {bf.get('max_diff', float('nan')):.2g} | | | ≤ 1e-9 |",
        ]
        for label in dict.fromkeys(r["label"] for r in scoring["rss"]):
            series = [r for r in scoring["rss"] if r["label"] == label and "error" not in r]
            if len(series) >= 2:
                first, last = series[0], series[-1]
                lines.append(f"| peak RSS {last['rows']:,} vs {first['rows']:,} rows, {label} | {last['peak_rss_mb']:.0f} MB | "
                             f"{first['peak_rss_mb']:.0f} MB | {last['peak_rss_mb'] / first['peak_rss_mb']:.2f}× | ≤ 1.10×, < 1 GB |")
    if training:
        ours, bare = training["batchml"], training["bare"]
        lines += [f"| train.fit vs bare lightgbm.train | {ours['fit']:.2f} s | {bare:.2f} s | {ours['fit'] / bare:.2f}× | |",
                  f"| retrain.train_candidate vs bare lightgbm.train | {ours['total']:.2f} s | {bare:.2f} s | {ours['total'] / bare:.2f}× | |"]
    return lines + _whole_rows(whole) + [""]


def header(quick: bool, before: dict, seconds: float) -> list[str]:
    after = os.getloadavg()
    m = before
    return [
        "# batchml benchmarks",
        "",
        f"Generated by `benchmarks/run.py{' --quick' if quick else ''}` on {m['date']} in {seconds / 60:.1f} min.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, {m['os']}",
        (f"- Python {m['python']}; lightgbm {m['lightgbm']}, duckdb {m['duckdb']}, polars {m['polars']}, pyarrow {m['pyarrow']}, "
         f"numpy {m['numpy']}, lleaves {m['lleaves']}, llvmlite {m['llvmlite']}, pandas {m['pandas']}"),
        (f"- Load average (1/5/15 min) at start: {m['load_average']}; at end: {' / '.join(f'{v:.2f}' for v in after)}. "
         "Other work on the machine slows every contender; ratios are measured in the same run, side by side."),
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (~3 minutes)")
    parser.add_argument("--output", type=Path, help=f"default: {RESULTS.name} (full) or .data/{QUICK_RESULTS.name} (quick)")
    parser.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)  # internal: one section, JSON on stdout
    args = parser.parse_args()
    if args.section:
        print(json.dumps(run_section(args.section, args.quick), default=str))
        return
    started, machine = time.perf_counter(), common.machine()
    results = {name: _section(name, args.quick) for name in SECTIONS}
    scoring, training, whole = results["scoring"][1], results["training"][1], results["whole"][1]
    text = "\n".join(header(args.quick, machine, time.perf_counter() - started) + summary(scoring, training, whole)
                     + [markdown for markdown, _ in results.values()])
    output = args.output or (QUICK_RESULTS if args.quick else RESULTS)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print("\n".join(summary(scoring, training, whole)))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
