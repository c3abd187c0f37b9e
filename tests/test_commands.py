"""What the commands tell a user, through the real CLI: records that agree with the logs, the run
a report picks, the gate's word in `models list`, `runs list/show`, exit codes, suggestions,
`check`'s causes, machine-readable logs, `prune` and `--help`."""

from __future__ import annotations

import json

import pytest

from batchml import api
from conftest import DemoProject, copy_project, day, job_config
from test_cli import assert_one_line_error
from test_notify import _serve

FIRST, SECOND = "2026-03-01", "2026-03-03"  # two nights of the test data: a champion, then a challenger


@pytest.fixture(scope="module")
def ran(tmp_path_factory, champion_templates) -> DemoProject:
    """A project after two nights: v1 crowned on the first, a forced challenger judged on the second
    (in-process, as the state the commands then read: ``api.run`` is what `batchml run` calls)."""
    project = copy_project(champion_templates(day(59)), tmp_path_factory.mktemp("ran") / "project")  # the night of FIRST
    api.run("vuln_risk", project=project.root, as_of=SECOND, force_retrain=True, notify=False)
    return project


@pytest.fixture
def p(ran: DemoProject, tmp_path) -> DemoProject:
    """A copy of ``ran`` of the test's own, to change at will."""
    return copy_project(ran, tmp_path / "project")


def log_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if " INFO " in line or " WARNING " in line]


# -- 1. records agree with logs ----------------------------------------------------------------------


def test_a_drift_run_records_the_rows_it_pulled(p):
    result = p.cli("drift", "vuln_risk", "--as-of", "2026-03-05", check=True)
    logged = next(line for line in log_lines(result) if "extracted" in line)
    row = p.query("SELECT rows_extracted, rows_scored FROM batchml.runs WHERE kind = 'drift'")[0]
    assert f"extracted {row[0]} rows" in logged and row[0] > 0 and row[1] == 0


def test_a_dry_run_backfill_prints_what_it_would_do_and_writes_nothing(p):
    before = p.scalar("SELECT count(*) FROM scores.vuln_risk")
    result = p.cli("backfill", "vuln_risk", "--start", "2026-02-20", "--end", "2026-02-25", "--dry-run", check=True)
    extracted, quarantined = p.query("SELECT rows_extracted, rows_quarantined FROM batchml.runs WHERE kind = 'backfill'")[0]
    in_range = p.scalar("SELECT count(*) FROM raw.vuln_findings WHERE found_at >= '2026-02-20' AND found_at < '2026-02-26'")
    assert extracted == in_range and extracted > 0
    assert (f"dry run, {extracted} extracted, {quarantined} would be quarantined, {extracted - quarantined} would be scored"
            in result.stdout)
    assert p.scalar("SELECT count(*) FROM scores.vuln_risk") == before
    assert p.scalar("SELECT count(*) FROM batchml.quarantine WHERE run_id IN (SELECT run_id FROM batchml.runs WHERE kind = 'backfill')") == 0


def test_a_mailed_report_is_logged_once(p):
    controller, handler = _serve()
    try:
        config = job_config()
        config["notify"] = {"email": ["secops@example.com"], "on": ["failure"]}
        p.write_config(config)
        env = {"BATCHML_SMTP_HOST": "127.0.0.1", "BATCHML_SMTP_PORT": str(controller.port), "BATCHML_SMTP_STARTTLS": "false"}
        result = p.cli("report", "vuln_risk", "--send", env=env, check=True)
    finally:
        controller.stop()
    assert len(handler.envelopes) == 1
    assert sum("mailed to" in line for line in result.stderr.splitlines()) == 1, result.stderr


# -- 2. the report of the latest scheduled run ----------------------------------------------------------


def test_report_without_a_run_id_takes_the_latest_nightly_run_and_says_which(p):
    nightly = p.scalar("SELECT run_id FROM batchml.runs WHERE kind = 'nightly' ORDER BY started_at DESC LIMIT 1")
    api.drift("vuln_risk", project=p.root, as_of="2026-03-05")  # a later, ad-hoc run (what `batchml drift` calls)
    result = p.cli("report", "vuln_risk", check=True)
    assert f"run {nightly} (nightly as of {SECOND} 00:00 UTC, succeeded)" in result.stdout
    assert result.stdout.strip().endswith(f"{nightly}.html")


