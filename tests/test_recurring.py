"""A recurring-entity job: churn, the same customers in every weekly snapshot.

A row is identified by (entity id, event time): every snapshot is scored and trained on, only the
same customer at the same snapshot twice is a duplicate, ``_latest`` is each customer's newest
snapshot, drift judges only batches of ``drift.min_rows`` rows or more, and retrain triggers do not
repeat themselves night after night.

Nights are run in-process through ``batchml.api`` (what the commands call: a CLI process costs
~1.5 CPU-seconds to start on the test machine); the CLI runs where its output is what is checked.
"""

from __future__ import annotations

import json
from datetime import timedelta

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchml import api
from conftest import CHURN_START, churn_config, load_source

WEEK = timedelta(days=7)


def _date(moment) -> str:
    return moment.strftime("%Y-%m-%d")


def _first_night(p, weeks: int = 20):
    """The first nightly run, the day after the Monday snapshot of week ``weeks``: trains v1 and scores every snapshot so far."""
    as_of = CHURN_START + weeks * WEEK + timedelta(days=1)
    api.run("churn", project=p.root, as_of=as_of, notify=False)
    return as_of


def _landed_before(snapshots: pa.Table, moment) -> pa.Table:
    return snapshots.filter(pc.less(snapshots.column("ingested_at"), pa.scalar(moment, pa.timestamp("us"))))


def test_every_snapshot_is_scored_and_every_labeled_row_trains_or_judges(churn_project):
    p = churn_project
    as_of = _first_night(p)

    landed = _landed_before(p.findings, as_of)
    run = p.query("SELECT status, rows_extracted, rows_quarantined, rows_scored, note FROM batchml.runs")[0]
    assert run[:4] == ("succeeded", landed.num_rows, 0, landed.num_rows)
    assert p.scalar("SELECT count(*) FROM batchml.quarantine") == 0
    # every customer once per snapshot: the same id at another event time is another row
    assert p.scalar("SELECT count(DISTINCT (customer_id, event_time)) FROM scores.churn") == landed.num_rows
    assert p.scalar("SELECT count(DISTINCT customer_id) FROM scores.churn") == 250

    # training saw every labeled row of the window: fit + early stopping + holdout, none dropped
    label_at = landed.column("label_at").to_numpy()
    snapshot = landed.column("snapshot_at").to_numpy()
    known = (label_at < np.datetime64(as_of, "us")) & (snapshot >= np.datetime64(as_of - timedelta(days=180), "us"))
    train_rows, holdout_rows, dropped, reasons = p.query(
        "SELECT train_rows, holdout_rows, rows_dropped, drop_reasons FROM batchml.models WHERE version = 1")[0]
    assert train_rows + holdout_rows == int(known.sum())
    assert (dropped, reasons) == (0, None)
    # the holdout is a time split: the last 28 days of labeled snapshots, all 250 customers in each
    latest = snapshot[known].max()
    in_holdout = known & (snapshot >= latest - np.timedelta64(28, "D"))
    assert holdout_rows == int(in_holdout.sum()) and holdout_rows % 250 == 0


def test_only_the_same_customer_at_the_same_snapshot_is_a_duplicate_and_the_log_says_what_training_left_out(churn_project):
    p = churn_project
    week3 = p.findings.filter(pc.equal(p.findings.column("snapshot_at"), pa.scalar(CHURN_START + 3 * WEEK, pa.timestamp("us"))))
    again = week3.slice(0, 5)  # five customers of week 3 land again, an hour later: the later copy wins
    again = again.set_column(again.schema.get_field_index("ingested_at"), "ingested_at",
                             pc.add(again.column("ingested_at"), pa.scalar(3_600_000_000, pa.duration("us"))))
    load_source(p.warehouse, pa.concat_tables([p.findings, again]), name="raw.customer_snapshots")

    as_of = CHURN_START + 20 * WEEK + timedelta(days=1)
    result = p.cli("run", "churn", "--as-of", _date(as_of), "--no-notify", check=True)

    rules = p.query("SELECT rule, count(*) FROM batchml.quarantine GROUP BY rule")
    assert rules == [("duplicate", 5)]
    landed = _landed_before(p.findings, as_of).num_rows
    assert p.query("SELECT rows_extracted, rows_scored FROM batchml.runs") == [(landed + 5, landed)]
    # training pulled the five copies too (week 3 is labeled): left out, counted and named
    dropped, reasons = p.query("SELECT rows_dropped, drop_reasons FROM batchml.models WHERE version = 1")[0]
    assert dropped == 5 and json.loads(reasons) == {"duplicate": 5}
    assert "5 of" in result.stderr and "left out of training and holdout (duplicate: 5)" in result.stderr


