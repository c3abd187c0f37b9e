"""Shared fixtures: real DuckDB files in tmp_path, small seeded data, the real CLI in subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
import yaml

from batchml.demo import data as demo_data
from batchml.project import Project

REPO = Path(__file__).resolve().parents[1]
START = date(2026, 1, 1)
SHIFT_DAY = 90

os.environ.setdefault("BATCHML_THREADS", "1")  # two pytest workers share two cores


def _roomy_tmpfs(path: str = "/dev/shm", needed: int = 4 * 2**30) -> bool:
    """A writable tmpfs with room for the suite's files (a container's /dev/shm may be 64 MB)."""
    return os.path.isdir(path) and os.access(path, os.W_OK) and shutil.disk_usage(path).free >= needed


# tmp_path on tmpfs: DuckDB syncs every commit and checkpoint to disk, and on tmpfs a sync costs
# nothing (tests/test_continuous.py alone: 45.3 s wall on disk, 33.7 s on /dev/shm, the same CPU).
# The files, locks and kill -9s stay real: a killed process leaves its written pages to the kernel
# on either; only a crash of the machine, which no test makes, tells the two apart. A passing
# session's folders are removed at its end (pyproject.toml: tmp_path_retention_policy). A TMPDIR of
# your own is used as given.
if "TMPDIR" not in os.environ and _roomy_tmpfs():
    os.environ["TMPDIR"] = tempfile.tempdir = "/dev/shm"  # tempfile caches its folder: pytest asked it already


def with_overrides(config: dict, overrides: dict) -> dict:
    """``config`` with ``overrides`` merged in: ``"section.field"`` keys set one field of a section."""
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            config.setdefault(section, {})[field] = value
        else:
            config[key] = value
    return config


def job_config(**overrides) -> dict:
    """The shipped vuln_risk config, made small and fast for tests, with ``overrides`` merged in."""
    config = yaml.safe_load((REPO / "configs" / "vuln_risk.yaml").read_text())
    config["notify"] = {"email": [], "on": ["failure"]}  # YAML 1.1 reads `on` as True; we write it back as a string key
    config["training"]["params"] = {"num_leaves": 15, "learning_rate": 0.1, "num_boost_round": 60, "early_stopping_rounds": 10}
    config["promotion"]["bootstrap_resamples"] = 200
    # the test data land ~60 findings a day (the demo's 400, scaled down): judge drift on such
    # batches as before drift.min_rows existed (tests/test_recurring.py tests the minimum itself)
    config["drift"]["min_rows"] = 1
    return with_overrides(config, overrides)


@dataclass
class DemoProject:
    """A project directory with a warehouse whose source table holds synthetic findings."""

    root: Path
    findings: pa.Table

    @property
    def project(self) -> Project:
        return Project.open(self.root)

    @property
    def warehouse(self) -> Path:
        return self.root / "warehouse" / "warehouse.duckdb"

    def write_config(self, config: dict, job: str = "vuln_risk") -> Path:
        path = self.root / "configs" / f"{job}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        con = duckdb.connect(str(self.warehouse), read_only=True)
        try:
            return con.execute(sql, params or []).fetchall()
        finally:
            con.close()

    def scalar(self, sql: str, params: list | None = None):
        return self.query(sql, params)[0][0]

    def cli(self, *args: str, check: bool = False, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return run_cli("--project", str(self.root), *args, check=check, env=env, timeout=timeout)


def run_cli(*args: str, check: bool = False, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real ``batchml`` command in a subprocess."""
    full_env = {**os.environ, "BATCHML_THREADS": "1", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "batchml.cli", *args], capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"batchml {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def load_source(warehouse: Path, table: pa.Table, name: str = "raw.vuln_findings") -> None:
    from batchml.storage.warehouse import open_connection

    con = open_connection(warehouse)  # as batchml creates files: readable by the DuckDB 1.5 CLI
    try:
        schema = name.split(".")[0]
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        con.register("incoming", table)
        con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM incoming")
    finally:
        con.close()


@pytest.fixture(scope="session")
def findings() -> pa.Table:
    """150 days of findings (shift on day 90), 60 a day: small enough to train in well under a second."""
    return demo_data.generate_findings(START, 150, seed=11, rows_per_day=60, shift_day=SHIFT_DAY)