# -- 4. runs list / runs show ---------------------------------------------------------------------------


def test_runs_list_and_show_tell_counts_triggers_decision_and_report(p):
    runs = p.query("SELECT run_id, rows_extracted, rows_quarantined, rows_scored, challenger_version FROM batchml.runs "
                   "ORDER BY started_at")
    decision = p.scalar("SELECT event FROM batchml.model_events WHERE run_id = ? AND version = ?", [runs[1][0], runs[1][4]])
    listing = p.cli("runs", "list", "vuln_risk", check=True).stdout
    line = next(line for line in listing.splitlines() if runs[1][0] in line)
    assert line.split()[1:3] == ["nightly", "succeeded"] and f"v{runs[1][4]} {decision}" in line and "forced" in line
    assert listing.index(runs[1][0]) < listing.index(runs[0][0])  # newest first
    assert runs[0][0] not in p.cli("runs", "list", "vuln_risk", "--limit", "1", check=True).stdout

    api.report("vuln_risk", runs[1][0], project=p.root)  # (what `batchml report` calls)
    shown = p.cli("runs", "show", runs[1][0], check=True).stdout
    _, extracted, quarantined, scored, challenger = runs[1]
    assert f"{extracted} extracted, {quarantined} quarantined, {scored} scored" in shown
    assert f"report:        {p.root / 'warehouse' / 'reports' / 'vuln_risk' / runs[1][0]}.html" in shown
    assert "forced" in shown and "train" in shown.split("timings:")[1]

    missing = p.cli("runs", "show", "vuln_risk-nope")
    assert missing.returncode == 2
    assert_one_line_error(missing, "no run vuln_risk-nope", "batchml runs list")


# -- 3. models list: the gate's word ---------------------------------------------------------------------


def test_models_list_shows_the_gates_decision_difference_interval_and_reason(ran):
    event, reason, figures = ran.query("SELECT event, reason, metrics FROM batchml.model_events WHERE version = 2")[0]
    bootstrap = json.loads(figures)["bootstrap"]
    listing = ran.cli("models", "list", "vuln_risk", check=True).stdout
    first = next(line for line in listing.splitlines() if line.split()[:1] == ["v1"])
    second = next(line for line in listing.splitlines() if line.split()[:1] == ["v2"])
    assert "promoted" in first and "first champion" in first
    assert event in second and reason.split()[0] in second
    assert f"{bootstrap['diff']:+.4f} [{bootstrap['low']:+.4f}, {bootstrap['high']:+.4f}] vs v1" in second


# -- 5. a backfill says what the range already holds -----------------------------------------------------


def test_a_second_backfill_of_a_range_says_it_appends_another_copy(p):
    args = ("backfill", "vuln_risk", "--start", "2026-02-20", "--end", "2026-02-22")
    first = p.cli(*args, check=True)
    scored = p.scalar("SELECT rows_scored FROM batchml.runs WHERE kind = 'backfill'")
    earlier = p.scalar("SELECT count(*) FROM scores.vuln_risk WHERE event_time >= '2026-02-20' AND event_time < '2026-02-23' "
                       "AND run_id NOT IN (SELECT run_id FROM batchml.runs WHERE kind = 'backfill')")
    second = p.cli(*args, check=True)
    assert f"already had {earlier} score rows" in first.stdout or earlier == 0
    assert f"already had {earlier + scored} score rows" in second.stdout and f"this run appended {scored} more" in second.stdout
    assert "appends another score per row" in second.stderr
    assert p.scalar("SELECT count(*) FROM scores.vuln_risk WHERE event_time >= '2026-02-20' AND event_time < '2026-02-23'") == earlier + 2 * scored


# -- 6. replay names its days and cut-offs ----------------------------------------------------------------


