"""Registry changes by hand: list, promote, rollback — each recorded with who and why; and
compiling the champion again after an upgrade."""

from __future__ import annotations

import json
from pathlib import Path

from batchml.models import registry
from batchml.storage import model_rows
from batchml.errors import ConfigError, ModelError
from batchml.pipeline.locks import job_lock
from batchml.project import Project
from batchml.storage.publish import publish_change
from batchml.storage.warehouse import migrate, transaction

# what a change of champion touches: the analysts' catalog reads champion_history from model_events
REGISTRY_TABLES = ("models", "model_events")


def list_models(project: Project, job: str) -> list[dict]:
    project.job(job)
    if not project.warehouse.exists():  # nothing has run yet; connecting would create an empty warehouse
        return []
    with project.connect() as con:
        migrate(con)
        rows = model_rows.list_models(con, job)
        decisions = model_rows.gate_decisions(con, job)
    for row in rows:
        metrics = json.loads(row["metrics"] or "{}")
        row["holdout"] = metrics.get("holdout") or {}
        row["gate"] = _gate(decisions.get(row["version"]))
    return rows


def _gate(event: dict | None) -> dict | None:
    """The gate's decision on a version: ``decision``, ``reason``, ``versus`` (the champion of the
    time), ``metric`` and the paired bootstrap of its difference (``diff``, ``low``, ``high``)."""
    if event is None:
        return None
    figures = json.loads(event["metrics"] or "{}")
    bootstrap = figures.get("bootstrap") or {}
    return {"decision": event["event"], "reason": event["reason"], "versus": event["previous_champion"],
            "metric": figures.get("metric"), "diff": bootstrap.get("diff"), "low": bootstrap.get("low"), "high": bootstrap.get("high")}


def promote(project: Project, job: str, version: int, reason: str) -> int | None:
    """Make ``version`` the champion (its artifact is verified first); returns the previous one."""
    def chosen(con) -> dict:
        row = model_rows.get(con, job, version)
        if row is None:
            raise ConfigError(f"job {job} has no model v{version}; see `batchml models list {job}`")
        if row["status"] == registry.CHAMPION:
            raise ConfigError(f"v{version} is already the champion of {job}")
        return row

    _, previous = _crown(project, job, chosen, "manual_promote", reason)
    return previous


def rollback(project: Project, job: str, reason: str) -> tuple[int, int]:
    """Restore the champion the current one replaced; returns (restored, retired)."""
    def chosen(con) -> dict:
        current = model_rows.champion(con, job)
        if current is None:  # nothing to roll back is a usage error (exit 2), like promoting a missing version
            raise ConfigError(f"job {job} has no champion to roll back")
        previous = model_rows.previous_champion(con, job, current["version"])
        if previous is None:
            raise ConfigError(f"v{current['version']} of {job} replaced no earlier champion; promote a version by hand instead")
        return model_rows.get(con, job, previous)

    restored, retired = _crown(project, job, chosen, "rollback", reason)
    return restored["version"], retired


def _crown(project: Project, job: str, choose, event: str, reason: str) -> tuple[dict, int | None]:
    """A champion change by hand, under the job's lock: ``choose`` picks the model's row (or raises),
    its artifact is verified, it is crowned with ``event`` and the catalog republished; then its
    compiled libraries are built. Returns (the crowned row, the champion it replaced)."""
    project.job(job)
    with job_lock(project.locks, job), project.connect() as con:
        migrate(con)
        row = choose(con)
        registry.verify(row)
        with transaction(con):
            previous = model_rows.make_champion(con, job, row["version"], event, run_id=None, reason=reason)
        publish_change(con, project, job, REGISTRY_TABLES)
    compile_and_register(project, registry.load(row), project.job(job).scoring.engine)
    return row, previous


def compile_and_register(project: Project, model: registry.LoadedModel, engine: str, warn=None, every_size: bool = False) -> None:
    """What a promotion builds for ``model`` (its compiled libraries; ``every_size``: small models
    too), with their sha256 registered in the warehouse: a library is loaded later only if it is the
    one registered."""
    from batchml.models.scoring import prepare_engine  # LightGBM: only for a change of champion, not `models list`

    prepare_engine(model, engine, warn=warn, every_size=every_size)
    if model.unregistered:
        with project.connect() as con:
            model_rows.register_libraries(con, model.job, model.version, model.take_unregistered())


def compile_champion(project: Project, job: str) -> tuple[registry.LoadedModel, dict[str, Path], list[str]]:
    """Build the champion's compiled libraries now, whatever its size (unless ``scoring.engine`` is
    ``lightgbm``; reason-code tables are built from model.txt on load). For after an upgrade of
    batchml, lleaves or LLVM, a move to another CPU or installing the ``compiled`` extra — each gives
    libraries a new key, and nightly runs in ``auto`` compile only a small model scoring a big batch
    — or before a model's first big night. Returns the model, the verified libraries by kind and
    the warnings (why a library is missing)."""
    from batchml.models import compiled

    config = project.job(job)
    with project.connect() as con:
        migrate(con)
        row = model_rows.champion(con, job)
    if row is None:
        raise ModelError(f"job {job} has no champion yet; run it once first")
    model = registry.load(row)
    warnings: list[str] = []
    compile_and_register(project, model, config.scoring.engine, warn=warnings.append, every_size=True)
    ready = {kind.name: path for kind in (compiled.SCORES, compiled.LEAVES) if (path := compiled.CachePaths.of(model, kind).library).exists()}
    return model, ready, warnings