@pytest.fixture
def demo_project(tmp_path: Path, findings: pa.Table) -> DemoProject:
    project = DemoProject(tmp_path / "project", findings)
    project.write_config(job_config())
    load_source(project.warehouse, findings)
    return project


def day(n: int) -> datetime:
    """Midnight UTC of day ``n`` of the test data."""
    return datetime(START.year, START.month, START.day) + timedelta(days=n)


# --- projects after a first champion: built once per xdist worker, copied for each test ----------------
#
# Many tests start from the same state: the demo findings, then a nightly run that trains, judges and
# publishes v1. Training it, drawing its report and history page cost ~3 s a time; a copy costs ~0.2 s.


def copy_project(template: DemoProject, root: Path) -> DemoProject:
    """A copy of ``template``'s project directory at ``root`` that refers to nothing of the template.

    Two things hold absolute paths: ``batchml.models.artifact_path`` (stored absolute, for tools and
    analysts) and the catalog's views over ``published/``. Both are rewritten to the copy, as if the
    copy had been built where it lies; the test then fails if any path of the template is left."""
    from batchml.storage.publish import ensure_catalog, publish_snapshots
    from batchml.storage.warehouse import open_connection

    shutil.copytree(template.root, root)
    copy = DemoProject(root, template.findings)
    con = open_connection(copy.warehouse)
    try:
        con.execute("UPDATE batchml.models SET artifact_path = ? || substr(artifact_path, ?) WHERE starts_with(artifact_path, ?)",
                    [str(root), len(str(template.root)) + 1, f"{template.root}{os.sep}"])
        publish_snapshots(con, copy.project, ("models",))  # the published copy of batchml.models
        con.execute("CHECKPOINT")
    finally:
        con.close()
    project = copy.project
    ensure_catalog(project, [project.job(path.stem) for path in sorted((root / "configs").glob("*.yaml"))])
    left = _paths_into(copy, str(template.root))
    assert not left, f"the copy of {template.root} still refers to it: {left}"
    return copy


