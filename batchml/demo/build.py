"""``batchml demo``: a warehouse of synthetic vulnerability findings and N replayed nights on it.

Timeline (day 0 = the first finding): a scanner upgrade and a move toward go/cargo packages happen
on ``SHIFT_DAY``; the first replayed night is 31 days later, when the first labels of shifted rows
have arrived. So the nights show the first champion being trained, drift in the shifted features,
challengers retrained on the new data, and the gate deciding whether they beat the champion.
"""

from __future__ import annotations

import shutil
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
from rich.console import Console
from rich.table import Table

from batchml.demo import data as demo_data
from batchml.errors import ConfigError
from batchml.project import Project
from batchml.reports import HISTORY_FILE
from batchml.storage import history, runlog
from batchml.storage.warehouse import create_table, migrate, table_names

JOB = "vuln_risk"
SOURCE = "raw.vuln_findings"
SHIFT_DAY = 90
FIRST_NIGHT = SHIFT_DAY + 31
# Each day's rows are drawn from a stream keyed by (seed, date): a fixed calendar makes every run,
# on any day, tell the same story (with the default seed: drift on the first night, v5 promoted on night 8)
DEMO_START = date(2026, 7, 16)
BAD_ROW_FRACTION = 0.004
DEMO_TABLES = {("raw", "vuln_findings"), ("raw", "demo_info")}
TEMPLATE = Path(__file__).parent / "project"

SQL_TO_TRY = """\
-- newest score per finding, riskiest first
SELECT finding_id, score, risk_band, model_version, reasons FROM scores.vuln_risk_latest ORDER BY score DESC LIMIT 10;
-- what each night did
SELECT as_of, status, rows_extracted, rows_quarantined, rows_scored, champion_version, promoted, dataset_drift FROM batchml.runs ORDER BY as_of;
-- drift history of one feature
SELECT r.as_of, d.method, d.statistic, d.drifted FROM batchml.drift d JOIN batchml.runs r USING (run_id) WHERE d.feature = 'cvss_base' AND d.kind = 'feature' ORDER BY r.as_of;
-- every promotion decision, with its reason
SELECT recorded_at, version, event, reason FROM batchml.model_events ORDER BY recorded_at;"""


def copy_configs(root: Path) -> None:
    """Copy the demo's configs (and job files) into ``root``, keeping any that already exist."""
    for path in TEMPLATE.rglob("*"):
        if path.is_file():
            target = root / path.relative_to(TEMPLATE)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)


def ensure_fresh(project: Project) -> None:
    """Start over, but only on a warehouse that holds nothing but an earlier demo."""
    if not project.warehouse.exists():
        return
    with project.connect(lock_timeout=5.0) as con:
        tables = table_names(con)
        jobs = runlog.jobs(con) if ("batchml", "runs") in tables else set()
    foreign = {t for t in tables if t[0] not in ("batchml", "scores") and t not in DEMO_TABLES}
    foreign |= {t for t in tables if t[0] == "scores" and not t[1].startswith(JOB)}
    if ("raw", "demo_info") not in tables or foreign or jobs - {JOB}:
        raise ConfigError(
            f"{project.warehouse} holds more than an earlier demo ({', '.join(sorted('.'.join(t) for t in foreign)) or 'other jobs'}); "
            f"run the demo in another directory: batchml demo --dir /tmp/batchml-demo"
        )
    for path in (project.warehouse, project.warehouse.with_name(project.warehouse.name + ".wal"), project.catalog):
        path.unlink(missing_ok=True)
    for folder in (project.models, project.reports, project.published, project.scratch):
        shutil.rmtree(folder, ignore_errors=True)


def load_findings(project: Project, start: date, days: int, seed: int) -> int:
    """Write the synthetic findings (every day at once: runs only see what landed before as_of)."""
    table = demo_data.generate_findings(start, days, seed=seed, shift_day=SHIFT_DAY)
    table = demo_data.inject_bad_rows(table, BAD_ROW_FRACTION, seed)
    with project.connect() as con:
        migrate(con)
        create_table(con, SOURCE, table)
        info = pa.table({"start_day": pa.array([start], pa.date32()), "seed": pa.array([seed], pa.int32()),
                         "shift_day": pa.array([SHIFT_DAY], pa.int32())})
        create_table(con, "raw.demo_info", info)
    return table.num_rows


def run_demo(root: Path, *, days: int = 14, seed: int = 7, console: Console | None = None, warehouse: Path | None = None) -> list:
    """Build the demo in ``root`` (warehouse: ``warehouse``, else the settings') and replay ``days``
    nights; returns the runs."""
    from batchml.pipeline.backfill import replay

    console = console or Console()
    if days < 1:
        raise ConfigError("--days must be at least 1")
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    project = Project.open(root, warehouse)
    ensure_fresh(project)  # before anything is copied in: a refusal leaves the directory as it was
    copy_configs(root)
    start = DEMO_START
    rows = load_findings(project, start, FIRST_NIGHT + days, seed)
    console.print(f"demo: {rows:,} synthetic findings from {start} in {project.warehouse} (scanner upgrade on {start + timedelta(days=SHIFT_DAY)})")
    table = Table("night (as of)", "rows", "quarantined", "drift", "model", "challenger", "scored", "seconds", title=f"{days} nights of {JOB}")
    timer = {"t": time.perf_counter()}

    def on_night(run) -> None:
        elapsed = time.perf_counter() - timer["t"]
        timer["t"] = time.perf_counter()
        table.add_row(*night_row(project, run, elapsed))

    first = start + timedelta(days=FIRST_NIGHT - 1)
    # with BATCHML_SMTP_HOST set, the nights mail their reports as a real deployment would
    notify = bool(project.settings.smtp_host)
    runs = replay(project, JOB, first, first + timedelta(days=days - 1), notify=notify, on_night=on_night, synthetic=True)
    console.print(table)
    console.print(f"\nScores are in {project.warehouse}. Try, with duckdb -readonly {project.catalog}:\n", highlight=False)
    console.print(SQL_TO_TRY, highlight=False, markup=False)
    history = project.reports / JOB / HISTORY_FILE
    if history.exists():
        console.print(f"\nThe {days} nights on one page (open it in a browser): {history}", highlight=False, markup=False)
    return runs


def night_row(project: Project, run, seconds: float) -> list[str]:
    drift = "-"
    if run.dataset_drift is not None:
        with project.connect(read_only=True) as con:
            n, total = history.feature_drift_count(con, run.run_id)
        drift = f"{n}/{total}" + (" DRIFT" if run.dataset_drift else "")
    challenger = "-"
    if run.challenger_version:
        challenger = f"v{run.challenger_version} " + ("promoted" if run.promoted else "kept out")
    as_of: datetime = run.as_of
    return [f"{as_of:%Y-%m-%d}", f"{run.rows_extracted:,}", str(run.rows_quarantined), drift,
            f"v{run.champion_version}" if run.champion_version else "-", challenger, f"{run.rows_scored:,}", f"{seconds:.1f}"]
