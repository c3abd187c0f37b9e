"""Continuous training: triggers, the gate on real retrains, registry history, golden sets, shadow scores.

The test data changes concept on day 90 (scanner upgrade; exposure and dependency depth matter more).
Labels arrive 30 days after the event, so from day 120 on a challenger can learn the new concept.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import duckdb
import lightgbm as lgb
import numpy as np
import pytest

from batchml.models import retrain
from batchml.pipeline.backfill import measure_drift
from batchml.data.features import FeatureSpec
from batchml.pipeline.nightly import run_job
from batchml.storage import labels
from conftest import copy_project, day, job_config

# the champion of day 60 has few trees, a day-135 challenger many: the speed test is exercised in
# tests/test_evaluate.py; here it would only hide what the gate decides on quality
RELAXED_LATENCY = {"metric": "roc_auc", "min_improvement": 0.002, "guard": {"log_loss": 0.01},
                   "max_latency_ratio": 50, "bootstrap_resamples": 500}


UNPASSABLE = {**RELAXED_LATENCY, "min_improvement": 0.5}  # the champion stays


def events(p) -> list[tuple]:
    return p.query("SELECT version, event, reason, actor FROM batchml.model_events ORDER BY recorded_at, version")


@pytest.fixture(scope="module")
def promoted_template(champion_templates, tmp_path_factory):
    """Champion v1 from day 60 (old concept), challenger v2 at day 135 trained on the new concept:
    built once for this module, each test gets a copy (``promoted``)."""
    first = champion_templates(day(60), job_config(promotion=RELAXED_LATENCY))
    p = copy_project(first, tmp_path_factory.mktemp("promoted") / "project")
    run = run_job(p.project, "vuln_risk", as_of=day(135), force_retrain=True, notify=False)
    return p, run


@pytest.fixture
def promoted(promoted_template, tmp_path):
    template, run = promoted_template
    return copy_project(template, tmp_path / "project"), run


def test_a_concept_change_leads_to_a_promotion(promoted):
    p, run = promoted
    assert run.promoted and run.challenger_version == 2 and run.champion_version == 2
    assert dict(p.query("SELECT version, status FROM batchml.models")) == {1: "archived", 2: "champion"}
    decision = json.loads(p.scalar("SELECT metrics FROM batchml.model_events WHERE version = 2"))
    assert decision["outcome"] == "promoted" and decision["bootstrap"]["low"] > 0
    assert decision["metrics_challenger"]["roc_auc"] > decision["metrics_champion"]["roc_auc"] + 0.002
    # which model was champion on a given day, in SQL
    history = "SELECT version FROM batchml.champion_history WHERE champion_from <= ? AND (champion_until IS NULL OR champion_until > ?)"
    assert p.query(history, [day(100), day(100)]) == [(1,)]
    assert p.query(history, [day(140), day(140)]) == [(2,)]


def test_a_night_with_a_promotion_stores_the_new_champions_scores(promoted):
    """The pull scores the rows with the night's first champion (v1); v2, promoted after the gate,
    must replace every one of those scores: each stored score is LightGBM's predict of v2's model.txt."""
    p, run = promoted

    def predicted(version: int, features: list[str], rows: list[tuple]) -> np.ndarray:
        folder = Path(p.scalar("SELECT artifact_path FROM batchml.models WHERE version = ?", [version]))
        manifest = json.loads((folder / "model.json").read_text())

        def encode(name, value):  # the encoding as model.json documents it, independent of batchml.features
            if name in manifest["categories"]:
                levels = manifest["categories"][name]
                return float(levels.index(value)) if value in levels else np.nan
            return np.nan if value is None else float(value)

        columns = [features.index(name) for name in manifest["features"]]
        matrix = np.array([[encode(n, row[i]) for n, i in zip(manifest["features"], columns)] for row in rows], dtype=np.float64)
        return lgb.Booster(model_file=str(folder / "model.txt")).predict(matrix)

    features = [*job_config()["features"]["numeric"], *job_config()["features"]["categorical"]]
    rows = p.query(f"SELECT s.score, s.model_version, {', '.join('f.' + c for c in features)} FROM scores.vuln_risk s "
                   "JOIN raw.vuln_findings f USING (finding_id) WHERE s.run_id = ? ORDER BY s.finding_id", [run.run_id])

    assert len(rows) == run.rows_scored > 0 and {row[1] for row in rows} == {2}
    stored = np.array([row[0] for row in rows])
    values = [row[2:] for row in rows]
    assert np.max(np.abs(predicted(2, features, values) - stored)) <= 1e-9
    assert np.max(np.abs(predicted(1, features, values) - stored)) > 1e-3  # v1's scores would have been told apart


def test_the_gate_does_not_promote_noise_on_identical_data(demo_project):
    """Same rows, different seeds (bagging makes seeds matter): no challenger may win."""
    params = {"num_leaves": 15, "learning_rate": 0.1, "num_boost_round": 60, "early_stopping_rounds": 10,
              "bagging_fraction": 0.8, "bagging_freq": 1, "feature_fraction": 0.8}
    demo_project.write_config(job_config(training={"params": params, "seed": 1}, promotion=RELAXED_LATENCY))
    run_job(demo_project.project, "vuln_risk", as_of=day(100), notify=False)
    outcomes = []
    for seed in (2, 3, 4):
        demo_project.write_config(job_config(training={"params": params, "seed": seed}, promotion=RELAXED_LATENCY))
        run = run_job(demo_project.project, "vuln_risk", as_of=day(100), force_retrain=True, notify=False)
        outcomes.append(run.promoted)
    assert outcomes == [False, False, False]
    assert p_champion(demo_project) == 1
    assert [e[1] for e in events(demo_project)[1:]] == ["rejected"] * 3


def p_champion(p) -> int:
    return p.scalar("SELECT version FROM batchml.models WHERE status = 'champion'")


def test_rollback_and_manual_promotion_are_recorded_with_who_and_why(promoted):
    p, _ = promoted
    rolled = p.cli("models", "rollback", "vuln_risk", "--reason", "alerts doubled overnight", check=True)
    assert "v1 is champion again" in rolled.stdout
    assert p_champion(p) == 1
    version, event, reason, actor = events(p)[-1]
    assert (version, event, reason) == (1, "rollback", "alerts doubled overnight") and actor

    p.cli("models", "promote", "vuln_risk", "2", "--reason", "fixed upstream", check=True)
    assert p_champion(p) == 2 and events(p)[-1][1:3] == ("manual_promote", "fixed upstream")
    again = p.cli("models", "promote", "vuln_risk", "2")
    assert again.returncode == 2 and "already the champion" in again.stderr
    # the next nightly run scores with the champion chosen by hand
    run = run_job(p.project, "vuln_risk", as_of=day(136), notify=False)
    assert run.champion_version == 2


def test_the_golden_set_check_catches_scores_that_moved(champion_project):
    demo_project = champion_project  # after the nightly run at day 60
    assert demo_project.cli("check", "vuln_risk").returncode == 0
    folder = Path(demo_project.scalar("SELECT artifact_path FROM batchml.models"))
    # a "silent" change: leaf values edited and every hash recomputed, as a broken upgrade might
    model = folder / "model.txt"
    text = model.read_text()
    first = text.index("leaf_value=") + len("leaf_value=")
    end = min(text.index(" ", first), text.index("\n", first))
    model.write_text(text[:first] + repr(float(text[first:end]) + 0.5) + text[end:])
    manifest = json.loads((folder / "model.json").read_text())
    manifest["files"]["model.txt"] = hashlib.sha256(model.read_bytes()).hexdigest()
    (folder / "model.json").write_text(json.dumps(manifest))
    con = duckdb.connect(str(demo_project.warehouse))
    con.execute("UPDATE batchml.models SET sha256 = ?, manifest_sha256 = ?", [manifest["files"]["model.txt"], hashlib.sha256((folder / "model.json").read_bytes()).hexdigest()])
    con.close()

    result = demo_project.cli("check", "vuln_risk")
    assert result.returncode == 1
    assert "golden-set scores moved" in result.stdout


def test_triggers_fire_for_each_reason():
    config = retrain.JobConfig.model_validate(job_config(training={"retrain": {"every_days": 7, "on_drift": True,
                                                                               "min_new_labels": 100, "max_decay": 0.05}}))
    champion = {"created_at": day(60), "metrics": json.dumps({"holdout": {"roc_auc": 0.85}})}
    quiet = dict(champion=champion, as_of=day(61), force=False, dataset_drift=False, new_labels=10, realised=0.84)
    assert retrain.due_triggers(config, **quiet) == []
    assert retrain.due_triggers(config, **{**quiet, "champion": None}) == ["no_champion"]
    assert retrain.due_triggers(config, **{**quiet, "force": True}) == ["forced"]
    assert retrain.due_triggers(config, **{**quiet, "as_of": day(60) + timedelta(days=7)}) == ["age"]
    assert retrain.due_triggers(config, **{**quiet, "dataset_drift": True}) == ["drift"]
    assert retrain.due_triggers(config, **{**quiet, "new_labels": 100}) == ["new_labels"]
    assert retrain.due_triggers(config, **{**quiet, "realised": 0.79}) == ["decay"]
    features = config.features
    same = FeatureSpec(list(reversed(features.numeric)), features.categorical)  # order alone is no change
    assert retrain.due_triggers(config, **quiet, champion_spec=same) == []
    added = FeatureSpec(features.numeric[1:], features.categorical)
    switched = FeatureSpec(features.numeric[1:], [*features.categorical, features.numeric[0]])
    assert retrain.due_triggers(config, **quiet, champion_spec=added) == ["features_changed"]
    assert retrain.due_triggers(config, **quiet, champion_spec=switched) == ["features_changed"]


MONTHLY = {"retrain": {"every_days": 30, "on_drift": False, "min_new_labels": 100}}


def test_triggers_and_realised_performance_are_recorded(champion_copy):
    demo_project = champion_copy(day(60), job_config(training=MONTHLY))
    run = run_job(demo_project.project, "vuln_risk", as_of=day(95), notify=False)

    assert json.loads(demo_project.scalar("SELECT triggers FROM batchml.runs WHERE run_id = ?", [run.run_id])) == ["age", "new_labels"]
    by_day = demo_project.query("SELECT event_day, value, n FROM batchml.performance WHERE run_id = ? AND event_day IS NOT NULL "
                                "AND NOT estimated ORDER BY event_day", [run.run_id])
    # labels that arrived between the two runs belong to findings of days 30..65 scored by the first run
    assert by_day and min(r[0] for r in by_day) >= day(29).date() and max(r[0] for r in by_day) < day(65).date()
    overall = demo_project.query("SELECT value, n FROM batchml.performance WHERE run_id = ? AND event_day IS NULL", [run.run_id])
    assert overall[0][1] == sum(r[2] for r in by_day) and 0.6 < overall[0][0] <= 1.0


def test_new_labels_are_counted_only_as_far_as_the_trigger_needs(champion_copy):
    # the trigger asks "at least min_new_labels?" (test_triggers_fire_for_each_reason): a count that stops there answers it
    demo_project = champion_copy(day(60))
    project = demo_project.project
    config = project.job("vuln_risk")
    with project.connect() as con:
        every = labels.count_new_labels(con, config, project.root, day(95), enough=10**9)
        assert every > 100  # a month of findings labeled since the champion was trained
        assert labels.count_new_labels(con, config, project.root, day(95), enough=every - 1) == every - 1
        assert labels.count_new_labels(con, config, project.root, day(95), enough=every + 1) == every


def test_a_rerun_of_a_cutoff_does_not_train_the_same_challenger_again(champion_copy):
    demo_project = champion_copy(day(60), job_config(training=MONTHLY))
    first = run_job(demo_project.project, "vuln_risk", as_of=day(95), notify=False)
    again = run_job(demo_project.project, "vuln_risk", as_of=day(95), notify=False)
    forced = run_job(demo_project.project, "vuln_risk", as_of=day(95), force_retrain=True, notify=False)

    assert first.challenger_version == 2
    # age counts from the job's last training (#14): v2 was trained at this very cut-off, so nothing fires
    assert again.status == "succeeded" and again.challenger_version is None and again.triggers == []
    assert forced.challenger_version == 3  # asked for explicitly
    assert demo_project.query("SELECT version FROM batchml.models ORDER BY version") == [(1,), (2,), (3,)]
    # the labels that arrived up to day 95 were measured once, by the first run of that cut-off
    realised = "SELECT count(*) FROM batchml.performance WHERE run_id = ? AND NOT estimated"
    assert demo_project.scalar(realised, [first.run_id]) > 0
    assert demo_project.scalar(realised, [again.run_id]) == demo_project.scalar(realised, [forced.run_id]) == 0


def test_no_challenger_is_trained_behind_the_champion(promoted):
    p, _ = promoted  # v2, trained at day 135, is the champion
    behind = run_job(p.project, "vuln_risk", as_of=day(120), force_retrain=True, notify=False)

    assert behind.status == "succeeded" and behind.challenger_version is None and not behind.promoted
    assert "before champion v2's own (2026-05-16 00:00)" in behind.note
    assert dict(p.query("SELECT version, status FROM batchml.models")) == {1: "archived", 2: "champion"}


def test_a_young_job_whose_labels_all_fall_in_the_holdout_waits_for_more(demo_project):
    demo_project.write_config(job_config(training={"holdout_days": 365}))
    run = run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)

    assert run.status == "succeeded" and run.rows_scored == 0 and run.champion_version is None
    assert "only 0 labeled rows to train vuln_risk on" in run.note and "held out (the last 365 days)" in run.note


def test_shadow_mode_scores_the_same_rows_with_the_latest_challenger(champion_copy):
    demo_project = champion_copy(day(60), job_config(promotion={**UNPASSABLE, "shadow": True}))
    rejected = run_job(demo_project.project, "vuln_risk", as_of=day(61), force_retrain=True, notify=False)
    assert rejected.challenger_version == 2 and not rejected.promoted

    shadow = demo_project.query("SELECT DISTINCT model_version FROM scores.vuln_risk_shadow WHERE run_id = ?", [rejected.run_id])
    assert shadow == [(2,)]
    same_rows = demo_project.scalar(
        "SELECT count(*) FROM scores.vuln_risk s JOIN scores.vuln_risk_shadow h USING (finding_id, run_id) WHERE s.run_id = ?",
        [rejected.run_id])
    assert same_rows == rejected.rows_scored > 0


# -- a change of the feature list ------------------------------------------------------------------


def with_exploit_pressure(demo_project, **overrides) -> dict:
    """The test config plus a feature derived in features.sql, which champions trained before lack."""
    (demo_project.root / "jobs").mkdir(exist_ok=True)
    (demo_project.root / "jobs" / "pressure.sql").write_text("SELECT *, epss * cvss_base / 10 AS exploit_pressure FROM source")
    config = job_config(**overrides)
    config["features"] = {**config["features"], "numeric": [*config["features"]["numeric"], "exploit_pressure"],
                          "sql": "jobs/pressure.sql"}
    return config


def model_features(demo_project, version: int) -> list[str]:
    path = demo_project.scalar("SELECT artifact_path FROM batchml.models WHERE version = ?", [version])
    return json.loads((Path(path) / "model.json").read_text())["features"]


def test_an_added_feature_trains_a_challenger_while_the_champion_keeps_scoring(champion_project, caplog):
    demo_project = champion_project  # after the nightly run at day 60
    demo_project.write_config(with_exploit_pressure(demo_project, promotion=UNPASSABLE))  # the champion must stay
    with caplog.at_level("INFO", logger="batchml"):
        run = run_job(demo_project.project, "vuln_risk", as_of=day(61), notify=False)

    assert run.status == "succeeded" and "features_changed" in run.triggers and run.challenger_version == 2
    assert "exploit_pressure" in model_features(demo_project, 2) and "exploit_pressure" not in model_features(demo_project, 1)
    # the champion was compared on the same holdout (its columns were pulled too): a real decision, with metrics
    event, metrics = demo_project.query("SELECT event, metrics FROM batchml.model_events WHERE version = 2")[0]
    assert event == "rejected" and json.loads(metrics)["metrics_champion"]["roc_auc"] > 0.5
    scored_by = demo_project.query("SELECT DISTINCT model_version FROM scores.vuln_risk WHERE run_id = ?", [run.run_id])
    assert run.rows_scored > 0 and scored_by == [(1,)]  # ... and v1, the champion, scored the batch
    # drift is measured on the features both have; the new one is named in the log, not an error
    drifted = {r[0] for r in demo_project.query("SELECT feature FROM batchml.drift WHERE run_id = ? AND kind = 'feature'", [run.run_id])}
    assert "epss" in drifted and "exploit_pressure" not in drifted
    assert "drift skips features only one side has: champion v1 only [], config only [exploit_pressure]" in caplog.text
    assert measure_drift(demo_project.project, "vuln_risk", as_of=day(62)).status == "succeeded"


def test_a_dropped_feature_is_still_pulled_for_the_champion(champion_copy):
    demo_project = champion_copy(day(60), job_config(promotion=UNPASSABLE))
    config = job_config(promotion=UNPASSABLE)
    config["features"]["numeric"].remove("n_references")
    demo_project.write_config(config)
    run = run_job(demo_project.project, "vuln_risk", as_of=day(61), notify=False)

    assert run.status == "succeeded" and "features_changed" in run.triggers and not run.promoted
    assert "n_references" in model_features(demo_project, 1) and "n_references" not in model_features(demo_project, 2)
    assert demo_project.query("SELECT DISTINCT model_version FROM scores.vuln_risk WHERE run_id = ?", [run.run_id]) == [(1,)]
    assert demo_project.scalar("SELECT event FROM batchml.model_events WHERE version = 2") == "rejected"


def test_a_rerun_after_a_feature_change_trains_only_when_the_feature_list_differs(champion_copy):
    demo_project = champion_copy(day(60), job_config(promotion=UNPASSABLE))
    demo_project.write_config(with_exploit_pressure(demo_project, promotion=UNPASSABLE))
    first = run_job(demo_project.project, "vuln_risk", as_of=day(61), notify=False)
    again = run_job(demo_project.project, "vuln_risk", as_of=day(61), notify=False)
    config = with_exploit_pressure(demo_project, promotion=UNPASSABLE)
    config["features"]["categorical"].remove("severity")
    demo_project.write_config(config)
    changed = run_job(demo_project.project, "vuln_risk", as_of=day(61), notify=False)

    assert first.challenger_version == 2
    assert again.challenger_version is None and "features_changed" in again.triggers and "v2 was trained at cut-off" in again.note
    assert changed.challenger_version == 3  # v2 was trained on another feature list: not the same challenger


def test_shadow_scores_skip_a_challenger_that_needs_a_column_no_longer_pulled(champion_copy):
    demo_project = champion_copy(day(60), job_config(promotion={**UNPASSABLE, "shadow": True}))
    demo_project.write_config(with_exploit_pressure(demo_project, promotion={**UNPASSABLE, "shadow": True}))
    assert run_job(demo_project.project, "vuln_risk", as_of=day(61), notify=False).challenger_version == 2
    demo_project.write_config(job_config(promotion={**UNPASSABLE, "shadow": True}))  # back to v1's features
    run = run_job(demo_project.project, "vuln_risk", as_of=day(62), notify=False)

    assert run.status == "succeeded" and run.rows_scored > 0
    assert demo_project.scalar("SELECT count(*) FROM scores.vuln_risk_shadow WHERE run_id = ?", [run.run_id]) == 0
