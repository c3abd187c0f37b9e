"""``batchml prune``: what a job's history no longer needs, found first and removed only when asked.

Removed (older than the cut-off ``keep_days`` before now):
- model version folders of ``archived`` or ``rejected`` versions that no score row refers to
  (``scores.<job>``, ``<job>_shadow``) and that are not the rollback target of the champion: their
  registry rows and events stay, so the history still says what each version was and why it lost;
- HTML reports of runs (``reports/<job>/<run_id>.html``; ``history.html`` is kept);
- run scratch folders (``tmp/<run_id>/``) of runs that are no longer running, whatever their age.

Never removed: the champion, a challenger, a version a score row or a rollback needs, any table
row, and the published Parquet files: every one of them is history a catalog view serves
(``scores.<job>`` is the append-only score history; drift, quarantine and performance are per run),
and publishing would write a missing one again.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from batchml.config import JobConfig
from batchml.models import registry
from batchml.storage import model_rows
from batchml.project import Project
from batchml.storage.warehouse import fetch_dicts, quote_table, table_exists


@dataclass
class Removal:
    kind: str  # model | report | scratch
    path: Path
    why: str

    @property
    def size(self) -> int:
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


@dataclass
class PrunePlan:
    job: str
    cutoff: datetime
    removals: list[Removal] = field(default_factory=list)
    kept_models: dict[int, str] = field(default_factory=dict)  # version -> why it stays


def plan(con, project: Project, config: JobConfig, keep_days: int) -> PrunePlan:
    """What ``prune`` would remove now; reads the warehouse, changes nothing."""
    found = PrunePlan(config.job, registry.utcnow() - timedelta(days=keep_days))
    _models(con, config, found)
    _reports(con, project, config, found)
    _scratch(con, project, found)
    return found


def apply(found: PrunePlan) -> None:
    for removal in found.removals:
        if removal.path.is_dir():
            shutil.rmtree(removal.path)
        else:
            removal.path.unlink(missing_ok=True)


def _scored_versions(con, config: JobConfig) -> set[int]:
    versions: set[int] = set()
    for table in (config.scores_table, f"{config.scores_table}_shadow"):
        if table_exists(con, table):
            versions |= {row[0] for row in con.execute(f"SELECT DISTINCT model_version FROM {quote_table(table)}").fetchall()}
    return versions


def _models(con, config: JobConfig, found: PrunePlan) -> None:
    rows = model_rows.list_models(con, config.job)
    scored = _scored_versions(con, config)
    champion = next((row for row in rows if row["status"] == registry.CHAMPION), None)
    rollback_to = model_rows.previous_champion(con, config.job, champion["version"]) if champion else None
    for row in rows:
        version, folder = row["version"], Path(row["artifact_path"])
        if row["status"] not in ("archived", "rejected"):
            found.kept_models[version] = row["status"]
        elif version in scored:
            found.kept_models[version] = "score rows refer to it"
        elif version == rollback_to:
            found.kept_models[version] = "`models rollback` restores it"
        elif row["created_at"] >= found.cutoff:
            found.kept_models[version] = "newer than the cut-off"
        elif folder.is_dir():
            found.removals.append(Removal("model", folder, f"v{version} {row['status']}, no score row refers to it"))


def _reports(con, project: Project, config: JobConfig, found: PrunePlan) -> None:
    folder = project.reports / config.job
    if not folder.is_dir():
        return
    old = {row["run_id"]: row["started_at"] for row in fetch_dicts(
        con, "SELECT run_id, started_at FROM batchml.runs WHERE job = ? AND started_at < ?", [config.job, found.cutoff])}
    for path in sorted(folder.glob("*.html")):
        if path.stem in old:
            found.removals.append(Removal("report", path, f"run started {old[path.stem]:%Y-%m-%d}"))


def _scratch(con, project: Project, found: PrunePlan) -> None:
    if not project.scratch.is_dir():
        return
    finished = {row["run_id"]: row["status"] for row in fetch_dicts(
        con, "SELECT run_id, status FROM batchml.runs WHERE job = ? AND status <> 'running'", [found.job])}
    for path in sorted(project.scratch.iterdir()):
        if path.is_dir() and path.name in finished:
            found.removals.append(Removal("scratch", path, f"run {finished[path.name]}"))
