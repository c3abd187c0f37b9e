"""``batchml check``: configs, feature SQL, source columns, warehouse access and the champion's
golden set — validated without running anything or writing to the warehouse."""

from __future__ import annotations

import os
from collections.abc import Callable

from batchml.models import registry
from batchml.storage import model_rows
from batchml.config import job_names, load_job_config, require_own_scores_table, with_model_classes
from batchml.models.objectives import objective_of
from batchml.errors import BatchMLError, ConfigError, DataError, ModelError, WarehouseError
from batchml.storage.source import describe_source, null_watermarks, odd_labels, restrict, uncut_columns
from batchml.project import Project
from batchml.models.retrain import check_golden, describe_change, retrain_then_promote
from batchml.storage.warehouse import memory_connection, readable_by_duckdb_15, storage_fix, table_exists
from batchml.storage.writeback import require_entity_type


def check_project(project: Project, job: str | None, echo: Callable[[str], None]) -> list[BatchMLError]:
    """Check one job or all; prints a line per check and returns the problems found."""
    names = [job] if job else job_names(project.root)
    if not names:
        raise ConfigError(f"no job configs in {project.root / 'configs'}; add configs/<job>.yaml")
    problems: list[BatchMLError] = []
    for name in names:
        problems += _check_job(project, name, echo)
    return problems


def summary_error(problems: list[BatchMLError]) -> BatchMLError:
    """The error ``check`` ends with: a ConfigError (exit 2, as ``run`` would) when a config is wrong."""
    kind = ConfigError if any(isinstance(problem, ConfigError) for problem in problems) else BatchMLError
    return kind(f"{len(problems)} problem(s) found")


def _check_job(project: Project, name: str, echo: Callable[[str], None]) -> list[BatchMLError]:
    problems = []
    for label, check in _checks(project, name):
        try:
            detail = check()
        except BatchMLError as exc:
            echo(f"FAIL {name}: {label}: {exc}")
            problems.append(exc)
            if label == "config":
                return problems  # nothing else can be checked without it
        else:
            echo(f"ok   {name}: {label}" + (f" ({detail})" if detail else ""))
    return problems


def _shared_scores_table(project: Project, config) -> str:
    """Refuse a scores table another job writes too, or a source table (as every command does)."""
    return f"scores go to {require_own_scores_table(project.root, config)}"


def _source_report(con, config, project: Project, state: dict) -> str:
    restrict(con, config, project.root)  # as a run reads it: the job's SQL reaches no other file
    columns = describe_source(con, config, project.root)
    state["columns"] = columns  # the champion check asks whether it can still be fed
    watermark = config.source.watermark
    unpulled = null_watermarks(con, config, project.root)
    if unpulled:  # a batch is a watermark interval: such rows are in none, neither scored nor quarantined
        raise DataError(f"{unpulled} source row(s) have a null {watermark} (source.watermark) and are never pulled; "
                        f"fill it in the source (when the row was loaded)")
    detail = f"{len(columns)} source columns, all required ones present"
    uncut = uncut_columns(con, config, project.root)
    if uncut:  # the SQL derives them: batchml cannot hide later rows and labels from its aggregates
        detail += (f"; WARNING: {config.features.sql} derives {', '.join(uncut)}, so `source` is not cut off at a run's "
                   f"cut-off by them: compare them with getvariable('batchml_as_of') in the SQL (see batchml's jobs/README.md)")
    config = with_model_classes(config, _champion_classes(con, config))
    odd, values = odd_labels(con, config, project.root, "true")
    if odd and config.label.objective == "binary":  # as a run does: left out as unlabeled, which is worth knowing, not a reason to stop
        detail += (f"; WARNING: {odd} row(s) have a {config.label.column} (label.column) other than 0/1 "
                   f"({', '.join(f'{v:g}' for v in values)}): runs leave them out as unlabeled; map the label to 0/1")
    elif odd:
        detail += "; WARNING: " + objective_of(config.label.objective).odd_labels_message(odd, values, config.label.column).replace(
            " in the training window", "")
    return detail


def _champion_classes(con, config) -> list[str] | None:
    """A multiclass champion's classes (``model.json``), which runs hold every later label to."""
    if config.label.objective != "multiclass" or config.label.classes or not table_exists(con, "batchml.models"):
        return None
    row = model_rows.champion(con, config.job)
    return registry.manifest_field(row, "classes") if row else None



def _champion_fed(model: registry.LoadedModel, config, columns: dict[str, str] | None) -> None:
    """Fail when the champion needs a column the source (through features.sql) no longer has: every
    run would fail at scoring. ``columns`` is None when the source check failed (it says why)."""
    missing = [name for name in model.spec.features if columns is not None and name not in columns]
    if missing:
        raise DataError(f"champion v{model.version} needs {', '.join(missing)}, which the source no longer has, so runs fail "
                        f"until a model without them is champion: {retrain_then_promote(config.job)}")


