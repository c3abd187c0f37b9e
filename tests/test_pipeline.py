"""One nightly run end to end, through the library, on real DuckDB files and real LightGBM."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from batchml.demo import data as demo_data
from batchml.errors import DataError, ModelError, RejectedError, WarehouseError
from batchml.pipeline.nightly import run_job
from conftest import DemoProject, day, job_config, load_source


def valid_landed(p, start, end) -> int:
    """Rows that landed in [start, end) and meet the data contract, counted straight from the source."""
    return p.scalar(
        "SELECT count(*) FROM raw.vuln_findings WHERE ingested_at >= ? AND ingested_at < ? "
        "AND finding_id IS NOT NULL AND found_at IS NOT NULL AND cvss_base BETWEEN 0 AND 10 "
        "AND (epss IS NULL OR (epss BETWEEN 0 AND 1))",
        [start, end],
    )


def test_first_run_trains_a_champion_from_labels_known_before_the_cutoff(demo_project):
    run = run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)

    assert run.status == "succeeded" and run.promoted and run.champion_version == 1
    assert run.rows_extracted == run.rows_scored + run.rows_quarantined
    assert run.rows_scored == valid_landed(demo_project, day(-1), day(60)) > 3000
    version, status, train_end, events = demo_project.query(
        "SELECT m.version, m.status, m.train_end, (SELECT count(*) FROM batchml.model_events e WHERE e.version = m.version) "
        "FROM batchml.models m"
    )[0]
    assert (version, status, events) == (1, "champion", 1)
    # labels arrive 30 days after the finding: nothing found after day 30 can have been trained on
    assert train_end < day(30)
    assert demo_project.scalar("SELECT value FROM batchml.watermarks WHERE job = 'vuln_risk'") == day(60)
    assert demo_project.scalar("SELECT max(f.ingested_at) FROM scores.vuln_risk s JOIN raw.vuln_findings f USING (finding_id)") < day(60)
    # every step's time is recorded, the commit's too (it is known only once the commit is done)
    seconds = demo_project.query("SELECT extract_seconds, train_seconds, score_seconds, commit_seconds, total_seconds, timings FROM batchml.runs")[0]
    assert all(value > 0 for value in seconds[:4])
    timings = json.loads(seconds[5])
    assert timings["commit"] == seconds[3] and seconds[4] == pytest.approx(sum(timings.values()), abs=1e-3)


def test_incremental_runs_score_each_landed_row_exactly_once(demo_project):
    for n in (60, 61, 62, 62):  # the repeated cut-off pulls nothing new
        run = run_job(demo_project.project, "vuln_risk", as_of=day(n), notify=False)
        assert run.rows_extracted == run.rows_scored + run.rows_quarantined

    assert run.rows_extracted == 0
    scored, distinct = demo_project.query("SELECT count(*), count(DISTINCT finding_id) FROM scores.vuln_risk")[0]
    assert scored == distinct == valid_landed(demo_project, day(-1), day(62))
    per_run = demo_project.query("SELECT rows_scored FROM batchml.runs ORDER BY as_of, started_at")
    assert per_run[1][0] == valid_landed(demo_project, day(60), day(61))
    latest = demo_project.scalar("SELECT count(*) FROM scores.vuln_risk_latest")
    assert latest == distinct

    earlier = run_job(demo_project.project, "vuln_risk", as_of=day(61), notify=False)  # behind the watermark
    assert earlier.rows_extracted == 0 and "before the watermark" in earlier.note
    assert demo_project.scalar("SELECT value FROM batchml.watermarks") == day(62)


@pytest.mark.parametrize("on_drift", [False, True])
def test_a_night_without_a_possible_retrain_reads_its_batch_once(champion_project, monkeypatch, on_drift):
    """With a champion and no trigger that can fire, the pull scores as it reads: the run's folder
    holds the rejected rows and the scores, not the batch (kept only when a retrain may need it)."""
    demo_project = champion_project  # after run_job(..., as_of=day(60), notify=False): champion v1
    retrain = {"every_days": None, "on_drift": on_drift, "min_new_labels": None, "max_decay": None}
    demo_project.write_config(job_config(**{"training.retrain": retrain}))
    seen: dict[str, list[str]] = {}

    def look(step: str) -> None:  # what the run's folder holds when each step is done
        folders = list((demo_project.root / "warehouse" / "tmp").glob("vuln_risk-*"))
        seen[step] = sorted(f.name for f in folders[0].iterdir()) if folders else []

    monkeypatch.setattr("batchml.pipeline.nightly.checkpoint", look)
    run = run_job(demo_project.project, "vuln_risk", as_of=day(61), notify=False)

    assert run.status == "succeeded" and run.rows_scored == valid_landed(demo_project, day(60), day(61)) > 0
    assert "scores.parquet" in seen["extract"] and "rejected.arrow" in seen["extract"]
    assert ("batch.arrow" in seen["extract"]) == on_drift  # drift could call for a retrain: the rows are kept
    assert run.timings["score"] > 0 and "extract" not in run.timings


def test_without_enough_labels_nothing_is_scored_and_rows_wait(demo_project):
    waiting = run_job(demo_project.project, "vuln_risk", as_of=day(20), notify=False)

    assert waiting.status == "succeeded" and waiting.rows_scored == 0 and waiting.champion_version is None
    assert "wait" in waiting.note
    assert demo_project.scalar("SELECT count(*) FROM batchml.watermarks") == 0
    # analysts can already query the (empty) scores table and its view, with the final column types
    assert demo_project.scalar("SELECT count(*) FROM scores.vuln_risk_latest") == 0
    types = dict(demo_project.query("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'vuln_risk'"))
    assert types["finding_id"] == "BIGINT" and types["score"] == "DOUBLE" and types["model_version"] == "INTEGER"
    assert types["reasons"].startswith("STRUCT(feature VARCHAR, contribution DOUBLE)[]")
    later = run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)
    assert later.rows_scored == valid_landed(demo_project, day(-1), day(60))


def test_scores_are_reproducible_from_model_txt_and_model_json_alone(champion_project):
    demo_project = champion_project  # after run_job(..., as_of=day(60), notify=False): champion v1
    folder = Path(demo_project.scalar("SELECT artifact_path FROM batchml.models WHERE version = 1"))
    manifest = json.loads((folder / "model.json").read_text())
    booster = lgb.Booster(model_file=str(folder / "model.txt"))
    rows = demo_project.query(
        f"SELECT s.score, {', '.join('f.' + c for c in manifest['features'])} FROM scores.vuln_risk s "
        "JOIN raw.vuln_findings f USING (finding_id) ORDER BY s.finding_id LIMIT 500"
    )

    # the encoding as model.json documents it, written independently of batchml.features
    def encode(name, value):
        if name in manifest["categories"]:
            levels = manifest["categories"][name]
            return float(levels.index(value)) if value in levels else np.nan
        return np.nan if value is None else float(value)

    matrix = np.array([[encode(n, v) for n, v in zip(manifest["features"], row[1:])] for row in rows], dtype=np.float64)
    expected = np.array([row[0] for row in rows])
    assert np.max(np.abs(booster.predict(matrix) - expected)) <= 1e-9


def test_a_tampered_model_is_refused(champion_project):
    demo_project = champion_project  # after run_job(..., as_of=day(60), notify=False): champion v1
    model = Path(demo_project.scalar("SELECT artifact_path FROM batchml.models WHERE version = 1")) / "model.txt"
    model.write_text(model.read_text().replace("shrinkage=0.1", "shrinkage=0.2", 1))

    with pytest.raises(ModelError, match="sha256"):
        run_job(demo_project.project, "vuln_risk", as_of=day(61), notify=False)
    assert demo_project.scalar("SELECT value FROM batchml.watermarks") == day(60)
    # recorded as a failed run with its reason (not left 'running' for the next run to call crashed)
    status, error, champion = demo_project.query("SELECT status, error, champion_version FROM batchml.runs WHERE as_of = ?", [day(61)])[0]
    assert status == "failed" and "sha256" in error and champion == 1


def not_json(token: str):
    raise ValueError(f"{token} is not JSON")


def test_bad_rows_are_quarantined_with_a_reason_and_scored_rows_add_up(demo_project):
    bad = demo_data.inject_bad_rows(demo_project.findings, 0.01, seed=3)
    load_source(demo_project.warehouse, bad)

    run = run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)

    assert run.rows_quarantined > 0 and run.rows_extracted == run.rows_scored + run.rows_quarantined
    rules = dict(demo_project.query("SELECT rule, count(*) FROM batchml.quarantine GROUP BY 1"))
    assert {"out_of_range", "non_finite", "null_entity_id", "null_event_time"} <= set(rules)
    reason, record = demo_project.query("SELECT reason, record FROM batchml.quarantine WHERE rule = 'out_of_range' LIMIT 1")[0]
    assert reason.startswith("cvss_base=") and "outside [0.0, 10.0]" in reason
    assert "cvss_base" in json.loads(record)
    # strict JSON (no bare Infinity / NaN tokens, which jq and Postgres refuse), the value kept as text
    records = [json.loads(r, parse_constant=not_json) for (r,) in demo_project.query("SELECT record FROM batchml.quarantine WHERE rule = 'non_finite'")]
    assert records and all(any(v in ("inf", "-inf") for v in r.values()) for r in records)


def test_a_batch_with_too_many_bad_rows_is_rejected_and_waits_for_the_fix(champion_project):
    demo_project = champion_project  # after run_job(..., as_of=day(60), notify=False): champion v1
    bad = demo_data.inject_bad_rows(demo_project.findings, 0.3, seed=5)
    load_source(demo_project.warehouse, bad)

    with pytest.raises(RejectedError, match="max_quarantine_fraction"):
        run_job(demo_project.project, "vuln_risk", as_of=day(65), notify=False)

    status, scored = demo_project.query("SELECT status, rows_scored FROM batchml.runs ORDER BY started_at DESC LIMIT 1")[0]
    assert (status, scored) == ("rejected", 0)
    assert demo_project.scalar("SELECT value FROM batchml.watermarks") == day(60)
    catalog = duckdb.connect(str(demo_project.project.catalog), read_only=True)  # analysts see it at once
    assert catalog.execute("SELECT status FROM batchml.runs ORDER BY started_at DESC LIMIT 1").fetchone() == ("rejected",)
    catalog.close()
    assert demo_project.scalar("SELECT count(*) FROM batchml.quarantine") > 0
    load_source(demo_project.warehouse, demo_project.findings)  # the fix
    rerun = run_job(demo_project.project, "vuln_risk", as_of=day(65), notify=False)
    assert rerun.rows_scored == valid_landed(demo_project, day(60), day(65))


@pytest.mark.parametrize("missing", ["NULL", "'NaN'::DOUBLE"])
def test_a_feature_missing_too_often_rejects_the_batch_whether_null_or_nan(demo_project, missing):
    demo_project.write_config(job_config(validation={"max_null_fraction": {"epss": 0.2}}))
    run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)
    con = duckdb.connect(str(demo_project.warehouse))
    con.execute(f"UPDATE raw.vuln_findings SET epss = {missing} WHERE ingested_at >= ?", [day(60)])
    con.close()

    with pytest.raises(RejectedError, match="epss"):
        run_job(demo_project.project, "vuln_risk", as_of=day(65), notify=False)
    assert demo_project.scalar("SELECT value FROM batchml.watermarks") == day(60)


def test_feature_sql_sees_the_source_as_of_the_cutoff(demo_project, tmp_path):
    """A target encoding over `source` in features.sql: the night must score as it would have with
    only the rows landed, and the labels known, by its cut-off (else a replay scores differently)."""
    then = DemoProject(tmp_path / "then", demo_project.findings)
    for p in (demo_project, then):
        (p.root / "jobs").mkdir(parents=True, exist_ok=True)
        (p.root / "jobs" / "encoded.sql").write_text(
            "SELECT *, avg(exploited_30d) OVER (PARTITION BY ecosystem, severity) AS group_rate,\n"
            "       count(*) OVER (PARTITION BY ecosystem) AS group_rows FROM source")
        config = job_config()
        config["features"] |= {"sql": "jobs/encoded.sql", "numeric": [*config["features"]["numeric"], "group_rate", "group_rows"]}
        p.write_config(config)
    load_source(demo_project.warehouse, demo_project.findings)  # everything, as the warehouse holds it today
    landed = demo_project.findings.filter(pc.less(demo_project.findings.column("ingested_at"), pa.scalar(day(60), pa.timestamp("us"))))
    known = pc.less(landed.column("label_at"), pa.scalar(day(60), pa.timestamp("us")))
    label = pc.if_else(known, landed.column("exploited_30d"), pa.scalar(None, landed.schema.field("exploited_30d").type))
    load_source(then.warehouse, landed.set_column(landed.schema.get_field_index("exploited_30d"), "exploited_30d", label))

    today, at_the_time = (run_job(p.project, "vuln_risk", as_of=day(60), notify=False) for p in (demo_project, then))

    assert today.rows_scored == at_the_time.rows_scored > 0
    scores = "SELECT finding_id, score FROM scores.vuln_risk ORDER BY finding_id"
    assert demo_project.query(scores) == then.query(scores)


def test_a_text_event_time_with_an_offset_is_stored_in_utc(demo_project):
    con = duckdb.connect(str(demo_project.warehouse))
    con.execute("ALTER TABLE raw.vuln_findings ALTER found_at TYPE VARCHAR")
    con.execute("UPDATE raw.vuln_findings SET found_at = strftime(CAST(found_at AS TIMESTAMP) + INTERVAL 9 HOUR, "
                "'%Y-%m-%dT%H:%M:%S.%f') || '+09:00' WHERE finding_id % 2 = 0")
    con.close()

    run = run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)

    stored = dict(demo_project.query("SELECT finding_id, event_time FROM scores.vuln_risk"))
    truth = dict(zip(demo_project.findings.column("finding_id").to_pylist(), demo_project.findings.column("found_at").to_pylist()))
    assert run.rows_scored == len(stored) > 0
    assert all(stored[i] == truth[i] for i in stored), "an event time moved"
    assert sum(i % 2 == 0 for i in stored) > 0


def test_duplicate_ids_in_a_batch_keep_the_latest_row(demo_project):
    import pyarrow as pa
    import pyarrow.compute as pc

    first = demo_project.findings.slice(100, 1)
    older = first.set_column(first.schema.get_field_index("ingested_at"), "ingested_at",
                             pc.subtract(first.column("ingested_at"), pa.scalar(60_000_000, pa.duration("us"))))
    load_source(demo_project.warehouse, pa.concat_tables([demo_project.findings, older]))

    run = run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)

    assert demo_project.query("SELECT rule FROM batchml.quarantine") == [("duplicate",)]
    assert run.rows_extracted == run.rows_scored + 1


def test_an_unreadable_parquet_source_fails_naming_the_file_and_moves_nothing(demo_project, tmp_path):
    landing = demo_project.root / "landing"
    landing.mkdir()
    (landing / "day1.parquet").write_bytes(b"not parquet at all")
    demo_project.write_config(job_config(source={
        "parquet": "landing/*.parquet", "entity_id": "finding_id", "event_time": "found_at", "watermark": "ingested_at"}))

    with pytest.raises(DataError, match=r"day1\.parquet.*replace or remove the damaged file"):
        run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)
    assert demo_project.query("SELECT status FROM batchml.runs") == [("failed",)]
    assert demo_project.scalar("SELECT count(*) FROM batchml.watermarks") == 0

    demo_project.write_config(job_config(source={
        "parquet": "landin/*.parquet", "entity_id": "finding_id", "event_time": "found_at", "watermark": "ingested_at"}))
    with pytest.raises(DataError, match=r"No files found.*fix source\.parquet in configs/vuln_risk\.yaml"):
        run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)


def test_exact_duplicate_rows_are_scored_once(demo_project):
    import pyarrow as pa

    twice = demo_project.findings.slice(200, 3)  # same ids, same watermarks
    load_source(demo_project.warehouse, pa.concat_tables([demo_project.findings, twice]))

    run = run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)

    assert demo_project.scalar("SELECT count(*) FROM batchml.quarantine WHERE rule = 'duplicate'") == 3
    assert run.rows_extracted == run.rows_scored + run.rows_quarantined
    assert demo_project.scalar("SELECT count(*) - count(DISTINCT finding_id) FROM scores.vuln_risk") == 0


def test_a_moved_project_uses_its_own_model_artifacts(champion_project, tmp_path):
    import shutil

    from batchml.project import Project

    demo_project = champion_project  # after run_job(..., as_of=day(60), notify=False): champion v1
    moved = tmp_path / "moved"
    shutil.move(str(demo_project.root), moved)  # the registry still holds the old absolute path

    run = run_job(Project.open(moved), "vuln_risk", as_of=day(61), notify=False)

    assert run.status == "succeeded" and run.rows_scored > 0 and run.champion_version == 1


def test_an_entity_id_whose_type_changed_fails_with_the_alter_that_fixes_it(champion_project):
    demo_project = champion_project  # after run_job(..., as_of=day(60), notify=False): champion v1
    con = duckdb.connect(str(demo_project.warehouse))
    con.execute("ALTER TABLE raw.vuln_findings ALTER finding_id TYPE VARCHAR USING 'GHSA-' || finding_id")
    con.close()

    check = demo_project.cli("check", "vuln_risk")  # says so before any run trains and scores for nothing
    assert check.returncode == 1 and "scores.vuln_risk.finding_id is BIGINT but the source's finding_id is now VARCHAR" in check.stdout
    with pytest.raises(DataError, match="is BIGINT but the source's finding_id is now VARCHAR") as failed:
        run_job(demo_project.project, "vuln_risk", as_of=day(61), notify=False)
    assert demo_project.scalar("SELECT value FROM batchml.watermarks") == day(60)
    fix = str(failed.value).split("(", 1)[1].split(", and the same")[0]
    con = duckdb.connect(str(demo_project.warehouse))
    con.execute(fix)  # the statement the message gives
    con.close()
    rerun = run_job(demo_project.project, "vuln_risk", as_of=day(61), notify=False)
    assert rerun.status == "succeeded" and rerun.rows_scored == valid_landed(demo_project, day(60), day(61))


def test_ctrl_c_ends_the_run_as_an_interrupt(demo_project):
    """A real SIGINT to a real run, stopped at a known step (BATCHML_PAUSE_AT): failed as interrupted,
    exit 130, one line and no traceback, no failure mail, the watermark not moved."""
    import signal
    import sys

    from test_operations import Child

    from batchml import errors

    p = demo_project
    p.write_config(job_config(notify={"email": ["oncall@example.com"], "on": ["failure"]}))  # a failure is mailed (here: skipped)
    run = Child([sys.executable, "-m", "batchml.cli", "--project", str(p.root), "run", "vuln_risk", "--as-of", f"{day(60):%Y-%m-%d}"],
                env={"BATCHML_SMTP_HOST": "", "BATCHML_PAUSE_AT": "train", "BATCHML_PAUSE_SECONDS": "600"})
    try:
        run.wait_for("paused at train", timeout=180)
        run.proc.send_signal(signal.SIGINT)
        run.proc.wait(timeout=180)  # generous: the wait ends as soon as the run does
    finally:
        if run.proc.poll() is None:
            run.kill()
    output = "".join(run.output)

    assert run.proc.returncode == 130, output
    assert "Traceback" not in output
    status, error = p.query("SELECT status, error FROM batchml.runs")[0]
    assert status == "failed" and error.startswith("KeyboardInterrupt")
    assert p.scalar("SELECT count(*) FROM batchml.notifications") == 0  # no failure mail for Ctrl-C
    assert p.scalar("SELECT count(*) FROM batchml.watermarks") == 0
    # Ctrl-C inside a DuckDB query arrives as DuckDB's own error: what counts as one, also wrapped
    assert errors.interrupted(RuntimeError("Query interrupted")) and not errors.interrupted(errors.DataError("Query interrupted"))
    wrapped = errors.WarehouseError("cannot read")
    wrapped.__cause__ = RuntimeError("Query interrupted")
    assert errors.interrupted(wrapped)


def test_a_failed_commit_reports_its_own_error_and_records_nothing_as_done(champion_project):
    import duckdb

    demo_project = champion_project  # after run_job(..., as_of=day(60), notify=False): champion v1
    con = duckdb.connect(str(demo_project.warehouse))
    con.execute("ALTER TABLE scores.vuln_risk ALTER COLUMN risk_band TYPE INTEGER USING 0")  # the next insert cannot convert 'high'
    con.close()
    scored = demo_project.scalar("SELECT count(*) FROM scores.vuln_risk")

    with pytest.raises(WarehouseError) as failure:
        run_job(demo_project.project, "vuln_risk", as_of=day(61), notify=False)
    assert failure.value.exit_code == 1  # what the CLI exits with: the run failed

    assert "convert" in str(failure.value).lower() and "aborted" not in str(failure.value)  # the cause, not its echo
    status, rows_scored, watermark_to = demo_project.query(
        "SELECT status, rows_scored, watermark_to FROM batchml.runs WHERE as_of = ?", [day(61)])[0]
    assert (status, rows_scored, watermark_to) == ("failed", 0, day(60))
    assert demo_project.scalar("SELECT count(*) FROM scores.vuln_risk") == scored
    assert demo_project.scalar("SELECT value FROM batchml.watermarks") == day(60)
