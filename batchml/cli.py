"""The ``batchml`` command: parses arguments, calls the library, turns errors into one line.

Exit codes: 0 ok · 1 run failed · 2 bad usage or config · 3 data rejected by validation ·
4 (``try``) the candidate would not pass the gate · 75 another run of the job holds the lock.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup
from rich import box
from rich.console import Console
from rich.table import Column, Table

# numpy's OpenBLAS starts a thread per core as it loads and keeps them spinning after each matrix
# product; batchml's products are small (gate metrics, drift, estimates) and its cores belong to
# LightGBM, the compiled trees and DuckDB. One BLAS thread unless the environment says otherwise:
# set before numpy loads (with the API below; the package's __init__ and the imports above load none).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from batchml import api
from batchml.errors import BatchMLError, ConfigError, file_error, interrupted
from batchml.logcontext import ContextFilter, record_fields
from batchml.project import Project

class FlagHelpGroup(TyperGroup):
    """Shows ``--help`` as the flag it is: typer lists it as ``--help <bool>``, the type of the option
    click adds by itself, which our ``flag`` cannot reach; fixed on the group and each command it resolves."""

    def get_help_option(self, ctx):
        return _without_metavar(super().get_help_option(ctx))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None and not isinstance(command, FlagHelpGroup):
            _without_metavar(command.get_help_option(ctx))
        return command


def _without_metavar(option):
    if option is not None:
        option.metavar = ""
    return option


app = typer.Typer(cls=FlagHelpGroup, add_completion=False, no_args_is_help=True, help="Scheduled batch scoring with continuous training.")
models_app = typer.Typer(cls=FlagHelpGroup, no_args_is_help=True, help="The model registry, by hand (every change recorded with who and why).")
app.add_typer(models_app, name="models")
runs_app = typer.Typer(cls=FlagHelpGroup, no_args_is_help=True, help="A job's runs: counts, timings, triggers, the gate's decision, errors.")
app.add_typer(runs_app, name="runs")

# cron and CI read our output from files: wide enough that paths and tables are not wrapped
console = Console(width=None if sys.stdout.isatty() else 160, soft_wrap=not sys.stdout.isatty())
state = {"debug": False, "log_format": "auto", "project": None, "warehouse": None, "warehouse_given": False}
log = logging.getLogger("batchml")


def flag(*names: str, **kwargs):
    """A boolean option shown without typer's ``<bool>`` type: it takes no value (``--debug``, not ``--debug true``)."""
    return typer.Option(*names, metavar="", **kwargs)

ProjectOpt = Annotated[Optional[Path], typer.Option("--project", envvar="BATCHML_PROJECT", help="Project directory (default: current).")]
WarehouseOpt = Annotated[Optional[Path], typer.Option("--warehouse", envvar="BATCHML_WAREHOUSE", help="Warehouse file.")]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and, where known, job, run_id, step and counts."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(), "level": record.levelname,
                           "message": record.getMessage(), **record_fields(record)}, default=str)


