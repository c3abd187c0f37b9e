"""Section 6: whole processes against the minimal hand-written script (``minimal_score.py``).

Each contender is one process, timed from spawn to exit (imports, begin, publishing, the report
included), on the same new rows:

- ``minimal``: read the rows with DuckDB, encode as model.json says, ``Booster.predict``, write
  id + score to a DuckDB table;
- ``batchml run``: the nightly run (a common night: a champion, no retrain trigger fires);
- ``batchml backfill``: the same rows by event day.

Two jobs: (a) the 35-feature / 300-tree model of section 1 (source: a DuckDB table; engine
compiled); (b) a small job as a new user writes it: 9 features, string ids, daily Parquet files,
the config's defaults (retrain triggers included), a champion trained by ``batchml run`` itself
with early stopping, compiled before the timed nights as its first 2M-row night compiles it under
``engine: auto`` (that first night is timed too).

    .venv/bin/python benchmarks/bench_whole.py [--quick]
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

WHOLE = common.DATA / "whole"
MINIMAL = Path(__file__).resolve().parent / "minimal_score.py"
BATCHML = str(Path(common.PYTHON).parent / "batchml")
SMALL = "small"
D0 = dt.datetime(2026, 10, 15)  # the small job's first run (trains its champion); new rows land in [D0, D0 + 4 days)
NEW_DAYS = 4
HISTORY_DAYS, LABELED_DAYS = 45, 30
NUMERIC = [f"n{i}" for i in range(1, 7)]
CATEGORICAL = {"plan": ["free", "basic", "pro", "team", "enterprise"], "region": [f"r{i:02d}" for i in range(12)],
               "channel": ["web", "app", "partner"]}


def _progress(message: str) -> None:
    print(f"[whole] {message}", file=sys.stderr, flush=True)


def timed(args: list[str], cwd: Path | None = None) -> dict:
    """Wall seconds and peak RSS (its own, from wait4) of one process."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd or common.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "BATCHML_SMTP_HOST": ""})
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    usage = proc.returncode  # communicate reaped it; rusage via /proc is gone: use the children's rusage delta below
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} exited {usage}: {err.strip().splitlines()[-3:]}")
    return {"wall": wall, "stdout": out, "stderr": err}


def run_timings(warehouse: Path) -> dict:
    import duckdb

    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        kind, status, rows, timings = con.execute("SELECT kind, status, rows_scored, timings FROM batchml.runs "
                                                  "ORDER BY started_at DESC LIMIT 1").fetchone()
    finally:
        con.close()
    return {"kind": kind, "status": status, "rows_scored": rows, "timings": json.loads(timings)}


# --------------------------------------------------------------------------------------------
# (b) the small job
# --------------------------------------------------------------------------------------------


def small_config() -> dict:
    return {
        "job": SMALL,
        "description": "benchmark: a small early-stopped model on daily Parquet files",
        "source": {"parquet": "data/*.parquet", "entity_id": "event_id", "event_time": "event_at", "watermark": "landed_at"},
        "features": {"numeric": NUMERIC, "categorical": list(CATEGORICAL)},
        "label": {"column": "churned", "available_at": "label_at"},
        "training": {"window_days": 60, "holdout_days": 5,
                     "params": {"num_leaves": 31, "learning_rate": 0.1, "num_boost_round": 400, "early_stopping_rounds": 20}},
        "scoring": {"table": f"scores.{SMALL}"},
        "notify": {"email": [], "on": ["failure"]},
    }


