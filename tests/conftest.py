"""Shared fixtures: real DuckDB files in tmp_path, small seeded data, the real CLI in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
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


def job_config(**overrides) -> dict:
    """The shipped vuln_risk config, made small and fast for tests, with ``overrides`` merged in."""
    config = yaml.safe_load((REPO / "configs" / "vuln_risk.yaml").read_text())
    config["notify"] = {"email": [], "on": ["failure"]}  # YAML 1.1 reads `on` as True; we write it back as a string key
    config["training"]["params"] = {"num_leaves": 15, "learning_rate": 0.1, "num_boost_round": 60, "early_stopping_rounds": 10}
    config["promotion"]["bootstrap_resamples"] = 200
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            config.setdefault(section, {})[field] = value
        else:
            config[key] = value
    return config


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
