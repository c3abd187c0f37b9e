"""Process-wide settings from the environment (``BATCHML_*``), never from a job's YAML."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from batchml.config.schema import DEFAULT_MEMORY_LIMIT
from batchml.errors import ConfigError


class Settings(BaseSettings):
    """Process-wide settings from the environment (never from job YAML)."""

    model_config = SettingsConfigDict(env_prefix="BATCHML_", extra="ignore")

    project: Path = Field(Path("."), description="Project directory holding configs/, jobs/ and warehouse/.")
    warehouse: Path | None = Field(None, description="Warehouse file; default <project>/warehouse/warehouse.duckdb.")
    memory_limit: str = Field(
        DEFAULT_MEMORY_LIMIT,
        description="DuckDB memory_limit. DuckDB keeps scanned data in memory up to it, so it sets how peak RSS grows with the "
        "batch: a 4M-row run peaked at 714 MB with 256MB (1M rows: 667 MB), 981 MB with 512MB, 1.2 GB with 2GB, at the same "
        "speed (benchmarks/RESULTS.md). Raise it for feature SQL with large joins or aggregations (DuckDB spills to disk beyond it).",
    )
    lock_timeout: float = Field(60.0, ge=0, description="Seconds to keep retrying while another process holds the warehouse file.")
    report_templates: Path | None = Field(
        None, description="A folder of the team's own report templates (theme.html, layout.html, ...), relative to the project; "
        "a template found there replaces batchml's own of the same name.")
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    smtp_ssl: bool = False
    smtp_from: str = "batchml@localhost"

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit(cls, v: str) -> str:
        if v == DEFAULT_MEMORY_LIMIT:
            return v
        from batchml.storage.warehouse import memory_limit_problem  # storage imports config: imported here

        problem = memory_limit_problem(v)
        if problem:
            raise ValueError(f"{v!r} is not a size DuckDB takes ({problem}), e.g. 256MB, 4GB or 50%")
        return v

    @property
    def warehouse_path(self) -> Path:
        return (self.warehouse or self.project / "warehouse" / "warehouse.duckdb").resolve()

    @property
    def templates_path(self) -> Path | None:
        return None if self.report_templates is None else (self.project / self.report_templates).resolve()


def load_settings(project: Path | None = None, warehouse: Path | None = None) -> Settings:
    """Settings from the environment, with explicit CLI values taking precedence."""
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"environment variable BATCHML_{str(first['loc'][0]).upper()}: {first['msg']}") from None
    updates = {}
    if project is not None:
        updates["project"] = project
    if warehouse is not None:
        updates["warehouse"] = warehouse
    settings = settings.model_copy(update=updates)
    return settings.model_copy(update={"project": Path(os.path.abspath(settings.project))})


def thread_count(rows: int | None = None) -> int:
    """Threads for LightGBM: ``BATCHML_THREADS`` or every core, but one for small inputs.

    OpenMP threads spin while they wait; on a busy 2-core machine two threads training on 30k rows
    were 3x slower than one (1.8 s vs 0.5 s for 120 rounds), so small work stays single-threaded.
    """
    configured = os.environ.get("BATCHML_THREADS")
    limit = int(configured) if configured and configured.isdigit() and int(configured) > 0 else (os.cpu_count() or 1)
    if rows is not None and rows < SMALL_WORK_ROWS:
        return 1
    return limit


SMALL_WORK_ROWS = 100_000
