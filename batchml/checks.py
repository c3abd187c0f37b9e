"""``batchml check``: configs, feature SQL, source columns, warehouse access and the champion's
golden set — validated without running anything or writing to the warehouse."""

from __future__ import annotations

from collections.abc import Callable

from batchml import registry
from batchml.config import job_names, load_job_config
from batchml.errors import BatchMLError, ConfigError
from batchml.extract import describe_source
from batchml.project import Project
from batchml.retrain import check_golden
from batchml.warehouse import memory_connection, table_exists


def check_project(project: Project, job: str | None, echo: Callable[[str], None]) -> int:
    """Check one job or all; prints a line per check and returns the number of problems."""
    names = [job] if job else job_names(project.root)
    if not names:
        raise ConfigError(f"no job configs in {project.root / 'configs'}; add configs/<job>.yaml")
    problems = 0
    for name in names:
        problems += _check_job(project, name, echo)
    return problems


def _check_job(project: Project, name: str, echo: Callable[[str], None]) -> int:
    problems = 0
    for label, check in _checks(project, name):
        try:
            detail = check()
        except BatchMLError as exc:
            echo(f"FAIL {name}: {label}: {exc}")
            problems += 1
            if label == "config":
                return problems  # nothing else can be checked without it
        else:
            echo(f"ok   {name}: {label}" + (f" ({detail})" if detail else ""))
    return problems


def _checks(project: Project, name: str):
    state: dict = {}

    def config():
        state["config"] = load_job_config(project.root / "configs" / f"{name}.yaml")
        return f"{len(state['config'].features.all)} features"

    def source():
        cfg = state["config"]
        if cfg.source.parquet:
            with memory_connection() as con:
                columns = describe_source(con, cfg, project.root)
        else:
            if not project.warehouse.exists():
                raise ConfigError(f"warehouse {project.warehouse} does not exist; load {cfg.source.table} into it first")
            with project.connect(read_only=True, lock_timeout=5.0) as con:
                columns = describe_source(con, cfg, project.root)
        return f"{len(columns)} source columns, all required ones present"

    def champion():
        cfg = state["config"]
        if not project.warehouse.exists():
            return "no warehouse yet"
        with project.connect(read_only=True, lock_timeout=5.0) as con:
            row = registry.champion(con, cfg.job) if table_exists(con, "batchml.models") else None
        if row is None:
            return "no champion yet"
        rows, worst = check_golden(registry.load(row))
        return f"v{row['version']} hashes match; golden set of {rows} rows re-scored, largest difference {worst:.1e}"

    return [("config", config), ("source", source), ("champion", champion)]