def small_day(day: dt.datetime, rows: int, seed: int, labeled: bool, first: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    numeric = {name: rng.normal(i * 0.3, 1 + i * 0.2, rows) for i, name in enumerate(NUMERIC)}
    numeric["n3"][rng.random(rows) < 0.03] = np.nan
    categorical = {name: rng.integers(0, len(levels), rows) for name, levels in CATEGORICAL.items()}
    logit = -2 + 0.8 * numeric["n1"] - 0.5 * numeric["n2"] + 0.3 * np.nan_to_num(numeric["n3"]) + 0.4 * (categorical["plan"] == 0)
    churned = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    event_at = np.datetime64(day) + rng.integers(0, 86_400_000_000, rows).astype("timedelta64[us]")
    landed_at = np.minimum(event_at + np.timedelta64(3_600_000_000, "us"), np.datetime64(day + dt.timedelta(days=1)) - np.timedelta64(1, "us"))
    columns = {
        "event_id": pa.array([f"evt-{first + i:09d}" for i in range(rows)]),
        "event_at": pa.array(event_at, pa.timestamp("us")), "landed_at": pa.array(landed_at, pa.timestamp("us")),
        **{name: pa.array(values, pa.float64(), from_pandas=True) for name, values in numeric.items()},
        **{name: pa.array(np.array(CATEGORICAL[name])[codes]) for name, codes in categorical.items()},
        "churned": pa.array(churned if labeled else [None] * rows, pa.int64()),
        "label_at": pa.array(event_at + np.timedelta64(7 * 86_400_000_000, "us") if labeled else [None] * rows, pa.timestamp("us")),
    }
    return pa.table(columns)


def small_template(new_rows: int) -> Path:
    """A project whose first run (as of D0) trained champion v1, with ``new_rows`` landed since in daily files."""
    root = WHOLE / f"small-template-{new_rows}"
    if (root / "ready").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "configs").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "configs" / f"{SMALL}.yaml").write_text(yaml.safe_dump(small_config(), sort_keys=False))
    first = 0
    for d in range(HISTORY_DAYS):
        day = D0 - dt.timedelta(days=HISTORY_DAYS - d)
        table = small_day(day, 4_000, seed=d, labeled=d < LABELED_DAYS, first=first)
        pq.write_table(table, str(root / "data" / f"{day:%Y-%m-%d}.parquet"))
        first += table.num_rows
    timed([BATCHML, "--project", str(root), "run", SMALL, "--as-of", f"{D0:%Y-%m-%d}", "--no-notify"])
    for d in range(NEW_DAYS):
        day = D0 + dt.timedelta(days=d)
        table = small_day(day, new_rows // NEW_DAYS, seed=1000 + d, labeled=False, first=first)
        pq.write_table(table, str(root / "data" / f"{day:%Y-%m-%d}.parquet"))
        first += table.num_rows
    (root / "ready").write_text("")
    return root


def compiled_template(template: Path) -> Path:
    """``template`` after its champion's compiled libraries were built and registered, as by the
    job's first big night under ``scoring.engine: auto`` (a 2M-row night of this model compiles it:
    ``compiled.compile_pays``), here by ``batchml models compile``: the state of every later night."""
    root = template.with_name(f"{template.name}-compiled")
    if (root / "ready").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(template, root, symlinks=True, ignore=shutil.ignore_patterns("ready"))
    timed([BATCHML, "--project", str(root), "models", "compile", SMALL])
    (root / "ready").write_text("")
    return root


def fresh_copy(template: Path, name: str) -> Path:
    root = WHOLE / name
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(template, root, symlinks=True, ignore=shutil.ignore_patterns("ready"))
    return root


# --------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------


def batchml_command(before: Path | None) -> list[str]:
    """The CLI of this checkout, or (``before``: a folder holding an earlier ``batchml/``, e.g. from
    ``git archive``) that earlier code run with the same interpreter and packages."""
    if before is None:
        return [BATCHML]
    return ["env", f"PYTHONPATH={before}", common.PYTHON, "-m", "batchml.cli"]


def contenders(template: Path, job: str, as_of: dt.datetime, start: dt.date, end: dt.date, minimal_args, repeats: int,
               before: Path | None = None, names: list[str] | None = None) -> dict:
    """Each contender ``repeats`` times, interleaved, each in a fresh copy of ``template``; the fastest
    kept. With ``before``: also ``run@before`` and ``backfill@before``, the same commands of earlier code.
    ``names``: only these contenders."""
    results: dict[str, dict] = {}
    names = names or ["minimal", "run", "backfill", *(["run@before", "backfill@before"] if before else [])]
    for _ in range(repeats):
        for name in names:
            root = fresh_copy(template, f"{job}-{name}")
            warehouse = root / "warehouse" / "warehouse.duckdb"
            if name == "minimal":
                out = root / "minimal.duckdb"
                result = timed([common.PYTHON, str(MINIMAL), *minimal_args(root, out)])
                result["rows"] = json.loads(result["stdout"].strip().splitlines()[-1])["rows"]
            else:
                command, _, earlier = name.partition("@")
                args = (["run", job, "--as-of", f"{as_of:%Y-%m-%d %H:%M}"] if command == "run"
                        else ["backfill", job, "--start", f"{start}", "--end", f"{end}"])
                # earlier code runs from its own folder: `python -m` puts the working directory first on sys.path
                result = timed([*batchml_command(before if earlier else None), "--project", str(root), *args],
                               cwd=before if earlier else None)
                result.update(run_timings(warehouse))
                result["steps"] = sum(result["timings"].values())
                if command == "run":
                    result["diff"] = stored_vs_booster(root, job, result)
            result.pop("stdout"), result.pop("stderr")
            _progress(f"{job} {name}: {result['wall']:.2f} s")
            runs = results[name]["runs"] if name in results else []
            runs.append({"wall": result["wall"], **({"steps": result["steps"]} if "steps" in result else {})})
            if name not in results or result["wall"] < results[name]["wall"]:
                results[name] = result
            results[name]["runs"] = runs
    return results


def stored_vs_booster(root: Path, job: str, result: dict) -> float | None:
    """Max |stored score - LightGBM predict of the champion's model.txt| over the run's rows (encoded independently)."""
    import duckdb
    import lightgbm as lgb
    import pyarrow.compute as pc

    con = duckdb.connect(str(root / "warehouse" / "warehouse.duckdb"), read_only=True)
    try:
        folder = Path(con.execute("SELECT artifact_path FROM batchml.models WHERE status = 'champion'").fetchone()[0])
        manifest = json.loads((folder / "model.json").read_text())
        config = yaml.safe_load((root / "configs" / f"{job}.yaml").read_text())
        source = (f"read_parquet('{root / config['source']['parquet']}')" if "parquet" in config["source"] else config["source"]["table"])
        entity = config["source"]["entity_id"]
        columns = ", ".join(f'f."{c}"' for c in manifest["features"])
        warnings.filterwarnings("ignore", message="Arrow output on a DB-API result")  # a copy: fine here
        table = con.execute(f"SELECT s.score, {columns} FROM scores.{job} s JOIN {source} f USING ({entity}) "
                            f"WHERE s.run_id = (SELECT run_id FROM batchml.runs WHERE kind = 'nightly' ORDER BY started_at DESC LIMIT 1) "
                            f"ORDER BY s.{entity} LIMIT 200000").to_arrow_table()
    finally:
        con.close()
    if table.num_rows == 0:
        return None
    matrix = np.empty((table.num_rows, len(manifest["features"])))
    for j, name in enumerate(manifest["features"]):
        column = table.column(name)
        if name in manifest["categories"]:
            column = pc.index_in(column, value_set=pa.array(manifest["categories"][name], column.type))
        matrix[:, j] = pc.fill_null(pc.cast(column, pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    booster = lgb.Booster(model_file=str(folder / "model.txt"))
    return float(np.max(np.abs(booster.predict(matrix) - table.column("score").to_numpy())))


def measure(quick: bool = False, before: Path | None = None) -> dict:
    import bench_scoring

    sizes = common.Sizes.of(quick)
    WHOLE.mkdir(parents=True, exist_ok=True)
    figures: dict = {"machine_load_start": os.getloadavg(), "rows": sizes.rows}

    _progress(f"(b) small job: template with {sizes.rows:,} new rows")
    small = small_template(sizes.rows)
    model_dir = small / "warehouse" / "models" / SMALL / "v1"
    manifest = json.loads((model_dir / "model.json").read_text())
    figures["small_model"] = {"features": len(manifest["features"]), "trees": _trees(model_dir)}

    def small_minimal(root: Path, out: Path) -> list[str]:
        return [f"read_parquet('{root}/data/*.parquet')", "event_id", "landed_at", f"{D0}", f"{D0 + dt.timedelta(days=NEW_DAYS)}",
                str(root / "warehouse" / "models" / SMALL / "v1"), str(out)]

    end = (D0 + dt.timedelta(days=NEW_DAYS - 1)).date()
    later = compiled_template(small)
    figures["small"] = contenders(later, SMALL, D0 + dt.timedelta(days=NEW_DAYS), D0.date(), end, small_minimal, 2, before)
    _progress("(b) the first big night: the champion not compiled yet")
    figures["small_first"] = contenders(small, SMALL, D0 + dt.timedelta(days=NEW_DAYS), D0.date(), end, small_minimal, 1,
                                        names=["run", "backfill"])

    _progress(f"(a) 35 features x {sizes.trees} trees: template with {sizes.rows:,} rows")
    row = common.scoring_model(sizes)
    from batchml.models import compiled

    compiled.precompile(common.loaded_model(row), force=True)
    bench_scoring.E2E.mkdir(parents=True, exist_ok=True)
    table_db = bench_scoring.template(sizes.rows, sizes, row)
    big = WHOLE / "big-template"
    shutil.rmtree(big, ignore_errors=True)
    common.write_config(big, common.job_config(sizes))
    (big / "warehouse").mkdir(parents=True)
    shutil.copyfile(table_db, big / "warehouse" / "warehouse.duckdb")


    def big_minimal(root: Path, out: Path) -> list[str]:
        return ["raw.findings", "finding_id", "ingested_at", "1970-01-01", f"{common.AS_OF}", str(Path(row["artifact_path"])),
                str(out), str(root / "warehouse" / "warehouse.duckdb")]

    # the fastest of three: the target compares two figures of a few seconds each (see bench_scoring.RUNS)
    figures["big"] = contenders(big, common.JOB, common.AS_OF, common.T0.date(), common.AS_OF.date(), big_minimal, 3, before)
    figures["machine_load_end"] = os.getloadavg()
    return figures


def _trees(model_dir: Path) -> int:
    return sum(1 for line in (model_dir / "model.txt").read_text().splitlines() if line.startswith("Tree="))


def markdown(f: dict) -> str:
    lines = ["## 7. Whole processes vs a minimal hand-written script", "",
             "Each contender is one whole process (imports, begin, publishing and the report included), spawned fresh, "
             f"on the same {f['rows']:,} new rows; interleaved, the fastest of two (b) or three (a); every run is listed under each table. Load average at start "
             f"{' / '.join(f'{x:.2f}' for x in f['machine_load_start'])}, at end {' / '.join(f'{x:.2f}' for x in f['machine_load_end'])}. "
             "`minimal`: `benchmarks/minimal_score.py` (DuckDB read, encode as model.json says, Booster.predict, "
             "id + score into a DuckDB table).", ""]
    targets = {("small", "run"): 1.5, ("small", "backfill"): 1.3}
    for key, title in (("small", f"(b) small job: {f['small_model']['features']} features, {f['small_model']['trees']} trees "
                                 "(early-stopped), string ids, daily Parquet files, config defaults"),
                       ("big", "(a) 35 features, 300 trees x 63 leaves, DuckDB table, engine compiled")):
        r = f[key]
        base = r["minimal"]["wall"]
        lines += [f"### {title}", "", "| contender | wall | vs minimal | steps | after the steps | target |", "|---|---:|---:|---:|---:|---|"]
        lines.append(f"| minimal script | {base:.2f} s | 1.00× | | | |")
        rows = [(n, r[n], "") for n in ("run", "backfill", "run@before", "backfill@before") if n in r]
        if key == "small" and "small_first" in f:
            rows += [(n, f["small_first"][n], ", the first big night (compiles the champion)") for n in ("run", "backfill")]
        for name, c, note in rows:
            target = targets.get((key, name)) if not note else None
            verdict = f"≤ {target}×: {'met' if c['wall'] <= target * base else 'not met'}" if target else ""
            label = f"`batchml {name.split('@')[0]}`" + (f" before ({f.get('before')})" if "@" in name else "") + note
            lines.append(f"| {label} | {c['wall']:.2f} s | {c['wall'] / base:.2f}× | {c['steps']:.2f} s | "
                         f"{c['wall'] - c['steps']:.2f} s | {verdict} |")
        if key == "small":
            lines += ["", "The champion's compiled libraries were built once before the timed runs (`batchml models compile`), "
                      "as the job's first night of this size builds them under `scoring.engine: auto` (a 2M-row night of "
                      "this 42-tree model pays for the compile); the last two rows are that first night, which pays it."]
        steps = ", ".join(f"{k} {v:.2f}" for k, v in r["run"]["timings"].items())
        bsteps = ", ".join(f"{k} {v:.2f}" for k, v in r["backfill"]["timings"].items())
        every = "; ".join(f"{name} " + ", ".join(f"{x['wall']:.2f}" + (f" ({x['steps']:.2f})" if "steps" in x else "") for x in r[name]["runs"])
                          for name in r if isinstance(r[name], dict) and "runs" in r[name])
        lines += ["", f"- run steps (s): {steps}; backfill steps (s): {bsteps}.",
                  f"- every run, wall (steps) in s: {every}." if every else "",
                  f"- nightly steps / backfill steps: {r['run']['steps'] / r['backfill']['steps']:.2f}×"
                  + (" (target ≤ 1.15×)" if key == "big" else "") + ".",
                  f"- stored scores of the run vs LightGBM predict of the champion's model.txt (up to 200,000 rows, encoded "
                  f"independently): max |Δ| = {r['run']['diff']:.1e}." if r["run"].get("diff") is not None else "", ""]
    lines.append(f"<!-- figures: {json.dumps(f)} -->")
    return "\n".join(lines) + "\n"


def main() -> None:
    """``--quick``: small sizes; ``--before DIR``: also time the batchml/ found in DIR (``git archive COMMIT batchml | tar -x -C DIR``)."""
    quick = "--quick" in sys.argv
    before = Path(sys.argv[sys.argv.index("--before") + 1]) if "--before" in sys.argv else None
    figures = measure(quick, before)
    if before is not None:
        figures["before"] = os.environ.get("BENCH_BEFORE_LABEL", str(before))
    text = markdown(figures)
    out = common.DATA / ("WHOLE-quick.md" if quick else "WHOLE.md")
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
