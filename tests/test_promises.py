"""README promises that had no test of their own (issue #23), each checked on real parts.

Promises tested elsewhere: exit 3 for a rejected batch through the CLI
(``test_commands.py::test_a_rejected_batchs_report_shows_a_sample_of_its_quarantined_rows``), a fire
while the job already runs (``test_scheduler.py::test_daemon_runs_jobs_in_children_logs_exits_and_keeps_going``,
``test_scheduler.py::test_a_fire_is_skipped_while_the_previous_run_still_goes`` for the daemon's own runs).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from batchml.config import JobConfig
from batchml.data.extract import EVENT_TIME, LABEL
from batchml.models.registry import LoadedModel
from batchml.models.train import split_by_time
from batchml.monitoring import performance
from batchml.pipeline.nightly import run_job
from conftest import day, job_config, load_source


# -- training: the holdout is never trained on; early stopping uses the latest validation_fraction ----------


def labeled_rows(days: int = 100, per_day: int = 30, seed: int = 1) -> pa.Table:
    """Labeled rows over ``days`` days, shuffled (the split must not rely on the order rows come in)."""
    rng = np.random.default_rng(seed)
    start = datetime(2026, 1, 1)
    times = [start + timedelta(days=d, minutes=int(m)) for d in range(days) for m in rng.integers(0, 1440, per_day)]
    order = rng.permutation(len(times))
    return pa.table({EVENT_TIME: pa.array([times[i] for i in order], pa.timestamp("us")),
                     LABEL: pa.array(rng.integers(0, 2, len(times)), pa.int8()), "row": pa.array(order)})


@pytest.mark.parametrize("holdout_days, validation_fraction", [(14, 0.15), (30, 0.3), (1, 0.05)])
def test_the_holdout_is_the_last_days_and_validation_the_latest_share_before_it(holdout_days, validation_fraction):
    table = labeled_rows()
    config = JobConfig.model_validate(job_config(**{"training.holdout_days": holdout_days,
                                                    "training.validation_fraction": validation_fraction}))

    split = split_by_time(table, config)

    times = {name: part.column(EVENT_TIME).to_pylist() for name, part in
             (("fit", split.fit), ("validation", split.validation), ("holdout", split.holdout))}
    latest = max(table.column(EVENT_TIME).to_pylist())
    holdout_start = latest - timedelta(days=holdout_days)
    # every row in exactly one part
    rows = sorted(r for part in (split.fit, split.validation, split.holdout) for r in part.column("row").to_pylist())
    assert rows == sorted(table.column("row").to_pylist())
    # the holdout: every row of the last holdout_days and nothing else; nothing fitted or validated on is that recent
    assert len(times["holdout"]) == sum(t >= holdout_start for t in table.column(EVENT_TIME).to_pylist())
    assert min(times["holdout"]) >= holdout_start > max(times["fit"] + times["validation"])
    # early stopping: the latest validation_fraction of the rest, all of it after every fitted row
    rest = len(times["fit"]) + len(times["validation"])
    assert len(times["validation"]) == max(1, int(rest * validation_fraction))
    assert max(times["fit"]) <= min(times["validation"])


def test_a_trained_model_never_saw_its_holdout(demo_project):
    run = run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)

    train_end = demo_project.scalar("SELECT train_end FROM batchml.models WHERE version = 1")  # the latest row fitted or validated on
    labeled = "SELECT max(found_at) FROM raw.vuln_findings WHERE ingested_at < ? AND label_at < ?"
    latest = demo_project.scalar(labeled, [day(60), day(60)])
    holdout_days = job_config()["training"]["holdout_days"]
    assert run.champion_version == 1
    assert train_end < latest - timedelta(days=holdout_days)  # fitted and early-stopped before the holdout began


# -- extract: a duplicate whose newest row is bad; a TIMESTAMPTZ source -------------------------------------


def test_a_duplicate_whose_newest_row_is_bad_quarantines_both(demo_project):
    p = demo_project
    victim = p.findings.slice(100, 1)
    newer = victim.set_column(victim.schema.get_field_index("ingested_at"), "ingested_at",
                              pc.add(victim.column("ingested_at"), pa.scalar(60_000_000, pa.duration("us"))))
    newer = newer.set_column(newer.schema.get_field_index("cvss_base"), "cvss_base", pa.array([99.0]))  # out of range
    load_source(p.warehouse, pa.concat_tables([p.findings, newer]))
    finding = victim.column("finding_id")[0].as_py()

    run = run_job(p.project, "vuln_risk", as_of=day(60), notify=False)

    quarantined = p.query("SELECT rule FROM batchml.quarantine WHERE entity_id = ? ORDER BY rule", [str(finding)])
    assert len(quarantined) == 2, quarantined  # the bad newest row, and the older one it would have replaced
    assert ("out_of_range",) in quarantined
    assert p.scalar("SELECT count(*) FROM scores.vuln_risk WHERE finding_id = ?", [finding]) == 0
    assert run.rows_extracted == run.rows_scored + run.rows_quarantined


def test_a_timestamptz_source_is_stored_in_utc_whatever_the_session_time_zone(demo_project):
    p = demo_project
    con = duckdb.connect(str(p.warehouse))
    con.execute("ALTER TABLE raw.vuln_findings ALTER found_at TYPE TIMESTAMPTZ USING timezone('UTC', found_at)")
    con.close()

    # the run's DuckDB sessions take the process's zone: nine hours east of UTC
    p.cli("run", "vuln_risk", "--as-of", f"{day(60):%Y-%m-%d}", "--no-notify", check=True, env={"TZ": "Asia/Tokyo"})

    stored = dict(p.query("SELECT finding_id, event_time FROM scores.vuln_risk"))
    truth = dict(zip(p.findings.column("finding_id").to_pylist(), p.findings.column("found_at").to_pylist()))
    assert stored and all(stored[i] == truth[i] for i in stored), "an event time moved"
    assert p.scalar("SELECT data_type FROM information_schema.columns WHERE table_name = 'vuln_risk' "
                    "AND column_name = 'event_time'") == "TIMESTAMP"


# -- scoring: compile failures, reasons only in reason_bands, batches of batch_size ------------------------


def test_a_compile_failure_never_fails_a_run(demo_project, monkeypatch):
    lleaves = pytest.importorskip("lleaves", reason="needs the compiled extra: pip install 'batchml[compiled]'")

    def broken(*args, **kwargs):
        raise RuntimeError("LLVM ERROR: out of registers")

    monkeypatch.setattr(lleaves.Model, "compile", broken)  # the third party fails; batchml is under test
    demo_project.write_config(job_config(**{"scoring.engine": "compiled"}))

    run = run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)

    assert run.status == "succeeded" and run.rows_scored > 0
    assert demo_project.scalar("SELECT count(*) FROM scores.vuln_risk") == run.rows_scored
    assert not list((demo_project.root / "warehouse" / "models").rglob("*.so"))


def test_reasons_are_null_outside_reason_bands(demo_project):
    demo_project.write_config(job_config(**{"scoring.reason_bands": ["medium"], "scoring.reasons": 2}))

    run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)

    by_band = dict(demo_project.query(
        "SELECT risk_band, [count(*), count(reasons)] FROM scores.vuln_risk GROUP BY risk_band"))
    assert by_band["medium"][0] > 0 and by_band["medium"][1] == by_band["medium"][0]
    others = [band for band in by_band if band != "medium"]
    assert others and all(by_band[band][1] == 0 for band in others), by_band


# -- monitoring: estimated performance only for a calibrated champion ---------------------------------------


@pytest.mark.parametrize("ece, estimated", [(0.01, True), (0.05, True), (0.0501, False), (None, False)])
def test_performance_is_estimated_only_when_the_holdout_ece_is_at_most_0_05(ece, estimated):
    config = JobConfig.model_validate(job_config())
    holdout = {} if ece is None else {"ece": ece}
    champion = LoadedModel("vuln_risk", 3, None, None, {"metrics": {"holdout": holdout}}, None, "0" * 64)
    scores = np.random.default_rng(0).beta(2, 5, 5_000)

    rows = performance.estimated(config, champion, scores, day(60))

    assert bool(rows) == estimated
    if estimated:
        [row] = rows
        assert row["estimated"] and row["model_version"] == 3 and row["n"] == 5_000 and row["event_day"] == day(60).date()