def test_nightly_replays_and_backfills_of_snapshots_run_without_a_rejection_and_latest_stays_newest(churn_project):
    p = churn_project
    as_of = _first_night(p)
    first_night = as_of.date()
    api.replay("churn", first_night, first_night + timedelta(days=8), project=p.root)
    # an old backfill: weeks 2-3 again, with the champion
    old = p.cli("backfill", "churn", "--start", _date(CHURN_START + 2 * WEEK), "--end", _date(CHURN_START + 3 * WEEK), check=True)
    assert "rejected" not in old.stdout + old.stderr

    runs = p.query("SELECT kind, status, rows_quarantined FROM batchml.runs ORDER BY started_at")
    assert {status for _, status, _ in runs} == {"succeeded"} and sum(q for _, _, q in runs) == 0
    assert [kind for kind, _, _ in runs].count("replay") == 9 and runs[-1][0] == "backfill"

    newest = p.scalar("SELECT max(snapshot_at) FROM raw.customer_snapshots WHERE ingested_at < ?",
                      [as_of + timedelta(days=8)])
    assert p.query("SELECT count(*), count(DISTINCT customer_id), min(event_time), max(event_time) FROM scores.churn_latest") == [
        (250, 250, newest, newest)]

    # a second model scores the newest snapshot again: for that event its score is now the latest
    api.run("churn", project=p.root, as_of=as_of + timedelta(days=9), force_retrain=True, notify=False)
    forced = p.scalar("SELECT challenger_version FROM batchml.runs ORDER BY started_at DESC LIMIT 1")
    api.backfill("churn", newest.date(), newest.date(), project=p.root, model_version=forced)
    api.backfill("churn", (CHURN_START + 4 * WEEK).date(), (CHURN_START + 4 * WEEK).date(), project=p.root)

    expected = [(250, newest, forced)]
    assert p.query("SELECT count(*), max(event_time), min(model_version) FROM scores.churn_latest") == expected
    catalog = duckdb.connect(str(p.root / "warehouse" / "catalog.duckdb"), read_only=True)
    try:  # the analysts' view is the same
        assert catalog.execute("SELECT count(*), max(event_time), min(model_version) FROM scores.churn_latest").fetchall() == expected
    finally:
        catalog.close()


def test_drift_below_min_rows_is_stored_but_flags_nothing(churn_project):
    p = churn_project
    # a threshold every feature passes as soon as it is judged: a judged batch always drifts
    p.write_config(churn_config(**{"drift": {"psi_threshold": 1e-9, "min_rows": 251},
                                   "training.retrain": {"every_days": None, "on_drift": True, "min_new_labels": None, "max_decay": None},
                                   "notify": {"email": ["ops@example.com"], "on": ["drift"]}}), job="churn")
    as_of = _first_night(p)
    monday = (as_of + WEEK - timedelta(days=1)).date()
    api.replay("churn", monday, monday, project=p.root)

    run_id, drift_flag, triggers, note, pulled = p.query(
        "SELECT run_id, dataset_drift, triggers, note, rows_extracted FROM batchml.runs WHERE kind = 'replay'")[0]
    assert pulled == 250 and drift_flag is False and json.loads(triggers) == []
    assert "not judged (fewer than drift.min_rows 251)" in note
    stored = p.query("SELECT count(*), count(*) FILTER (WHERE drifted), count(*) FILTER (WHERE statistic > 1e-9) "
                     "FROM batchml.drift WHERE run_id = ? AND kind = 'feature'", [run_id])[0]
    assert stored[0] == 4 and stored[1] == 0 and stored[2] > 0  # measured, above the threshold, not flagged
    assert p.scalar("SELECT count(*) FROM batchml.models") == 1
    assert p.scalar("SELECT count(*) FROM batchml.notifications") == 0

    # the next Monday's batch of the same size, judged (min_rows at the batch size): dataset drift, a retrain
    p.write_config(churn_config(**{"drift": {"psi_threshold": 1e-9, "min_rows": 250},
                                   "training.retrain": {"every_days": None, "on_drift": True, "min_new_labels": None, "max_decay": None}}),
                   job="churn")
    api.run("churn", project=p.root, as_of=monday + WEEK + timedelta(days=1), notify=False)
    assert p.query("SELECT rows_extracted, dataset_drift, triggers FROM batchml.runs ORDER BY started_at DESC LIMIT 1") == [
        (250, True, '["drift"]')]