def test_replay_prints_each_day_its_cut_off_and_the_days_already_done(p):
    api.replay("vuln_risk", "2026-03-03", "2026-03-03", project=p.root)  # (what `batchml backfill --replay` calls)
    result = p.cli("backfill", "vuln_risk", "--start", "2026-03-03", "--end", "2026-03-04", "--replay", check=True)
    lines = result.stdout.splitlines()
    assert "2026-03-03 (as of 2026-03-04 00:00 UTC): already replayed" in lines
    assert any(line.startswith("2026-03-04 (as of 2026-03-05 00:00 UTC): run ") for line in lines)
    assert "replayed 1 night(s), 1 already done (2026-03-03)" in lines
    assert p.query("SELECT as_of FROM batchml.runs WHERE kind = 'replay' ORDER BY as_of")[-1][0].day == 5


# -- 7. usage errors: exit 2, no run row ------------------------------------------------------------------


def test_usage_errors_exit_2_and_leave_no_run_row(p):
    runs = p.scalar("SELECT count(*) FROM batchml.runs")
    missing = p.cli("backfill", "vuln_risk", "--start", "2026-02-20", "--end", "2026-02-21", "--model-version", "9")
    assert missing.returncode == 2
    assert_one_line_error(missing, "job vuln_risk has no model v9", "batchml models list vuln_risk")
    assert p.scalar("SELECT count(*) FROM batchml.runs") == runs

    nothing = p.cli("models", "rollback", "vuln_risk")  # v1 is the only champion there has been
    assert nothing.returncode == 2
    assert_one_line_error(nothing, "replaced no earlier champion")
    assert p.cli("models", "promote", "vuln_risk", "99").returncode == 2


# -- 8, 9. did you mean; check says the real cause once ------------------------------------------------------


def test_misspelled_keys_jobs_and_columns_get_the_closest_name(p):
    config = job_config()
    config["training"]["windw_days"] = config["training"].pop("window_days")
    p.write_config(config)
    assert_one_line_error(p.cli("run", "vuln_risk"), "training.windw_days: unknown key (did you mean 'window_days'?)")
    assert_one_line_error(p.cli("run", "vuln_rsk"), "no config for job 'vuln_rsk'", "(did you mean 'vuln_risk'?)")

    config = job_config()
    config["features"]["numeric"] = ["cvss_bse" if name == "cvss_base" else name for name in config["features"]["numeric"]]
    p.write_config(config)  # cvss_base keeps its validation range: the feature, not the range, is misspelled
    run = p.cli("run", "vuln_risk", "--no-notify")
    assert run.returncode == 1
    assert_one_line_error(run, "has no column cvss_bse (did you mean 'cvss_base'?)")
    check = p.cli("check", "vuln_risk").stdout
    assert check.count("cvss_bse") == 1 and "FAIL vuln_risk: source" in check  # said once, by the source check
    assert "trains a challenger" not in check and "validation.ranges" not in check

    config = job_config()
    config["validation"]["ranges"]["cvss_bse"] = config["validation"]["ranges"].pop("cvss_base")
    p.write_config(config)  # now the range's key is the typo
    assert_one_line_error(p.cli("run", "vuln_risk"), "validation.ranges names 'cvss_bse' (did you mean 'cvss_base'?)")


def test_check_warns_about_a_warehouse_the_duckdb_15_cli_cannot_open(p, findings):
    import duckdb

    own = p.root / "warehouse" / "loaded.duckdb"
    con = duckdb.connect(str(own))  # as a user's own loader would: DuckDB's default (2.0) format
    con.register("incoming", findings)
    con.execute("CREATE SCHEMA raw; CREATE TABLE raw.vuln_findings AS SELECT * FROM incoming")
    con.close()
    loaded = p.cli("--warehouse", str(own), "check", "vuln_risk").stdout
    assert "WARNING: loaded.duckdb is in DuckDB's 2.0 storage format" in loaded and "STORAGE_VERSION 'v1.5.0'" in loaded
    assert "storage format" not in p.cli("check", "vuln_risk").stdout  # batchml's own files are readable