def _scores_take_the_ids(con, config, columns: dict[str, str] | None) -> None:
    """Fail when the scores table's entity id type is no longer the source's: every run would fail at its commit."""
    entity = config.source.entity_id
    if columns is not None and entity in columns and table_exists(con, config.scores_table):
        require_entity_type(con, config, config.scores_table, columns[entity])


def _runs_can_write(project: Project) -> str:
    """Fail when a run could not write what it writes (the warehouse, its .wal, locks, run files,
    models, reports, published files): ``check`` opens the warehouse read-only, so it would pass."""
    home = project.home
    existing = home
    while not existing.exists() and existing != existing.parent:  # a first run creates the folders
        existing = existing.parent
    places = [project.warehouse, home, project.locks, project.scratch, project.models, project.reports, project.published]
    blocked = [str(place) for place in places if place.exists() and not os.access(place, os.W_OK)]
    if not home.exists() and not os.access(existing, os.W_OK):
        blocked.append(str(existing))
    if blocked:
        raise WarehouseError(f"runs cannot write: {', '.join(blocked)} read-only for user {registry.actor()}; let that user "
                             f"write there (or move the warehouse: --warehouse / BATCHML_WAREHOUSE), then check again")
    return f"runs can write {home}"


def _registered_libraries(model: registry.LoadedModel) -> str:
    """Fail when a compiled library beside the champion is not the one registered in the warehouse:
    runs refuse it (and score with LightGBM); someone or something replaced it."""
    from batchml.models import compiled

    found = []
    for kind in (compiled.SCORES, compiled.LEAVES):
        library = compiled.CachePaths.of(model, kind).library
        if not library.exists():
            continue
        digest = registry.sha256_file(library)
        if model.libraries.get(library.name) != digest:
            raise ModelError(f"compiled library {library} (sha256 {digest[:12]}) is not the one registered for v{model.version} "
                             f"in batchml.compiled_libraries; runs refuse it and score with LightGBM: remove it and run "
                             f"`batchml models compile {model.job}`")
        found.append(kind.name)
    return f"; compiled libraries registered ({', '.join(found)})" if found else ""


def _checks(project: Project, name: str):
    state: dict = {}

    def config():
        state["config"] = load_job_config(project.root / "configs" / f"{name}.yaml")
        return f"{len(state['config'].features.all)} features"

    def source():
        cfg = state["config"]
        if cfg.source.parquet:
            with memory_connection() as con:
                return _source_report(con, cfg, project, state)
        if not project.warehouse.exists():
            raise ConfigError(f"warehouse {project.warehouse} does not exist; load {cfg.source.table} into it first")
        with project.connect(read_only=True, lock_timeout=5.0) as con:
            detail = _source_report(con, cfg, project, state)
            if not readable_by_duckdb_15(con):  # the README's SQL examples use that CLI
                detail += f"; WARNING: {storage_fix(project.warehouse)}"
            return detail

    def champion():
        cfg = state["config"]
        if not project.warehouse.exists():
            return "no warehouse yet"
        with project.connect(read_only=True, lock_timeout=5.0) as con:
            row = model_rows.champion(con, cfg.job) if table_exists(con, "batchml.models") else None
            _scores_take_the_ids(con, cfg, state.get("columns"))
        if row is None:
            return "no champion yet"
        model = registry.load(row)
        rows, worst = check_golden(model)
        _champion_fed(model, cfg, state.get("columns"))
        detail = f"v{row['version']} hashes match; golden set of {rows} rows re-scored, largest difference {worst:.1e}"
        detail += _registered_libraries(model)
        change = describe_change(cfg, model.spec, model.version)
        if change and "columns" not in state:  # the source check failed: that is why runs fail, said there once
            return detail
        return f"{detail}; {change}: the next run trains a challenger" if change else detail

    def schedule():
        from batchml.pipeline.scheduler import job_trigger  # APScheduler is imported only here

        cfg = state["config"]
        job_trigger(cfg)
        return f"{cfg.schedule.cron!r} in {cfg.schedule.timezone}"

    def mail():  # a note, not a failure: a machine without SMTP may be meant to mail nothing
        cfg, settings = state["config"], project.settings
        if not cfg.notify.email:
            return "no recipients (notify.email): reports are written, not mailed"
        if not settings.smtp_host:
            return "notify.email is set but BATCHML_SMTP_HOST is not: reports will NOT be mailed from here"
        return f"reports go to {', '.join(cfg.notify.email)} through {settings.smtp_host}:{settings.smtp_port}"

    return [("config", config), ("scores table", lambda: _shared_scores_table(project, state["config"])),
            ("schedule", schedule), ("warehouse", lambda: _runs_can_write(project)), ("source", source), ("champion", champion),
            ("mail", mail)]