def test_age_counts_from_the_last_training_and_a_rejected_drift_challenger_is_not_retrained_next_time(churn_project):
    p = churn_project
    # every challenger is rejected (it cannot improve AUC by 0.5): the champion keeps its age
    p.write_config(churn_config(**{"promotion": {"bootstrap_resamples": 200, "min_improvement": 0.5},
                                   "training.retrain": {"every_days": 7, "on_drift": False, "min_new_labels": None, "max_decay": None}}),
                   job="churn")
    as_of = _first_night(p)
    start = as_of.date()
    api.replay("churn", start, start + timedelta(days=20), project=p.root)

    trained = p.query("SELECT CAST(as_of AS DATE) FROM batchml.runs WHERE challenger_version IS NOT NULL ORDER BY as_of")
    # v1 on the first night, then one challenger every 7 days (not every night once v1 is 7 days old)
    assert [d for (d,) in trained] == [start, start + timedelta(days=7), start + timedelta(days=14), start + timedelta(days=21)]
    assert p.query("SELECT status, count(*) FROM batchml.models GROUP BY ALL ORDER BY 1") == [("champion", 1), ("rejected", 3)]


def test_a_drift_challenger_that_lost_is_not_trained_again_for_the_same_drift(churn_project):
    p = churn_project
    p.write_config(churn_config(**{"promotion": {"bootstrap_resamples": 200, "min_improvement": 0.5},
                                   "drift": {"psi_threshold": 1e-9},
                                   "training.retrain": {"every_days": None, "on_drift": True, "min_new_labels": None, "max_decay": None}}),
                   job="churn")
    as_of = _first_night(p)
    start = as_of.date()
    api.replay("churn", start, start + timedelta(days=13), project=p.root)

    mondays = p.query("SELECT dataset_drift, triggers, challenger_version, note FROM batchml.runs "
                      "WHERE kind = 'replay' AND rows_extracted > 0 ORDER BY as_of")
    assert [(d, json.loads(t), c) for d, t, c, _ in mondays] == [(True, ["drift"], 2), (True, [], None)]
    assert "drift not retrained for again: challenger v2" in mondays[1][3]


# --- the gate's speed test counts work: the same figure whatever the machine is doing -------------


def _stumps(trees: int, seed: int = 1):
    import lightgbm as lgb

    from batchml.data.features import FeatureSpec

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2_000, 3))
    y = (x[:, 0] + rng.normal(size=2_000) > 0).astype(float)
    params = {"objective": "binary", "num_leaves": 2, "min_data_in_leaf": 1, "verbosity": -1, "seed": seed}
    booster = lgb.train(params, lgb.Dataset(x, y), num_boost_round=trees)
    spec = FeatureSpec(numeric=["a", "b", "c"], categorical=[], categories={})
    table = pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2]})
    return booster, spec, table


def test_the_speed_test_counts_the_nodes_a_row_walks_and_is_the_same_under_load():
    import subprocess
    import sys

    from batchml.models import retrain

    small, spec, holdout = _stumps(20)
    large, _, _ = _stumps(60)
    # a stump tests one split and lands in one leaf: two nodes a tree, for every row
    assert retrain.scoring_work(small, spec, holdout) == 2 * small.num_trees()
    assert retrain.scoring_work(large, spec, holdout) == 2 * large.num_trees()
    idle = retrain.scoring_work(large, spec, holdout) / retrain.scoring_work(small, spec, holdout)
    burner = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    try:
        busy = retrain.scoring_work(large, spec, holdout) / retrain.scoring_work(small, spec, holdout)
    finally:
        burner.kill()
        burner.wait()
    assert idle == busy == large.num_trees() / small.num_trees()
