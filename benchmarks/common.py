"""Shared pieces of the benchmarks: the 35-feature data, the bench job, its model, the machine.

Data: the demo's synthetic findings (``demo_data.generate_rows``: 7 numeric + 4 categorical
features and the label) plus 24 numeric columns — 8 derived from the demo's features, 16 noise —
so 35 features in all. Generated once per size into ``benchmarks/.data/`` (git-ignored) as Parquet
chunks of ``CHUNK_ROWS`` rows, reused by later runs.

Model: trained by batchml itself (``retrain.train_candidate`` on rows in the normalised schema),
no early stopping, so it has exactly ``trees`` trees of up to ``leaves`` leaves; cached under
``benchmarks/.data/models/`` keyed by its settings and reused by later runs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent
DATA = ROOT / ".data"
REPO = ROOT.parent
PYTHON = sys.executable

DATA_VERSION = 1  # bump when the generated columns change: cached rows and models are keyed by it
JOB = "bench"
SOURCE = "raw.findings"
T0 = dt.datetime(2026, 3, 1)  # new rows are found in [T0, T0 + 30 days); the run's cut-off is T0 + 31 days
AS_OF = T0 + dt.timedelta(days=31)
TRAIN_START = T0 - dt.timedelta(days=70)  # training rows: found 70-40 days before T0, labeled before T0

DEMO_NUMERIC = ["cvss_base", "epss", "days_since_published", "dependency_depth", "downloads_log", "n_references", "internet_exposed"]
DERIVED = ["cvss_x_epss", "log_days_published", "refs_per_depth", "exposed_x_cvss",
           "downloads_sq", "epss_logit", "depth_x_downloads", "cvss_centered"]
NOISE = [f"noise_{i:02d}" for i in range(1, 17)]
NUMERIC = DEMO_NUMERIC + DERIVED + NOISE
CATEGORICAL = ["ecosystem", "severity", "attack_vector", "asset_criticality"]
FEATURES = NUMERIC + CATEGORICAL
assert len(FEATURES) == 35


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How big each benchmark is; ``quick`` keeps ``run.py --quick`` within ~3 minutes."""

    quick: bool
    rows: int  # end-to-end scoring rows
    rss_rows: tuple[int, ...]  # peak-RSS runs
    chunk: int  # rows per generated Parquet chunk
    trees: int
    leaves: int
    train_rows: int  # rows the scoring model is trained on
    training_rows: int  # rows of the training-overhead benchmark
    contrib_rows: int  # rows TreeSHAP is timed on (extrapolated to ``rows``)

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        if quick:
            return cls(True, 200_000, (100_000, 200_000, 400_000), 100_000, 100, 63, 50_000, 50_000, 500)
        return cls(False, 2_000_000, (1_000_000, 2_000_000, 4_000_000), 1_000_000, 300, 63, 200_000, 200_000, 2_000)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _column(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.float64(), from_pandas=True)  # NaN -> null, as a warehouse holds it


def _num(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.cast(table.column(name), pa.float64()), np.nan).to_numpy(zero_copy_only=False))


def add_columns(table: pa.Table, seed: int) -> pa.Table:
    """The 24 extra numeric columns: 8 derived from the demo's features, 16 noise (some with nulls)."""
    cvss, epss, days = _num(table, "cvss_base"), _num(table, "epss"), _num(table, "days_since_published")
    depth, downloads, refs = _num(table, "dependency_depth"), _num(table, "downloads_log"), _num(table, "n_references")
    exposed = _num(table, "internet_exposed")
    clipped = np.clip(epss, 1e-5, 1 - 1e-5)
    derived = {
        "cvss_x_epss": cvss * epss, "log_days_published": np.log1p(days), "refs_per_depth": refs / (1.0 + depth),
        "exposed_x_cvss": exposed * cvss, "downloads_sq": downloads**2, "epss_logit": np.log(clipped / (1 - clipped)),
        "depth_x_downloads": depth * downloads, "cvss_centered": cvss - 6.5,
    }
    rng = np.random.default_rng(seed + 1_000_003)
    n = table.num_rows
    shapes = [lambda: rng.normal(0, 1, n), lambda: rng.uniform(0, 100, n), lambda: rng.lognormal(0, 1, n), lambda: rng.poisson(4, n).astype(float)]
    for i, name in enumerate(NOISE):
        values = shapes[i % 4]()
        if i % 5 == 0:
            values[rng.random(n) < 0.02] = np.nan
        derived[name] = values
    for name in DERIVED + NOISE:
        table = table.append_column(name, _column(derived[name]))
    return table


