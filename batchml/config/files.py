"""A project's job configs on disk: reading YAML (1.2 booleans), validating it with one-line errors
that name the file and key, finding the jobs, and reading a job's feature SQL file."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from batchml.config.schema import JobConfig
from batchml.errors import ConfigError, did_you_mean


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. (YAML 1.1 reads the key ``on:`` of ``notify`` as True.)"""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def read_yaml(text: str) -> object:
    """Parse YAML with 1.2 booleans."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _format_validation_error(path: Path, exc: ValidationError) -> str:
    first = exc.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        suggestion = did_you_mean(first["loc"][-1], _keys_at(first["loc"][:-1]))
        message = f"unknown key{suggestion} (check the spelling against the config reference in README.md)"
    elif first["type"] == "missing":
        message = "required key is missing"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    where = ".".join(str(p) for p in first["loc"])  # empty for a check across sections, whose message names the keys
    return f"{path}: {where}: {message}{more}" if where else f"{path}: {message}{more}"


def _keys_at(loc: tuple) -> list[str]:
    """The keys a config section accepts, found by following ``loc`` from the top (empty where the
    path leads to no section, e.g. into a mapping of feature names)."""
    model: type[BaseModel] = JobConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        sections = [t for t in (field.annotation, *typing.get_args(field.annotation)) if isinstance(t, type)
                    and issubclass(t, BaseModel)] if field else []
        if not sections:
            return []
        model = sections[0]
    return list(model.model_fields)


def parse_job_config(data: object, path: Path) -> JobConfig:
    """Validate an already-parsed YAML document; errors name the file and key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(path, exc)) from None


def load_job_config(path: Path, job: str | None = None) -> JobConfig:
    """Read and validate one job YAML file; its ``job:`` must be ``job`` (default: the file's name,
    which a proposed config for ``batchml try``, e.g. ``vuln_risk.better.yaml``, need not share)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror}); check the path") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8 YAML") from None
    try:
        data = read_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    config = parse_job_config(data, path)
    if job is not None and config.job != job:
        raise ConfigError(f"{path}: job: is {config.job!r}, not {job!r}; propose a config of job {job}, or name the job it is for")
    if job is None and config.job != path.stem:
        raise ConfigError(f"{path}: job: is {config.job!r} but the file is named {path.name}; make them match")
    return config


def config_dir(project: Path) -> Path:
    return project / "configs"


def job_names(project: Path) -> list[str]:
    """Jobs defined in ``<project>/configs`` (every ``*.yaml`` that has a ``job:`` key)."""
    names = []
    for path in sorted(config_dir(project).glob("*.yaml")):
        try:
            data = read_yaml(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            names.append(path.stem)  # let load_job_config report it
            continue
        if isinstance(data, dict) and "job" in data:
            names.append(path.stem)
    return names


def load_job(project: Path, job: str) -> JobConfig:
    """Load ``<project>/configs/<job>.yaml``; an unknown job lists the ones that exist. A scores
    table that is another job's (or a source table) is refused here, so every command refuses it."""
    path = config_dir(project) / f"{job}.yaml"
    if not path.exists():
        names = job_names(project)
        raise ConfigError(f"no config for job {job!r} at {path}{did_you_mean(job, names)} (jobs found: {', '.join(names) or 'none'})")
    config = load_job_config(path)
    require_own_scores_table(project, config)
    return config


def require_own_scores_table(project: Path, config: JobConfig) -> str:
    """Refuse a ``scoring.table`` that another job writes (its ``_latest`` view would mix the jobs'
    rows, and the rows of one would be published as the other's) or that a job reads as its source
    (scores would be appended to raw data). Compared case-insensitively, as DuckDB resolves names."""
    mine = config.scores_table.lower()
    for other in job_names(project):
        try:
            theirs = config if other == config.job else load_job_config(config_dir(project) / f"{other}.yaml")
        except ConfigError:
            continue  # its own check reports it
        if theirs.source.table and _qualified(theirs.source.table).lower() in {mine, *(mine + s for s in SCORE_SUFFIXES)}:
            raise ConfigError(f"configs/{config.job}.yaml: scoring.table {config.scores_table} is the source table of job "
                              f"{theirs.job}; give {config.job} its own scoring.table (e.g. scores.{config.job})")
        if other == config.job:
            continue
        taken = {theirs.scores_table.lower() + suffix for suffix in ("", *SCORE_SUFFIXES)}
        if mine in taken or any(mine + suffix in taken for suffix in SCORE_SUFFIXES):
            raise ConfigError(f"jobs {config.job} and {other} both write scores to {config.scores_table}; "
                              f"give each its own scoring.table in configs/{config.job}.yaml or configs/{other}.yaml")
    return config.scores_table


SCORE_SUFFIXES = ("_latest", "_shadow", "_shadow_latest")


def _qualified(table: str) -> str:
    return table if "." in table else f"main.{table}"


def feature_sql(project: Path, config: JobConfig) -> str | None:
    """The job's feature SELECT, read from its file, or None when the job uses raw columns."""
    if config.features.sql is None:
        return None
    path = _feature_sql_file(project, config)
    try:
        with path.open("rb") as fh:
            data = fh.read(FEATURE_SQL_MAX_BYTES + 1)
        text = data.decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"features.sql: cannot read {config.features.sql} ({exc.strerror}); fix the path in configs/{config.job}.yaml") from None
    except UnicodeDecodeError:
        raise ConfigError(f"features.sql: {config.features.sql} is not UTF-8 text; save it as UTF-8") from None
    if len(data) > FEATURE_SQL_MAX_BYTES:
        raise ConfigError(f"features.sql: {config.features.sql} is larger than {FEATURE_SQL_MAX_BYTES // 1024} KiB; "
                          f"a feature SELECT is far smaller: check the path in configs/{config.job}.yaml")
    return _without_trailing_end(text)


FEATURE_SQL_MAX_BYTES = 1 << 20


def _feature_sql_file(project: Path, config: JobConfig) -> Path:
    """The feature SQL file: a regular file inside the project (symlinks resolved). Messages name the
    configured path only, never what the file holds."""
    named = config.features.sql
    root = Path(project).resolve()
    path = (root / named).resolve()
    fix = f"keep the SQL in a file under the project, e.g. jobs/{config.job}/features.sql, and name it in configs/{config.job}.yaml"
    if not path.is_relative_to(root):
        raise ConfigError(f"features.sql: {named} is outside the project {root}; {fix}")
    if not path.exists():
        raise ConfigError(f"features.sql: cannot read {named} (No such file or directory); fix the path in configs/{config.job}.yaml")
    if not path.is_file():  # a device (/dev/zero), a fifo or a folder: never read
        raise ConfigError(f"features.sql: {named} is not a regular file; {fix}")
    return path


def _without_trailing_end(sql: str) -> str:
    """The SELECT without the closing semicolon and the comment lines after it: it is wrapped in
    ``FROM (...)``, where either would break the query."""
    lines = sql.strip().splitlines()
    while lines and (not lines[-1].strip() or lines[-1].lstrip().startswith("--")):
        lines.pop()
    return "\n".join(lines).strip().rstrip(";").rstrip()