def setup_logging(log_format: str) -> None:
    handler: logging.Handler
    if log_format == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif log_format == "rich" or (log_format == "auto" and sys.stderr.isatty()):
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False, markup=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    handler.addFilter(ContextFilter())  # on the handler: records of child loggers get the run's fields too
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"batchml {version('batchml')}", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    project: ProjectOpt = None,
    warehouse: WarehouseOpt = None,
    debug: Annotated[bool, flag("--debug", help="Show tracebacks.")] = False,
    log_format: Annotated[str, typer.Option("--log-format", help="auto | plain | rich | json")] = "auto",
    version: Annotated[bool, flag("--version", callback=show_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    source = ctx.get_parameter_source("warehouse")
    state.update(debug=debug, log_format=log_format, project=project, warehouse=warehouse,
                 warehouse_given=warehouse is not None and getattr(source, "name", "") == "COMMANDLINE")
    if log_format not in ("auto", "plain", "rich", "json"):
        raise typer.BadParameter("--log-format must be auto, plain, rich or json")
    setup_logging(log_format)


def open_project() -> Project:
    return api.open_project(state["project"], state["warehouse"])


def parse_as_of(value: str | None) -> datetime | None:
    """A bare date is 00:00 UTC of that day; a time with an offset is converted to UTC."""
    return api.cutoff(value, "--as-of")


def parse_day(value: str, option: str) -> date:
    return api.day(value, option)


def summarise_run(run) -> None:
    parts = [f"run {run.run_id}: {run.status}", f"{run.rows_extracted} extracted", f"{run.rows_quarantined} quarantined",
             f"{run.rows_scored} scored"]
    if run.dry_run:  # what it would do: nothing was written
        valid = run.rows_extracted - run.rows_quarantined
        parts = [f"run {run.run_id}: dry run", f"{run.rows_extracted} extracted", f"{run.rows_quarantined} would be quarantined",
                 f"{valid} would be scored"]
    if run.champion_version:
        parts.append(f"champion v{run.champion_version}")
    if run.challenger_version:
        parts.append(f"challenger v{run.challenger_version} {'promoted' if run.promoted else 'not promoted'}")
    if run.dataset_drift:
        parts.append("dataset drift")
    console.print(", ".join(parts), highlight=False)
    if run.note:
        console.print(f"note: {run.note}", highlight=False, markup=False)


@app.command()
def run(
    job: str,
    as_of: Annotated[Optional[str], typer.Option("--as-of", help="Cut-off (date = 00:00 UTC); default now.")] = None,
    force_retrain: Annotated[bool, flag("--force-retrain", help="Train a challenger even if no trigger fires.")] = False,
    no_notify: Annotated[bool, flag("--no-notify", help="Do not mail the report.")] = False,
    cluster: Annotated[Optional[str], typer.Option("--cluster", help="Run on this Dask scheduler (tcp://host:8786); env BATCHML_DASK_SCHEDULER.")] = None,
) -> None:
    """One nightly run of JOB.  Example: batchml run vuln_risk --as-of 2026-11-28"""
    from batchml.pipeline.locks import job_lock

    project = open_project()
    project.job(job)
    with job_lock(project.locks, job):  # a run in progress: exit 75 now, not after seconds of imports
        pass
    from batchml.pipeline.nightly import run_job

    result = run_job(project, job, as_of=parse_as_of(as_of), force_retrain=force_retrain, notify=not no_notify, cluster=cluster)
    summarise_run(result)


@app.command()
def backfill(
    job: str,
    start: Annotated[str, typer.Option("--start", help="First event day (YYYY-MM-DD).")],
    end: Annotated[str, typer.Option("--end", help="Last event day, inclusive.")],
    model_version: Annotated[Optional[int], typer.Option("--model-version", help="Score with this version (default: champion).")] = None,
    replay: Annotated[bool, flag("--replay", help="Replay the nightly run for each day, point-in-time.")] = False,
    dry_run: Annotated[bool, flag("--dry-run", help="Count what would be scored; write no scores.")] = False,
    cluster: Annotated[Optional[str], typer.Option("--cluster", help="Run on this Dask scheduler (tcp://host:8786); env BATCHML_DASK_SCHEDULER.")] = None,
) -> None:
    """Re-score rows whose event time is in [START, END], or --replay the nights of that range.

    Example: batchml backfill vuln_risk --start 2026-10-01 --end 2026-10-31
    """
    from batchml.pipeline import backfill as bf

    project = open_project()
    first, last = parse_day(start, "--start"), parse_day(end, "--end")
    if replay:
        if model_version is not None or dry_run:
            raise ConfigError("--replay runs the nightly logic; it takes neither --model-version nor --dry-run")
        skipped: list[date] = []

        def night(run) -> None:
            console.print(f"{(run.as_of - timedelta(days=1)):%Y-%m-%d} (as of {run.as_of:%Y-%m-%d %H:%M} UTC):", end=" ",
                          highlight=False)
            summarise_run(run)

        def skip(day: date, as_of: datetime) -> None:
            skipped.append(day)
            console.print(f"{day} (as of {as_of:%Y-%m-%d %H:%M} UTC): already replayed", highlight=False)

        runs = api.replay(job, first, last, project=project, on_night=night, on_skip=skip, cluster=cluster)
        done = f", {len(skipped)} already done ({', '.join(map(str, skipped))})" if skipped else ""
        console.print(f"replayed {len(runs)} night(s){done}", highlight=False)
        return
    summarise_run(bf.backfill(project, job, first, last, version=model_version, dry_run=dry_run, cluster=cluster))


@app.command()
def drift(
    job: str,
    as_of: Annotated[Optional[str], typer.Option("--as-of", help="Cut-off; default now.")] = None,
) -> None:
    """Measure drift of the rows a nightly run would pull now; writes only a 'drift' run's rows."""
    from batchml.pipeline.backfill import measure_drift
    from batchml.storage.history import drift_summary

    project = open_project()
    result = measure_drift(project, job, parse_as_of(as_of))
    with project.connect(read_only=True) as con:
        rows = drift_summary(con, result.run_id)
    table = Table("feature", "kind", "method", "statistic", "threshold", "drifted", "rows", title=f"drift of {job} ({result.run_id})")
    for r in rows:
        stat = "error: " + r["error"] if r["error"] else (f"{r['statistic']:.4f}" if r["statistic"] is not None else "-")
        table.add_row(r["feature"], r["kind"], r["method"], stat, f"{r['threshold']:.3g}" if r["threshold"] is not None else "-",
                      "yes" if r["drifted"] else "no", str(r["n_current"]))
    console.print(table)
    console.print(f"dataset drift: {'yes' if result.dataset_drift else 'no'}")
    if result.note:
        console.print(f"note: {result.note}", highlight=False, markup=False)


@app.command()
def report(
    job: str,
    run_id: Annotated[Optional[str], typer.Argument(help="Run id (default: the latest nightly or replay run).")] = None,
    send: Annotated[bool, flag("--send", help="Also mail it to notify.email.")] = False,
    history: Annotated[bool, flag("--history", help="The job's history page over all its runs instead of one run's report.")] = False,
    since: Annotated[Optional[str], typer.Option("--since", help="With --history: only runs with a cut-off from this date (YYYY-MM-DD).")] = None,
) -> None:
    """Write (and with --send, mail) the HTML report of a run, or with --history the job's history page.

    Example: batchml report vuln_risk --history --since 2026-10-01
    """
    project = open_project()
    if history:
        if run_id is not None:
            raise ConfigError("--history covers every run of the job; give it no RUN_ID (use --since to start later)")
        path = api.history(job, project=project, since=None if since is None else parse_day(since, "--since"), send=send)
        console.print(f"history: {path}", highlight=False)
        return
    if since is not None:
        raise ConfigError("--since applies to the history page: add --history")
    path = api.report(job, run_id, project=project, send=send)
    shown = api.show_run(path.stem, project=project)  # the report is named after its run
    console.print(f"run {shown['run_id']} ({shown['kind']} as of {shown['as_of']:%Y-%m-%d %H:%M} UTC, {shown['status']})",
                  highlight=False)
    console.print(f"report: {path}", highlight=False)


@app.command()
def check(job: Annotated[Optional[str], typer.Argument(help="One job (default: every job).")] = None) -> None:
    """Validate configs, feature SQL, source columns and warehouse access, running nothing."""
    from batchml.checks import check_project, summary_error

    problems = check_project(open_project(), job, echo=lambda line: console.print(line, highlight=False, markup=False))
    if problems:
        raise summary_error(problems)


@app.command("try")
def try_(
    job: str,
    config: Annotated[Optional[Path], typer.Option("--config", help="Proposed job YAML (default: configs/JOB.yaml as it is now).")] = None,
    as_of: Annotated[Optional[str], typer.Option("--as-of", help="Cut-off (date = 00:00 UTC); default: the job's watermark.")] = None,
    output: Annotated[str, typer.Option("--format", help="text | markdown | json")] = "text",
) -> None:
    """Train a candidate from a proposed config and put it through the nightly gate against the
    champion, writing nothing. Exit 0: the gate would promote it; 4: it would keep the champion.

    Example: batchml try vuln_risk --config configs/candidates/vuln_risk.better.yaml --format markdown
    """
    if output not in ("text", "markdown", "json"):
        raise ConfigError(f"--format {output!r}: use text, markdown or json")
    from batchml.errors import GateFailed, ModelError
    from batchml.pipeline.trial import to_dict, try_config
    from batchml.reports.trial import to_markdown, to_text

    data = to_dict(try_config(open_project(), job, config, parse_as_of(as_of)))
    render = {"json": lambda d: json.dumps(d, indent=2), "markdown": to_markdown, "text": to_text}[output]
    console.print(render(data), highlight=False, markup=False, soft_wrap=True)
    golden = [g for g in data["golden_set"].values() if g is not None and not g["passed"]]
    if golden:  # not the candidate's doing: the environment no longer reproduces stored scores
        raise ModelError(golden[0]["error"])
    if not data["would_promote"]:
        raise GateFailed(f"the candidate would not pass the gate: {data['reason']}")


@app.command()
def schedule(jobs: Annotated[Optional[list[str]], typer.Argument(help="Jobs to schedule (default: all).")] = None) -> None:
    """Run each job on its schedule.cron in the foreground until SIGTERM/SIGINT."""
    from batchml.pipeline.scheduler import serve

    # the runs are child processes: they log the way the daemon does, so one stream has one format
    options = ["--log-format", state["log_format"]] + (["--debug"] if state["debug"] else [])
    serve(open_project(), jobs or [], child_options=options)


@app.command()
def demo(
    dir: Annotated[Optional[Path], typer.Option("--dir", help="Project directory (default: --project or current).")] = None,
    days: Annotated[int, typer.Option("--days", help="Nights to replay.")] = 14,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the synthetic data.")] = 7,
) -> None:
    """Build a demo project with synthetic vulnerability findings and replay DAYS nights on it."""
    from batchml.demo.build import run_demo

    root = dir or state["project"] or Path.cwd()
    # --dir means a project of its own: its warehouse sits inside it, whatever BATCHML_WAREHOUSE says
    warehouse = state["warehouse"] if state["warehouse_given"] or not dir else root / "warehouse" / "warehouse.duckdb"
    run_demo(root, days=days, seed=seed, console=console, warehouse=warehouse)


@models_app.command("list")
def models_list(job: str) -> None:
    """Every version of JOB: status, trained window, rows, its own holdout's figure of the job's promotion metric."""
    from batchml.models.manage import list_models

    project = open_project()
    rows = list_models(project, job)
    metric = project.job(job).promotion.metric  # the objective's (roc_auc, rmse, multi_logloss, ...)
    table = Table(*(Column(name, no_wrap=True) for name in ("version", "status", "trained on", "rows", f"own holdout {metric}", "gate",
                                                            "vs champion [95% interval]")),
                  "reason", title=f"models of {job}", box=box.SIMPLE, pad_edge=False)
    for r in rows:
        value = (r["holdout"] or {}).get(metric)
        gate = r["gate"] or {}
        table.add_row(f"v{r['version']}", r["status"], f"{r['train_start']:%Y-%m-%d} .. {r['train_end']:%Y-%m-%d}",
                      str(r["train_rows"]), f"{value:.4f}" if value is not None else "-", gate.get("decision", "-"),
                      _versus(gate), gate.get("reason") or "-")
    console.print(table)
    console.print(f"gate: the decision on the shared holdout, where champion and challenger score the same rows; "
                  f"own holdout {metric}: each model's own holdout, not comparable across versions", highlight=False)


def _versus(gate: dict) -> str:
    if gate.get("diff") is None:
        return "-"
    return f"{gate['metric']} {gate['diff']:+.4f} [{gate['low']:+.4f}, {gate['high']:+.4f}] vs v{gate['versus']}"


@models_app.command("promote")
def models_promote(job: str, version: int, reason: Annotated[str, typer.Option("--reason", help="Why (recorded).")] = "manual promotion") -> None:
    """Make VERSION the champion of JOB."""
    from batchml.models.manage import promote

    previous = promote(open_project(), job, version, reason)
    console.print(f"{job}: v{version} is champion" + (f" (was v{previous})" if previous else ""))


@models_app.command("rollback")
def models_rollback(job: str, reason: Annotated[str, typer.Option("--reason", help="Why (recorded).")] = "manual rollback") -> None:
    """Restore the champion that the current one replaced."""
    from batchml.models.manage import rollback

    restored, retired = rollback(open_project(), job, reason)
    console.print(f"{job}: v{restored} is champion again (v{retired} archived)")


@models_app.command("compile")
def models_compile(job: str) -> None:
    """Compile and verify JOB's champion now, whatever its size (after upgrading batchml, lleaves or the CPU, or before its first big night)."""
    from batchml.models.manage import compile_champion

    model, ready, warnings = compile_champion(open_project(), job)
    for kind, path in ready.items():
        console.print(f"{job} v{model.version}: {kind} library ready ({path})")
    for warning in warnings:
        console.print(f"{job} v{model.version}: {warning}")
    if not ready and not warnings:
        console.print(f"{job} v{model.version}: scores with LightGBM (scoring.engine: lightgbm, or lleaves is not installed: nothing to compile)")


def _minutes(row: dict) -> str:
    if row["finished_at"] is None:
        return "-"
    seconds = (row["finished_at"] - row["started_at"]).total_seconds()
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}min"


def _challenger(row: dict) -> str:
    if row["challenger_version"] is None:
        return "-"
    return f"v{row['challenger_version']} {row['decision'] or ('promoted' if row['promoted'] else 'not promoted')}"


@runs_app.command("list")
def runs_list(job: str, limit: Annotated[int, typer.Option("--limit", help="How many runs, newest first.")] = 20) -> None:
    """JOB's most recent runs, newest first.  Example: batchml runs list vuln_risk --limit 5"""
    rows = api.list_runs(job, project=open_project(), limit=limit)
    if not rows:
        console.print(f"no runs of {job} yet; run `batchml run {job}`", highlight=False)
        return
    # a run id is what `runs show` and `report` take: shown whole, never cut by the console's width; triggers may wrap
    whole = [Column(name, no_wrap=True) for name in ("kind", "status", "as of (UTC)", "took", "extracted", "quarantined", "scored",
                                                      "models")]
    table = Table(Column("run", no_wrap=True, min_width=max(len(r["run_id"]) for r in rows)), *whole, Column("triggers", overflow="fold"), box=box.SIMPLE, pad_edge=False,
                  title=f"runs of {job}")
    for r in rows:
        table.add_row(r["run_id"], r["kind"] + (" (dry run)" if (r["note"] or "").startswith("dry run") else ""), r["status"],
                      f"{r['as_of']:%Y-%m-%d %H:%M}", _minutes(r), str(r["rows_extracted"]), str(r["rows_quarantined"]),
                      str(r["rows_scored"]), (f"v{r['champion_version']}" if r["champion_version"] else "-")
                      + (f", {_challenger(r)}" if r["challenger_version"] is not None else ""), ", ".join(r["triggers"]) or "-")
    console.print(table)
    console.print("details: batchml runs show RUN_ID", highlight=False)


@runs_app.command("show")
def runs_show(run_id: str) -> None:
    """One run: counts, timings per step, triggers, the gate's decision, error, note and its report."""
    r = api.show_run(run_id, project=open_project())
    lines = [
        ("run", r["run_id"]), ("job", r["job"]), ("kind", r["kind"]), ("status", r["status"]),
        ("as of", f"{r['as_of']:%Y-%m-%d %H:%M:%S} UTC"),
        ("started", f"{r['started_at']:%Y-%m-%d %H:%M:%S} UTC"),
        ("finished", f"{r['finished_at']:%Y-%m-%d %H:%M:%S} UTC ({_minutes(r)})" if r["finished_at"] else "-"),
        ("rows", f"{r['rows_extracted']} extracted, {r['rows_quarantined']} quarantined, {r['rows_scored']} scored"),
        ("watermark", f"{r['watermark_from'] or '-'} -> {r['watermark_to'] or '-'}"),
        ("champion", f"v{r['champion_version']}" if r["champion_version"] else "-"),
        ("triggers", ", ".join(r["triggers"]) or "-"),
        ("challenger", _challenger(r)),
        ("decision", r["decision_reason"] or "-"),
        ("dataset drift", {True: "yes", False: "no", None: "-"}[r["dataset_drift"]]),
        ("timings", ", ".join(f"{step} {seconds:.2f}s" for step, seconds in r["timings"].items()) or "-"),
        ("error", r["error"] or "-"), ("note", r["note"] or "-"),
        ("report", str(r["report"]) if r["report"] else f"not written; `batchml report {r['job']} {r['run_id']}` writes it"),
        ("by", f"{r['actor']} on {r['host']} (pid {r['pid']})"),
    ]
    for name, value in lines:
        console.print(f"{name + ':':<15}{value}", highlight=False, markup=False)


COMMON_OPTIONS = {"--project": True, "--warehouse": True, "--log-format": True, "--debug": False}  # option -> takes a value


def hoist_common_options(argv: list[str]) -> list[str]:
    """Move the common options before the command, so `batchml run JOB --project DIR` works as
    well as `batchml --project DIR run JOB` (click only accepts them before the command)."""
    front, rest, i = [], [], 0
    while i < len(argv):
        name, _, inline = argv[i].partition("=")
        if name in COMMON_OPTIONS:
            takes_value = COMMON_OPTIONS[name] and not inline
            front.extend(argv[i:i + 1 + takes_value])
            i += 1 + takes_value
        else:
            rest.append(argv[i])
            i += 1
    return front + rest


def usage_error(exc: Exception) -> tuple[str, int] | None:
    """A command-line usage error (missing argument, unknown option, bad value) as one line and its
    exit code (2), else None. Recognised by shape: typer raises click's exceptions, from the click
    package or, in typer >= 0.22, from its own bundled copy (``typer._click``)."""
    if not (hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)):
        return None
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None)
    message = " ".join(str(exc.format_message()).split())
    return (f"{message} (see `{command} --help`)" if command and message else message), exc.exit_code