def make_rows(n: int, seed: int, start: dt.datetime, first_id: int = 1) -> pa.Table:
    """``n`` findings with all 35 features, ids from ``first_id``, found over 30 days from ``start``."""
    from batchml.demo import data as demo_data

    table = add_columns(demo_data.generate_rows(n, seed=seed, start=start), seed)
    ids = pa.array(np.arange(first_id, first_id + n, dtype=np.int64))
    return table.set_column(table.schema.get_field_index("finding_id"), "finding_id", ids)


def row_chunks(total: int, chunk: int, seed: int = 7, row_group: int | None = None) -> list[Path]:
    """Parquet chunks holding ``total`` new rows (found in [T0, T0 + 30 d)), generated on first use
    (``row_group``: rows per row group; None: pyarrow's default, one row group per 1M-row chunk)."""
    folder = DATA / f"rows-v{DATA_VERSION}-s{seed}-c{chunk}{f'-g{row_group}' if row_group else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(-(-total // chunk)):
        path = folder / f"{i:03d}.parquet"
        if not path.exists():
            temp = path.with_suffix(".tmp")
            pq.write_table(make_rows(chunk, seed + i, T0, first_id=i * chunk + 1), str(temp), row_group_size=row_group)
            os.replace(temp, path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# The bench job
# --------------------------------------------------------------------------------------------


def job_config(sizes: Sizes, **scoring) -> dict:
    """The bench job: 35 features, no retraining triggers, ``scoring`` overrides merged in."""
    return {
        "job": JOB,
        "description": "benchmark: 35-feature findings",
        "source": {"table": SOURCE, "entity_id": "finding_id", "event_time": "found_at", "watermark": "ingested_at"},
        "features": {"numeric": NUMERIC, "categorical": CATEGORICAL},
        "label": {"column": "exploited_30d", "available_at": "label_at"},
        "validation": {"ranges": {"cvss_base": [0, 10], "epss": [0, 1], "dependency_depth": [0, 50]},
                       "max_null_fraction": {"epss": 0.2}},
        "training": {
            "window_days": 365, "holdout_days": 5,
            "params": {"num_leaves": sizes.leaves, "learning_rate": 0.05, "num_boost_round": sizes.trees, "early_stopping_rounds": 0},
            "retrain": {"every_days": None, "on_drift": False, "min_new_labels": None, "max_decay": None},
        },
        "scoring": {"table": f"scores.{JOB}", "reasons": 3, "reason_bands": ["high"], "engine": "compiled", **scoring},
        "notify": {"email": [], "on": ["failure"]},
    }


def write_config(root: Path, config: dict) -> None:
    path = root / "configs" / f"{JOB}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def load_config(config: dict):
    from batchml.config import parse_job_config

    return parse_job_config(config, Path(f"{JOB}.yaml"))


def normalised_rows(config: dict, source_rows: pa.Table, scratch: Path) -> pa.Table:
    """``source_rows`` as a run sees them: pulled through batchml's extract (normalised, checked)."""
    import duckdb

    from batchml.data.extract import read_run_file
    from batchml.storage.source import pull

    scratch.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    try:
        con.execute("CREATE SCHEMA raw")
        con.register("incoming", source_rows)
        con.execute(f"CREATE TABLE {SOURCE} AS SELECT * FROM incoming")
        result = pull(con, load_config(config), scratch, "TRUE", scratch / "normalised.arrow")
    finally:
        con.close()
    return read_run_file(result.path)


# --------------------------------------------------------------------------------------------
# The scoring model (trained once, cached)
# --------------------------------------------------------------------------------------------


def scoring_model(sizes: Sizes, seed: int = 3) -> dict:
    """The registry row of a ``trees`` x ``leaves`` champion trained by batchml (cached on disk)."""
    from batchml.models import retrain

    folder = DATA / "models" / f"v{DATA_VERSION}-{sizes.trees}x{sizes.leaves}-{sizes.train_rows}-s{seed}"
    row_file = folder / "registry_row.json"
    if row_file.exists():
        return _read_row(row_file)
    shutil.rmtree(folder, ignore_errors=True)
    config = job_config(sizes)
    train = normalised_rows(config, make_rows(sizes.train_rows, seed, TRAIN_START), folder / "scratch")
    candidate = retrain.train_candidate(load_config(config), train, folder, 1, T0)
    shutil.rmtree(folder / "scratch")
    row = candidate.registry_row(JOB, "bench-training", T0, "challenger")
    row_file.write_text(json.dumps(row, default=str))
    return _read_row(row_file)


def _read_row(path: Path) -> dict:
    row = json.loads(path.read_text())
    for name in ("created_at", "train_start", "train_end"):
        row[name] = dt.datetime.fromisoformat(row[name])
    return row


def loaded_model(row: dict):
    """The champion as a run loads it: with its verified compiled libraries registered (else a cached
    library is refused and compiled again)."""
    from batchml.models import registry

    return registry.load({**row, registry.LIBRARIES: {b["file"]: b["sha256"] for b in verified_libraries(row)}})


def verified_libraries(row: dict) -> list[dict]:
    """The champion's compiled libraries built and verified before the timings, as a promotion
    registers them: a run loads only a registered library (else it refuses it and compiles again,
    which for the 300-tree model is a minute inside every timed run)."""
    from batchml.models.registry import sha256_file

    built = []
    for record_path in sorted((Path(row["artifact_path"]) / "compiled").glob("*.json")):
        record, library = json.loads(record_path.read_text()), record_path.with_suffix(".so")
        if record.get("status") == "verified" and library.exists() and sha256_file(library) == record.get("library_sha256"):
            built.append({"kind": record["kind"], "file": library.name, "sha256": record["library_sha256"]})
    return built


def build_warehouse(path: Path, chunks: list[Path], row: dict, memory_limit: str = "4GB") -> None:
    """A warehouse holding the new rows in ``raw.findings`` and ``row`` registered as champion."""
    from batchml.storage import model_rows
    from batchml.storage.warehouse import migrate, open_connection, transaction

    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(path.name + "*"):
        stale.unlink()
    con = open_connection(path, memory_limit=memory_limit)
    try:
        migrate(con)
        files = ", ".join(f"'{c}'" for c in chunks)
        con.execute("CREATE SCHEMA IF NOT EXISTS raw")
        con.execute(f"CREATE TABLE {SOURCE} AS SELECT * FROM read_parquet([{files}]) ORDER BY ingested_at")
        with transaction(con):
            model_rows.register(con, row)
            model_rows.register_libraries(con, JOB, row["version"], verified_libraries(row))
            model_rows.make_champion(con, JOB, row["version"], "promoted", run_id=None, reason="benchmark champion", at=T0)
        con.execute("CHECKPOINT")
    finally:
        con.close()


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def best_of(repeats: int, fn) -> tuple[float, object]:
    """Fastest of ``repeats`` calls (seconds) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def load_average() -> str:
    """The machine's load average (1, 5, 15 min), to print beside figures measured on a shared machine."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def peak_rss_mb() -> float:
    """This process's peak resident set size (MiB).

    ``VmHWM`` belongs to the process's own address space, so it starts afresh at ``exec``;
    ``getrusage().ru_maxrss`` does not (a worker inherits its parent's peak), so it is the fallback.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def spawn(args: list[str], env: dict | None = None, timeout: float = 1800) -> dict:
    """Run a worker (``python <script> --worker ...``) in a fresh process; its last stdout line is JSON."""
    done = subprocess.run([PYTHON, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"worker {' '.join(args[:3])} exited {done.returncode}: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt_s(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.2f} s"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if a and b else "n/a"


def speed(seconds: float, baseline: float) -> str:
    """``seconds`` against ``baseline`` in words: '2.10× faster' or '1.30× slower'."""
    if not seconds or not baseline:
        return "n/a"
    return f"{baseline / seconds:.2f}× faster" if seconds <= baseline else f"{seconds / baseline:.2f}× slower"


# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    """What the figures were measured on."""
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": round(_ram_gb(), 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        **{name: _version(name) for name in ("lightgbm", "duckdb", "polars", "pyarrow", "numpy", "lleaves", "llvmlite", "pandas")},
        "load_average": " / ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