# -- 13. --help shows flags as flags -------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["run"], ["backfill"], ["models", "list"], ["runs", "show"]])
def test_help_shows_no_bool_type_on_any_flag(ran, command):
    help_text = ran.cli(*command, "--help", check=True).stdout
    assert "--help" in help_text and "<bool>" not in help_text


# -- 12. a rejected batch's report shows some of its bad rows ----------------------------------------------------


def test_a_rejected_batchs_report_shows_a_sample_of_its_quarantined_rows(p):
    p.write_config(job_config(validation={"ranges": {"cvss_base": [0, 5]}, "max_quarantine_fraction": 0.05}))
    assert p.cli("run", "vuln_risk", "--as-of", "2026-03-05", "--no-notify").returncode == 3
    run_id, quarantined = p.query("SELECT run_id, rows_quarantined FROM batchml.runs WHERE status = 'rejected'")[0]
    path = p.cli("report", "vuln_risk", check=True).stdout.split("report:")[1].strip()
    html = open(path).read()
    assert f"Sample of quarantined rows (10 of {quarantined:,})" in html
    entity, reason = p.query("SELECT entity_id, reason FROM batchml.quarantine WHERE run_id = ? ORDER BY entity_id LIMIT 1", [run_id])[0]
    assert f">{entity}<" in html and "cvss_base" in reason and "cvss_base" in html


# -- 10. logs for machines ------------------------------------------------------------------------------------------


def test_json_log_lines_carry_job_run_id_step_and_counts(p):
    result = p.cli("--log-format", "json", "run", "vuln_risk", "--as-of", "2026-03-05", "--no-notify", check=True)
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    run_id, extracted, quarantined, scored = p.query("SELECT run_id, rows_extracted, rows_quarantined, rows_scored "
                                                     "FROM batchml.runs ORDER BY started_at DESC LIMIT 1")[0]
    assert all(r["job"] == "vuln_risk" and r["run_id"] == run_id for r in records)
    pulled = next(r for r in records if "extracted" in r["message"])
    assert (pulled["step"], pulled["rows_extracted"], pulled["rows_quarantined"]) == ("extract", extracted, quarantined)
    done = next(r for r in records if "scored" in r["message"] and "rows_scored" in r)
    assert (done["step"], done["rows_scored"]) == ("score", scored)


# -- 11. prune -------------------------------------------------------------------------------------------------------


def test_prune_lists_first_then_removes_only_what_no_score_row_or_rollback_needs(p):
    models = p.root / "warehouse" / "models" / "vuln_risk"
    reports = p.root / "warehouse" / "reports" / "vuln_risk"
    rejected = p.scalar("SELECT version FROM batchml.models WHERE status = 'rejected'")
    (p.root / "warehouse" / "tmp" / "leftover-of-no-run").mkdir(parents=True)
    before = sorted(reports.glob("*.html"))
    assert (models / f"v{rejected}").is_dir() and before

    dry = p.cli("prune", "vuln_risk", "--keep-days", "0", check=True).stdout
    assert f"would remove model {models / f'v{rejected}'}" in dry and "keep model v1 (champion)" in dry
    assert "rerun with --yes" in dry and (models / f"v{rejected}").is_dir() and sorted(reports.glob("*.html")) == before

    assert "dry run: 0 item(s)" in p.cli("prune", "vuln_risk", "--keep-days", "3650", check=True).stdout  # all newer
    p.cli("prune", "vuln_risk", "--keep-days", "0", "--yes", check=True)
    assert not (models / f"v{rejected}").exists() and (models / "v1").is_dir()
    assert [page.name for page in reports.glob("*.html")] == ["history.html"]  # run reports go; the history page stays
    assert (p.root / "warehouse" / "tmp" / "leftover-of-no-run").is_dir()  # not a run's: left alone
    assert p.scalar("SELECT count(*) FROM batchml.models") == 2  # the registry keeps its history
    assert p.cli("run", "vuln_risk", "--as-of", "2026-03-05", "--no-notify").returncode == 0
    assert list((p.root / "warehouse" / "published" / "scores" / "vuln_risk").glob("*.parquet"))