def print_error(message: str) -> None:
    """The one line a command ends in on error: never wrapped by the console's width and its
    message's own line breaks (DuckDB's errors have several) folded, so logs and greps get one line."""
    Console(stderr=True).print(f"error: {' '.join(message.split())}", highlight=False, markup=False, soft_wrap=True)


@app.command()
def prune(
    job: str,
    keep_days: Annotated[int, typer.Option("--keep-days", help="Keep what is newer than this many days.")] = 90,
    yes: Annotated[bool, flag("--yes", help="Remove what is listed (without it: only list it).")] = False,
) -> None:
    """List (with --yes, remove) what JOB's history no longer needs: old model folders no score row or
    rollback needs, old run reports, scratch folders of finished runs. Never a champion, a table row
    or the published Parquet the catalog's views read.  Example: batchml prune vuln_risk --keep-days 30"""
    found = api.prune(job, project=open_project(), keep_days=keep_days, delete=yes)
    for removal in found.removals:
        console.print(f"{'removed' if yes else 'would remove'} {removal.kind} {removal.path} ({removal.why})",
                      highlight=False, markup=False)
    for version, why in sorted(found.kept_models.items()):
        console.print(f"keep model v{version} ({why})", highlight=False, markup=False)
    total = len(found.removals)
    if yes:
        console.print(f"removed {total} item(s) older than {found.cutoff:%Y-%m-%d %H:%M} UTC", highlight=False)
    else:
        console.print(f"dry run: {total} item(s) older than {found.cutoff:%Y-%m-%d %H:%M} UTC would be removed; "
                      f"rerun with --yes to remove them", highlight=False)


def main() -> None:
    """Entry point: run the app; map errors to one line and an exit code."""
    try:
        # without standalone mode, click hands back (not raises) the code of an interrupt: 130
        code = app(args=hoist_common_options(sys.argv[1:]), standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except BatchMLError as exc:
        if interrupted(exc):
            sys.exit(130)
        if state["debug"]:
            traceback.print_exc()
        print_error(str(exc))
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        Console(stderr=True).print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:  # a full disk or a read-only folder wherever batchml writes: the file, why, the fix
        if interrupted(exc):
            sys.exit(130)
        if state["debug"]:
            traceback.print_exc()
        print_error(str(file_error(exc, "use")))
        sys.exit(1)
    except Exception as exc:  # a usage error or a bug
        if interrupted(exc):  # Ctrl-C inside a DuckDB query, which DuckDB reports as its own error
            sys.exit(130)
        usage = usage_error(exc)
        if usage is not None:
            if usage[0]:  # empty when the command's help was shown instead (a group without its command)
                print_error(usage[0])
            sys.exit(usage[1])
        if state["debug"]:
            raise
        print_error(f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