def _paths_into(p: DemoProject, prefix: str) -> list[str]:
    """What in ``p``'s warehouse and catalog names a path under ``prefix``."""
    found = [f"batchml.models v{version}: {path}" for version, path in p.query(
        "SELECT version, artifact_path FROM batchml.models WHERE contains(artifact_path, ?)", [prefix])]
    catalog = duckdb.connect(str(p.warehouse.parent / "catalog.duckdb"), read_only=True)
    try:
        found += [f"catalog view {name}" for (name,) in catalog.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal AND contains(sql, ?)", [prefix]).fetchall()]
        found += [f"catalog batchml.models v{version}" for (version,) in catalog.execute(
            "SELECT version FROM batchml.models WHERE contains(artifact_path, ?)", [prefix]).fetchall()]
    finally:
        catalog.close()
    return found


@pytest.fixture(scope="session")
def champion_templates(tmp_path_factory, findings):
    """``template(as_of, config)``: a project after one nightly run at ``as_of`` with ``config``
    (default: ``job_config()``), built on first use and kept for the session (of this xdist worker)."""
    from batchml.pipeline.nightly import run_job

    built: dict[tuple, DemoProject] = {}

    def template(as_of: datetime, config: dict | None = None) -> DemoProject:
        config = job_config() if config is None else config
        key = (as_of, yaml.safe_dump(config, sort_keys=True))
        if key not in built:
            project = DemoProject(tmp_path_factory.mktemp("champion") / "project", findings)
            project.write_config(config)
            load_source(project.warehouse, findings)
            run_job(project.project, config["job"], as_of=as_of, notify=False)
            built[key] = project
        return built[key]

    return template


@pytest.fixture
def champion_copy(champion_templates, tmp_path):
    """``copy(as_of=day(60), config=None)``: a project of the test's own, as a nightly run at
    ``as_of`` with ``config`` (default ``job_config()``) left it on the demo findings: champion v1,
    its scores, report, history page, published files and catalog."""
    copies = iter(range(1000))

    def copy(as_of: datetime = day(60), config: dict | None = None) -> DemoProject:
        n = next(copies)
        return copy_project(champion_templates(as_of, config), tmp_path / ("project" if n == 0 else f"project{n}"))

    return copy


@pytest.fixture
def champion_project(champion_copy) -> DemoProject:
    """``demo_project`` after ``run_job(..., as_of=day(60), notify=False)`` with the default config."""
    return champion_copy()


# --- a recurring-entity job: churn, one row per customer per weekly snapshot -----------------------

CHURN_START = datetime(2026, 1, 5)  # a Monday: snapshots are taken every Monday at 00:00


def churn_snapshots(customers: int = 250, weeks: int = 30, seed: int = 3) -> pa.Table:
    """Weekly snapshots of ``customers`` integer-keyed customers over ``weeks`` weeks: one row per
    customer per snapshot (the same customer_id every week), landed 6 hours after the snapshot, its
    label "churned within 30 days" known 30 days after it. Seeded, ~7,500 rows: trains in a second."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = np.tile(np.arange(1, customers + 1, dtype=np.int64), weeks)
    week = np.repeat(np.arange(weeks), customers)
    snapshot = np.datetime64(CHURN_START, "us") + (week * 7).astype("timedelta64[D]").astype("timedelta64[us]")
    start_week = rng.integers(-100, 0, customers)[ids - 1]
    base_spend = rng.gamma(4.0, 15.0, customers)[ids - 1]
    plan = np.array(["basic", "plus", "pro"], dtype=object)[rng.integers(0, 3, customers)][ids - 1]
    tenure = (week - start_week).astype(np.float64)
    spend = base_spend * rng.lognormal(0.0, 0.2, len(ids))
    tickets = rng.poisson(0.3 + (plan == "basic") * 0.7, len(ids)).astype(np.float64)
    logit = -1.5 - 0.02 * tenure + 0.6 * tickets - 0.01 * spend + 0.8 * (plan == "basic")
    churned = (rng.random(len(ids)) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    return pa.table({
        "customer_id": ids,
        "snapshot_at": pa.array(snapshot, pa.timestamp("us")),
        "ingested_at": pa.array(snapshot + np.timedelta64(6, "h"), pa.timestamp("us")),
        "tenure_weeks": tenure, "monthly_spend": spend, "support_tickets": tickets, "plan": plan.astype(str),
        "churned_30d": churned,
        "label_at": pa.array(snapshot + np.timedelta64(30, "D"), pa.timestamp("us")),
    })


def churn_config(**overrides) -> dict:
    """A churn job over ``raw.customer_snapshots``, small and fast for tests, with ``overrides`` merged in."""
    config = {
        "job": "churn",
        "source": {"table": "raw.customer_snapshots", "entity_id": "customer_id", "event_time": "snapshot_at",
                   "watermark": "ingested_at"},
        "features": {"numeric": ["tenure_weeks", "monthly_spend", "support_tickets"], "categorical": ["plan"]},
        "label": {"column": "churned_30d", "available_at": "label_at"},
        "training": {"window_days": 180, "holdout_days": 28, "min_train_rows": 200,
                     "params": {"num_leaves": 7, "learning_rate": 0.1, "num_boost_round": 40, "early_stopping_rounds": 10},
                     "retrain": {"every_days": 7, "on_drift": True, "min_new_labels": None, "max_decay": None}},
        "promotion": {"bootstrap_resamples": 200},
        "scoring": {"table": "scores.churn"},
        "notify": {"email": [], "on": ["failure"]},
    }
    return with_overrides(config, overrides)


@pytest.fixture(scope="session")
def snapshots() -> pa.Table:
    return churn_snapshots()


@pytest.fixture
def churn_project(tmp_path: Path, snapshots: pa.Table) -> DemoProject:
    project = DemoProject(tmp_path / "churn", snapshots)
    project.write_config(churn_config(), job="churn")
    load_source(project.warehouse, snapshots, name="raw.customer_snapshots")
    return project


# one Dask cluster per test module that asks for it (FACTS.md: LocalCluster of processes, 1 thread each)
@pytest.fixture(scope="module")
def cluster():
    import distributed

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  scheduler_kwargs={"dashboard_address": ":0"}) as local:
        yield local


@pytest.fixture(scope="module")
def one_worker():
    import distributed

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                  scheduler_kwargs={"dashboard_address": ":0"}) as local:
        yield local
