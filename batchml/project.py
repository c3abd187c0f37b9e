"""Where a project's files live: configs, the warehouse and everything batchml writes beside it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from batchml.config import JobConfig, Settings, load_job, load_settings


@dataclass(frozen=True)
class Project:
    """A project directory and the process settings that apply to it.

    Everything batchml writes lives beside the warehouse file: ``models/``, ``reports/``,
    ``published/`` (Parquet for analysts), ``locks/`` and ``tmp/`` (per-run scratch files).
    """

    root: Path
    settings: Settings

    @classmethod
    def open(cls, root: Path | None = None, warehouse: Path | None = None) -> Project:
        settings = load_settings(root, warehouse)
        return cls(settings.project, settings)

    @property
    def warehouse(self) -> Path:
        return self.settings.warehouse_path

    @property
    def home(self) -> Path:
        return self.warehouse.parent

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    @property
    def published(self) -> Path:
        return self.home / "published"

    @property
    def catalog(self) -> Path:
        return self.home / "catalog.duckdb"

    @property
    def locks(self) -> Path:
        return self.home / "locks"

    @property
    def scratch(self) -> Path:
        return self.home / "tmp"

    def connect(self, **kwargs):
        """A short-lived warehouse connection with this project's memory limit and lock timeout."""
        from batchml.storage.warehouse import connect

        options = {"memory_limit": self.settings.memory_limit, "lock_timeout": self.settings.lock_timeout, **kwargs}
        return connect(self.warehouse, **options)

    def job(self, name: str) -> JobConfig:
        return load_job(self.root, name)
