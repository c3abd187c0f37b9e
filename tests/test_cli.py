"""The real ``batchml`` command in subprocesses: exit codes, one-line errors, a second job from YAML alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from batchml.errors import ConfigError
from conftest import REPO, day, job_config, run_cli


def assert_one_line_error(result, *fragments: str) -> None:
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_check_then_models_list_after_a_run(champion_copy):
    demo_project = champion_copy(day(59))  # after the nightly run of 2026-03-01 (the run command has tests of its own)
    check = demo_project.cli("check", "vuln_risk", check=True)
    assert "golden set" in check.stdout and "FAIL" not in check.stdout
    assert "ok   vuln_risk: mail (no recipients (notify.email)" in check.stdout
    demo_project.write_config(job_config(notify={"email": ["team@example.com"], "on": ["failure"]}))
    unsent = demo_project.cli("check", "vuln_risk", check=True, env={"BATCHML_SMTP_HOST": ""})
    assert "BATCHML_SMTP_HOST is not: reports will NOT be mailed from here" in unsent.stdout
    listing = demo_project.cli("models", "list", "vuln_risk", check=True)
    assert "v1" in listing.stdout and "champion" in listing.stdout


def test_an_unknown_config_key_is_one_line_naming_file_and_key(demo_project):
    config = job_config()
    config["training"]["windw_days"] = 30
    path = demo_project.write_config(config)

    result = demo_project.cli("run", "vuln_risk")

    assert result.returncode == 2
    assert_one_line_error(result, str(path), "training.windw_days", "unknown key")


def test_config_errors_name_what_is_wrong(demo_project):
    cases = {
        "source.entity_id": ("missing", None),
        "features.numeric": ("bad identifier", ["cvss; DROP TABLE x"]),
        "promotion.metric": ("wrong value", "accuracy"),
    }
    for key, (_, value) in cases.items():
        config = job_config()
        section, field = key.split(".")
        if value is None:
            del config[section][field]
        else:
            config[section][field] = value
        demo_project.write_config(config)
        result = demo_project.cli("check", "vuln_risk")
        assert result.returncode == 2
        assert key in result.stdout + result.stderr, (key, result.stdout, result.stderr)


def test_bad_yaml_and_unknown_job_and_bad_date_exit_2(demo_project):
    (demo_project.root / "configs" / "vuln_risk.yaml").write_text("job: vuln_risk\nsource: [unclosed\n")
    assert_one_line_error(demo_project.cli("run", "vuln_risk"), "invalid YAML", "line")
    assert demo_project.cli("run", "vuln_risk").returncode == 2
    unknown = demo_project.cli("run", "nope")
    assert unknown.returncode == 2
    assert_one_line_error(unknown, "no config for job 'nope'")
    demo_project.write_config(job_config())
    bad_date = demo_project.cli("run", "vuln_risk", "--as-of", "yesterday")
    assert bad_date.returncode == 2
    assert_one_line_error(bad_date, "--as-of")


def test_missing_source_column_is_named(demo_project):
    demo_project.write_config(job_config(features={"numeric": ["cvss_base", "no_such_column"], "categorical": []},
                                         validation={"ranges": {"cvss_base": [0, 10]}}))
    result = demo_project.cli("run", "vuln_risk")
    assert result.returncode == 1
    assert_one_line_error(result, "no_such_column", "raw.vuln_findings")


def test_a_second_job_with_string_ids_and_a_parquet_source_works_from_yaml_alone(tmp_path, findings):
    """Different names, string ids, Parquet files, feature SQL: nothing but YAML and SQL written."""
    root = tmp_path / "churn_project"
    landing = root / "landing"
    landing.mkdir(parents=True)
    renamed = pa.table({
        "customer": pc.binary_join_element_wise("c-", pc.cast(findings.column("finding_id"), pa.string()), ""),
        "happened": findings.column("found_at"),
        "loaded": findings.column("ingested_at"),
        "tenure": findings.column("days_since_published"),
        "spend": findings.column("cvss_base"),
        "plan": findings.column("ecosystem"),
        "churned": findings.column("exploited_30d"),
        "known": findings.column("label_at"),
    })
    half = renamed.num_rows // 2
    pq.write_table(renamed.slice(0, half), landing / "part-1.parquet")
    pq.write_table(renamed.slice(half), landing / "part-2.parquet")
    (root / "jobs" / "churn").mkdir(parents=True)
    (root / "jobs" / "churn" / "features.sql").write_text(
        "SELECT *, spend / (tenure + 1) AS spend_rate FROM source WHERE customer IS NOT NULL")
    config = {
        "job": "churn",
        "source": {"parquet": "landing/*.parquet", "entity_id": "customer", "event_time": "happened", "watermark": "loaded"},
        "features": {"numeric": ["tenure", "spend", "spend_rate"], "categorical": ["plan"], "sql": "jobs/churn/features.sql"},
        "label": {"column": "churned", "available_at": "known"},
        "training": {"params": {"num_boost_round": 40, "early_stopping_rounds": 10}},
        "scoring": {"table": "scores.churn", "reasons": 2, "reason_bands": None},
    }
    (root / "configs").mkdir()
    (root / "configs" / "churn.yaml").write_text(yaml.safe_dump(config))

    run_cli("--project", str(root), "run", "churn", "--as-of", "2026-03-01", "--no-notify", check=True)
    run_cli("--project", str(root), "run", "churn", "--as-of", "2026-03-05", "--no-notify", check=True)

    con = duckdb.connect(str(root / "warehouse" / "warehouse.duckdb"), read_only=True)
    try:
        types = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'churn'").fetchall())
        n, distinct, first = con.execute("SELECT count(*), count(DISTINCT customer), min(customer) FROM scores.churn").fetchone()
        reasons = con.execute("SELECT reasons FROM scores.churn WHERE reasons IS NOT NULL LIMIT 1").fetchone()[0]
    finally:
        con.close()
    assert types["customer"] == "VARCHAR" and first.startswith("c-")
    assert n == distinct > 0
    assert len(reasons) == 2 and {r["feature"] for r in reasons} <= {"tenure", "spend", "spend_rate", "plan"}


def test_demo_builds_a_project_and_refuses_a_foreign_warehouse(tmp_path):
    # --dir is a project of its own: a BATCHML_WAREHOUSE meant for another project does not apply
    elsewhere = tmp_path / "elsewhere.duckdb"
    result = run_cli("demo", "--dir", str(tmp_path / "demo"), "--days", "2", check=True, timeout=240,
                     env={"BATCHML_WAREHOUSE": str(elsewhere)})
    assert "2 nights of vuln_risk" in result.stdout and not elsewhere.exists()
    con = duckdb.connect(str(tmp_path / "demo" / "warehouse" / "warehouse.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM scores.vuln_risk").fetchone()[0] > 1000
    finally:
        con.close()

    foreign = tmp_path / "foreign"
    (foreign / "warehouse").mkdir(parents=True)
    con = duckdb.connect(str(foreign / "warehouse" / "warehouse.duckdb"))
    con.execute("CREATE TABLE sales AS SELECT 1 AS amount")
    con.close()
    refused = run_cli("demo", "--dir", str(foreign), "--days", "1")
    assert refused.returncode == 2
    assert_one_line_error(refused, "holds more than an earlier demo")
    assert not (foreign / "configs").exists()  # refused before anything was copied in
    con = duckdb.connect(str(foreign / "warehouse" / "warehouse.duckdb"), read_only=True)
    assert con.execute("SELECT amount FROM sales").fetchone() == (1,)
    con.close()


def test_shipped_config_is_the_demo_template():
    shipped = (REPO / "configs" / "vuln_risk.yaml").read_text()
    template = (REPO / "batchml" / "demo" / "project" / "configs" / "vuln_risk.yaml").read_text()
    assert shipped == template


def test_report_command_writes_an_html_file(champion_copy):
    demo_project = champion_copy(day(59))  # after the nightly run of 2026-03-01
    result = demo_project.cli("report", "vuln_risk", check=True)
    path = Path(result.stdout.split("report:")[1].strip())
    assert path.exists() and "<html" in path.read_text()
    runs = demo_project.query("SELECT run_id FROM batchml.runs")
    assert path.stem == runs[0][0]
    assert json.loads(demo_project.scalar("SELECT timings FROM batchml.runs"))["score"] > 0


def test_json_logs_for_log_shippers_and_tracebacks_only_with_debug(demo_project):
    result = demo_project.cli("--log-format", "json", "run", "vuln_risk", "--as-of", "2026-03-01", "--no-notify", check=True)
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "message"} <= set(r) for r in records)
    assert any("scored" in r["message"] for r in records)

    demo_project.write_config(job_config(features={"numeric": ["nope"], "categorical": []}, validation={}))
    plain = demo_project.cli("run", "vuln_risk")
    debug = demo_project.cli("--debug", "run", "vuln_risk")
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr
    assert plain.returncode == debug.returncode == 1


def test_common_options_work_before_or_after_the_command(demo_project):
    from batchml.cli import hoist_common_options

    assert hoist_common_options(["run", "j", "--project", "p", "--debug", "--warehouse=w"]) == ["--project", "p", "--debug", "--warehouse=w", "run", "j"]
    after = run_cli("run", "vuln_risk", "--as-of", "2026-03-01", "--no-notify", "--project", str(demo_project.root), check=True)
    assert "succeeded" in after.stdout


def test_models_compile_rebuilds_what_a_promotion_builds(champion_copy):
    import shutil

    pytest.importorskip("lleaves", reason="needs the compiled extra: pip install 'batchml[compiled]'")
    demo_project = champion_copy(day(59), job_config(**{"scoring.engine": "compiled"}))  # a first run on compiled trees
    folder = next((demo_project.root / "warehouse" / "models" / "vuln_risk").glob("v1"))
    built = sorted(p.name for p in folder.rglob("*.so"))
    assert len(built) == 2 and any(name.endswith("-leaves.so") for name in built)
    shutil.rmtree(folder / "compiled", ignore_errors=True)
    demo_project.write_config(job_config())  # engine auto, which would not compile this small model itself: asked for, it does

    result = demo_project.cli("models", "compile", "vuln_risk", check=True)

    assert sorted(p.name for p in folder.rglob("*.so")) == built
    assert "scores library ready" in result.stdout and "leaves library ready" in result.stdout
    missing = demo_project.cli("models", "compile", "nope")
    assert missing.returncode == 2 and "nope" in missing.stderr


def test_the_shipped_feature_sql_example_checks_out(demo_project):
    example = REPO / "jobs" / "vuln_risk" / "features.sql"
    (demo_project.root / "jobs" / "vuln_risk").mkdir(parents=True)
    # ending in a comment: the SQL is wrapped in FROM (...), whose closing parenthesis it must not hide
    (demo_project.root / "jobs" / "vuln_risk" / "features.sql").write_text(example.read_text().rstrip().rstrip(";") + " -- the end")
    config = job_config()
    config["features"]["sql"] = "jobs/vuln_risk/features.sql"
    config["features"]["numeric"] += ["exploit_pressure", "references_log"]
    demo_project.write_config(config)

    result = demo_project.cli("check", "vuln_risk", check=True)

    assert "ok   vuln_risk: source" in result.stdout and "WARNING" not in result.stdout

    # a watermark the SQL makes itself cannot cut `source` off at a run's cut-off: check says so
    sql = demo_project.root / "jobs" / "vuln_risk" / "features.sql"
    sql.write_text(f"SELECT *, ingested_at AS loaded_at FROM ({example.read_text().rstrip().rstrip(';')})")
    config["source"]["watermark"] = "loaded_at"
    demo_project.write_config(config)
    derived = demo_project.cli("check", "vuln_risk", check=True)
    assert "WARNING: jobs/vuln_risk/features.sql derives loaded_at, so `source` is not cut off" in derived.stdout


def test_feature_sql_mistakes_point_at_the_sql_file(demo_project):
    (demo_project.root / "jobs" / "vuln_risk").mkdir(parents=True)
    sql = demo_project.root / "jobs" / "vuln_risk" / "features.sql"
    config = job_config()
    config["features"]["sql"] = "jobs/vuln_risk/features.sql"
    demo_project.write_config(config)

    sql.write_text("SELECT *, FROM FROM source")
    broken = demo_project.cli("run", "vuln_risk", "--no-notify")
    assert broken.returncode == 1
    assert_one_line_error(broken, "through jobs/vuln_risk/features.sql", "fix the SQL in jobs/vuln_risk/features.sql")

    sql.write_text("SELECT *, cvss_base / severity AS ratio FROM source")  # as after a column turned into text
    mistyped = demo_project.cli("run", "vuln_risk", "--no-notify")
    assert_one_line_error(mistyped, "through jobs/vuln_risk/features.sql", "a source column no longer fits the SQL in "
                          "jobs/vuln_risk/features.sql (renamed, or its type changed")

    sql.write_text("SELECT finding_id, found_at, ingested_at, exploited_30d, label_at FROM source")
    narrow = demo_project.cli("run", "vuln_risk", "--no-notify")
    assert_one_line_error(narrow, "the SELECT in jobs/vuln_risk/features.sql", "has no column cvss_base")

    # closing the wrapping query to run a statement of its own is refused before anything runs
    sql.write_text("SELECT * FROM source) ; CREATE TABLE main.pwned AS SELECT 42 AS x; SELECT * FROM (SELECT * FROM source")
    injected = demo_project.cli("run", "vuln_risk", "--no-notify")
    assert injected.returncode == 2
    assert_one_line_error(injected, "must hold one SELECT over `source`", "CREATE")
    assert demo_project.scalar("SELECT count(*) FROM information_schema.tables WHERE table_name = 'pwned'") == 0


def test_labels_other_than_0_or_1_are_left_out_and_named(demo_project):
    con = duckdb.connect(str(demo_project.warehouse))
    odd = con.execute("UPDATE raw.vuln_findings SET exploited_30d = -1 WHERE finding_id % 10 = 0 AND exploited_30d IS NOT NULL").fetchone()[0]
    con.close()

    run = demo_project.cli("run", "vuln_risk", "--as-of", "2026-03-01", "--no-notify")
    check = demo_project.cli("check", "vuln_risk")

    assert run.returncode == 0, run.stderr  # a placeholder for "unknown" must not stop the nightly runs
    assert re.search(r"WARNING vuln_risk: \d+ row\(s\) in the training window have a exploited_30d \(label.column\) other than "
                     r"0/1 \(-1\) and were left out as unlabeled", run.stderr), run.stderr
    assert demo_project.scalar("SELECT train_rows FROM batchml.models WHERE version = 1") > 0
    assert odd > 0
    assert check.returncode == 0  # a run goes on without them: check says so, it does not fail
    assert re.search(r"WARNING: \d+ row\(s\) have a exploited_30d \(label.column\) other than 0/1 \(-1\)", check.stdout)


def test_a_memory_limit_duckdb_cannot_take_is_named_with_its_variable(demo_project):
    for wrong in ("lots", "4000000000"):  # no number; a number without a unit
        result = demo_project.cli("check", "vuln_risk", env={"BATCHML_MEMORY_LIMIT": wrong})
        assert result.returncode == 2
        assert_one_line_error(result, "BATCHML_MEMORY_LIMIT", f"'{wrong}' is not a size DuckDB takes")
    assert demo_project.cli("check", "vuln_risk", env={"BATCHML_MEMORY_LIMIT": "1G"}).returncode == 0  # DuckDB's own shorthand


def test_time_and_label_columns_of_the_wrong_type_are_refused_up_front(demo_project):
    for section, field, column, role in [("source", "watermark", "severity", "source.watermark"),
                                          ("label", "column", "ecosystem", "label.column")]:
        config = job_config()
        config[section][field] = column
        config["features"]["categorical"].remove(column)  # a time or label column cannot be a feature as well
        demo_project.write_config(config)
        result = demo_project.cli("run", "vuln_risk", "--no-notify")
        assert result.returncode == 1
        assert_one_line_error(result, f"{column} ({role}) is VARCHAR")
        check = demo_project.cli("check", "vuln_risk")
        assert check.returncode == 1 and "FAIL vuln_risk: source" in check.stdout


def test_a_date_watermark_is_refused_for_the_rows_it_would_lose(demo_project):
    con = duckdb.connect(str(demo_project.warehouse))
    con.execute("ALTER TABLE raw.vuln_findings ALTER ingested_at TYPE DATE")
    con.close()
    result = demo_project.cli("run", "vuln_risk", "--no-notify")
    assert result.returncode == 1
    assert_one_line_error(result, "ingested_at (source.watermark) is DATE, not a TIMESTAMP (a DATE loses the rows landing after a run")


def test_a_warehouse_in_a_missing_folder_is_a_typo_not_a_new_warehouse(demo_project, tmp_path):
    missing = tmp_path / "no" / "such" / "warehouse.duckdb"
    result = demo_project.cli("--warehouse", str(missing), "run", "vuln_risk", "--no-notify")
    assert result.returncode == 2
    assert_one_line_error(result, f"the folder of warehouse {missing} does not exist")
    assert not (tmp_path / "no").exists()


def test_before_the_first_champion_drift_says_so_and_models_list_creates_nothing(tmp_path, demo_project):
    empty = tmp_path / "empty"
    (empty / "configs").mkdir(parents=True)
    (empty / "configs" / "vuln_risk.yaml").write_text((demo_project.root / "configs" / "vuln_risk.yaml").read_text())
    listing = run_cli("--project", str(empty), "models", "list", "vuln_risk")
    assert listing.returncode == 0 and not (empty / "warehouse" / "warehouse.duckdb").exists()

    drift = demo_project.cli("drift", "vuln_risk")
    assert drift.returncode == 1
    assert_one_line_error(drift, "no champion yet, so there is no reference to measure drift against")
    assert demo_project.query("SELECT rows_extracted FROM batchml.runs WHERE kind = 'drift'") == [(0,)]  # nothing pulled


def test_flags_are_shown_as_taking_no_value(demo_project):
    help_text = demo_project.cli("run", "--help", check=True).stdout
    line = next(line for line in help_text.splitlines() if "--force-retrain" in line)
    assert "<bool>" not in line and "Train a challenger" in line


def test_usage_mistakes_are_one_line_and_exit_2(demo_project):
    for args, fragment in [(["run"], "Missing argument"), (["bogus"], "No such command"),
                           (["run", "vuln_risk", "--bogus"], "No such option: --bogus"),
                           (["demo", "--days", "abc"], "--days"), (["models", "list"], "Missing argument"),
                           (["backfill", "vuln_risk", "--start", "2026-01-01"], "--end")]:
        result = demo_project.cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert_one_line_error(result, fragment)


def test_a_cut_off_in_the_future_is_refused(demo_project):
    future = demo_project.cli("run", "vuln_risk", "--as-of", "2999-01-01", "--no-notify")
    assert future.returncode == 2
    assert_one_line_error(future, "--as-of 2999-01-01 00:00 UTC is in the future")
    replay = demo_project.cli("backfill", "vuln_risk", "--start", "2999-01-01", "--end", "2999-01-02", "--replay")
    assert replay.returncode == 2
    assert_one_line_error(replay, "--end 2999-01-02", "in the future")


def test_check_exits_2_for_config_mistakes_and_catches_shared_tables_and_bad_schedules(demo_project):
    demo_project.write_config(job_config())
    other = job_config(job="other", schedule={"cron": "0 2 1 * 1", "timezone": "UTC"})
    demo_project.write_config(other, job="other")
    third = job_config(job="third")
    del third["scoring"]["table"]  # the default, scores.third: its own
    demo_project.write_config(third, job="third")

    result = demo_project.cli("check")

    assert result.returncode == 2
    assert "FAIL other: scores table: jobs other and vuln_risk both write scores to scores.vuln_risk" in result.stdout
    assert "FAIL other: schedule" in result.stdout and "day of month or day of week" in result.stdout
    assert "ok   third: scores table (scores go to scores.third)" in result.stdout
    (demo_project.root / "configs" / "other.yaml").write_bytes(b"job: other\n\xa8\xff garbage")
    garbage = demo_project.cli("run", "other")
    assert garbage.returncode == 2
    assert_one_line_error(garbage, "other.yaml: not UTF-8 text")


def test_check_finds_rows_that_no_batch_will_ever_pull(demo_project):
    demo_project.write_config(job_config())
    con = duckdb.connect(str(demo_project.warehouse))
    con.execute("INSERT INTO raw.vuln_findings SELECT * REPLACE (NULL AS ingested_at) FROM raw.vuln_findings LIMIT 2")
    con.close()

    result = demo_project.cli("check", "vuln_risk")

    assert result.returncode == 1
    assert "FAIL vuln_risk: source: 2 source row(s) have a null ingested_at (source.watermark) and are never pulled" in result.stdout


@pytest.mark.parametrize(("error", "code", "start"), [
    (RuntimeError, 1, "error: RuntimeError: a bug that explains itself at length"),
    (ConfigError, 2, "error: a bug that explains itself at length"),
])
def test_an_error_ends_in_one_line_however_long(monkeypatch, capsys, error, code, start):
    from batchml import cli

    def fail(**_):
        raise error("a bug that explains itself at length, " * 5 + "\n\nLINE 1: and adds a second line")

    monkeypatch.setenv("COLUMNS", "80")  # what rich assumes when stderr is a file
    monkeypatch.setattr(cli, "app", fail)
    monkeypatch.setitem(cli.state, "debug", False)
    with pytest.raises(SystemExit) as exited:
        cli.main()

    err = capsys.readouterr().err
    assert exited.value.code == code
    assert err.count("\n") == 1 and err.startswith(start) and "length, a bug" in err and "and adds a second line" in err, err


def test_report_before_any_run_says_to_run_the_job_first_and_creates_no_file(demo_project, tmp_path, findings):
    import batchml
    from conftest import DemoProject

    fresh = DemoProject(tmp_path / "fresh", findings)
    fresh.write_config(job_config())
    no_warehouse = fresh.cli("report", "vuln_risk")
    no_schema = demo_project.cli("report", "vuln_risk")  # a warehouse holding only the source
    batchml.list_models("vuln_risk", project=demo_project.root)  # creates the batchml schema (what `models list` calls)
    no_run = demo_project.cli("report", "vuln_risk")

    for result in (no_warehouse, no_schema, no_run):
        assert result.returncode == 2, result.stderr
        assert_one_line_error(result, "no runs of job vuln_risk yet; run `batchml run vuln_risk` first")
    assert not fresh.warehouse.exists()


def test_version_prints_the_package_version():
    from importlib.metadata import version

    result = run_cli("--version", check=True)
    assert result.stdout.strip() == f"batchml {version('batchml')}"


def test_a_champion_the_source_can_no_longer_feed_is_replaced_by_hand(champion_project):
    from conftest import day

    demo_project = champion_project  # after the nightly run at day 60
    con = duckdb.connect(str(demo_project.warehouse))
    con.execute("ALTER TABLE raw.vuln_findings DROP COLUMN n_references")
    con.close()
    config = job_config()
    config["features"]["numeric"].remove("n_references")
    demo_project.write_config(config)

    check = demo_project.cli("check", "vuln_risk")
    assert check.returncode == 1 and "FAIL vuln_risk: champion: champion v1 needs n_references" in check.stdout, check.stdout
    forced = demo_project.cli("run", "vuln_risk", "--as-of", "2026-03-03", "--no-notify", "--force-retrain")
    assert forced.returncode == 1
    assert_one_line_error(forced, "champion v1 of vuln_risk cannot score", "n_references", "batchml models promote vuln_risk 2")
    assert demo_project.query("SELECT version, status FROM batchml.models ORDER BY version") == [(1, "champion"), (2, "challenger")]
    event, reason = demo_project.query("SELECT event, reason FROM batchml.model_events WHERE version = 2")[0]
    assert event == "no_decision" and "no longer has n_references" in reason
    rerun = demo_project.cli("run", "vuln_risk", "--as-of", "2026-03-03", "--no-notify")  # trains nothing new
    assert_one_line_error(rerun, "champion v1", "batchml models promote vuln_risk 2")
    backfill = demo_project.cli("backfill", "vuln_risk", "--start", "2026-02-01", "--end", "2026-02-02")
    assert backfill.returncode == 1
    assert_one_line_error(backfill, "champion v1 of vuln_risk cannot score", "n_references", "--model-version")
    assert demo_project.scalar("SELECT value FROM batchml.watermarks") == day(60)

    demo_project.cli("models", "promote", "vuln_risk", "2", check=True)
    run = demo_project.cli("run", "vuln_risk", "--as-of", "2026-03-03", "--no-notify", check=True)
    scored = demo_project.query("SELECT DISTINCT model_version FROM scores.vuln_risk WHERE scored_at > "
                                "(SELECT max(promoted_at) FROM batchml.models WHERE version = 1)")
    assert (2,) in scored and "FAIL" not in demo_project.cli("check", "vuln_risk").stdout, run.stdout
    assert demo_project.scalar("SELECT value FROM batchml.watermarks") == day(61)


def test_check_names_a_changed_feature_list(champion_copy):
    from conftest import day

    demo_project = champion_copy(day(59))  # after the nightly run of 2026-03-01 (the run command has tests of its own)
    config = job_config()
    config["features"]["categorical"].remove("severity")
    demo_project.write_config(config)
    check = demo_project.cli("check", "vuln_risk", check=True)
    assert "config drops [severity] vs champion v1: the next run trains a challenger" in check.stdout
