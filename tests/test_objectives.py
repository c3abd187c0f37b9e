"""Regression and multiclass jobs through the whole loop, from YAML alone: first training, nights,
drift, a gated promotion (through the real CLI), a backfill; stored scores reproduced by LightGBM
from model.txt + model.json; the objective's columns read in SQL; configs of the wrong objective
refused. Steps that only build state run in-process through ``batchml.api``, what the commands call."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pytest

from batchml import api
from batchml.models.objectives import OBJECTIVES
from conftest import DemoProject, load_source, with_overrides

START = datetime(2026, 3, 2)
SHIFT = 40  # from this day on, x1 is larger and matters differently: drift, and a challenger that learnt it wins
DAYS = 110
CLASSES = ["billing", "fraud", "tech"]


def at(n: int) -> datetime:
    return START + timedelta(days=n)


def tickets(objective: str, per_day: int = 40, seed: int = 5) -> pa.Table:
    """Seeded events: ``per_day`` a day over DAYS days, landed an hour after they happen, labeled a
    week later. regression: ``cost`` (a few NaN labels: left out); multiclass: ``queue`` (a class
    that is not among the first window's from day 60 on: left out and warned about)."""
    rng = np.random.default_rng(seed)
    n = per_day * DAYS
    day = np.repeat(np.arange(DAYS), per_day)
    at_us = np.datetime64(START, "us") + (day * 86_400 + rng.integers(0, 86_400, n)).astype("timedelta64[s]").astype("timedelta64[us]")
    after = day >= SHIFT
    x1 = rng.normal(0, 1, n) + 1.5 * after
    x2 = rng.normal(0, 1, n)
    x3 = rng.uniform(0, 10, n)
    channel = np.array(["mail", "phone", "web"], dtype=object)[rng.integers(0, 3, n)]
    slope = np.where(after, -25.0, 30.0)  # the concept changes with the shift
    columns = {"ticket_id": np.arange(1, n + 1, dtype=np.int64), "opened_at": pa.array(at_us, pa.timestamp("us")),
               "loaded_at": pa.array(at_us + np.timedelta64(1, "h"), pa.timestamp("us")),
               "x1": x1, "x2": x2, "x3": x3, "channel": channel.astype(str),
               "label_at": pa.array(at_us + np.timedelta64(7, "D"), pa.timestamp("us"))}
    if objective == "regression":
        cost = 200 + slope * x1 - 20 * x2 + 4 * x3 + 15 * (channel == "phone") + rng.normal(0, 10, n)
        cost[rng.random(n) < 0.01] = np.nan
        columns["cost"] = cost
    else:
        logits = np.stack([0.3 * x3 - 1.0, slope / 15 * x1, 0.8 * x2 + 0.6 * (channel == "web")], axis=1)
        logits += rng.gumbel(size=logits.shape)
        queue = np.array(CLASSES, dtype=object)[np.argmax(logits, axis=1)]
        queue[(day >= 60) & (rng.random(n) < 0.02)] = "legal"
        columns["queue"] = queue.astype(str)
    return pa.table(columns)


def ticket_config(objective: str, **overrides) -> dict:
    label = {"column": "cost" if objective == "regression" else "queue", "available_at": "label_at", "objective": objective}
    config = {
        "job": f"tickets_{objective}",
        "source": {"table": "raw.tickets", "entity_id": "ticket_id", "event_time": "opened_at", "watermark": "loaded_at"},
        "features": {"numeric": ["x1", "x2", "x3"], "categorical": ["channel"]},
        "label": label,
        "drift": {"dataset_drift_share": 0.25},  # x1 alone shifts: one feature of four (nights of 40 rows are below drift.min_rows)
        "training": {"window_days": 180, "holdout_days": 14, "min_train_rows": 200,
                     "params": {"num_leaves": 7, "learning_rate": 0.1, "num_boost_round": 60, "early_stopping_rounds": 10},
                     "retrain": {"every_days": None, "on_drift": True, "min_new_labels": None, "max_decay": None}},
        "promotion": {"bootstrap_resamples": 200, "latency_floor_us": 1000.0},
        "notify": {"email": [], "on": ["failure"]},
    }
    if objective == "regression":
        config["scoring"] = {"bands": {"high": 300.0, "medium": 200.0}, "reason_bands": None}
    return with_overrides(config, overrides)


def make_project(tmp_path: Path, objective: str) -> DemoProject:
    table = tickets(objective)
    project = DemoProject(tmp_path / objective, table)
    project.write_config(ticket_config(objective), job=f"tickets_{objective}")
    load_source(project.warehouse, table, name="raw.tickets")
    return project


def lightgbm_scores(project: DemoProject, job: str, version: int, ids: list[int]) -> np.ndarray:
    """LightGBM's own predictions from model.txt and model.json alone (the encoding model.json states:
    numeric as float64, a categorical as its index in categories[feature], unseen or null as NaN)."""
    folder = project.root / "warehouse" / "models" / job / f"v{version}"
    manifest = json.loads((folder / "model.json").read_text())
    booster = lgb.Booster(model_file=str(folder / "model.txt"))
    rows = {r["ticket_id"]: r for r in project.findings.to_pylist()}
    matrix = np.empty((len(ids), len(manifest["features"])))
    for j, feature in enumerate(manifest["features"]):
        levels = manifest.get("categories", {}).get(feature)
        for i, entity in enumerate(ids):
            value = rows[entity][feature]
            if levels is None:
                matrix[i, j] = np.nan if value is None else float(value)
            else:
                matrix[i, j] = levels.index(value) if value in levels else np.nan
    return booster.predict(matrix), manifest


class Warnings(logging.Handler):
    """The messages of the warnings batchml logs while it is attached (to the ``batchml`` logger)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> Warnings:
        logging.getLogger("batchml").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("batchml").removeHandler(self)


def run_the_loop(project: DemoProject, job: str) -> dict:
    """First training, three replayed nights, the shifted weeks in one night (drift: a challenger,
    which the gate promotes), then a backfill with the champion. Returns what the test checks: the
    shifted night's CLI output, and the warnings the other steps (run in-process: they only build
    the state) logged."""
    with Warnings() as logged:
        api.run(job, project=project.root, as_of=at(30))
        api.replay(job, at(30).date(), at(32).date(), project=project.root)
    shifted = project.cli("run", job, "--as-of", at(100).isoformat(), check=True)
    with Warnings() as logged_after:
        api.backfill(job, at(5).date(), at(9).date(), project=project.root)
    return {"shifted": shifted, "warnings": logged.messages + logged_after.messages}


def assert_reproduced(project: DemoProject, job: str, objective: str, run_id: str | None = None) -> int:
    """Every stored score (each version, nightly and backfill; or those of ``run_id``) is LightGBM's on
    model.txt + model.json, to 1e-9."""
    checked = 0
    for (version,) in project.query(f"SELECT DISTINCT model_version FROM scores.{job} ORDER BY 1"):
        columns = "ticket_id, score" + (", predicted_class, probabilities" if objective == "multiclass" else "")
        stored = project.query(f"SELECT {columns} FROM scores.{job} WHERE model_version = ? AND run_id LIKE ? "
                               f"ORDER BY ticket_id, scored_at", [version, run_id or "%"])
        if not stored:
            continue
        raw, manifest = lightgbm_scores(project, job, version, [r[0] for r in stored])
        assert manifest["objective"] == objective
        if objective == "multiclass":
            classes = manifest["classes"]
            assert np.max(np.abs(np.array([r[1] for r in stored]) - raw.max(axis=1))) <= 1e-9
            assert [r[2] for r in stored] == [classes[i] for i in raw.argmax(axis=1)]
            got = np.array([[r[3][c] for c in classes] for r in stored])
            assert np.max(np.abs(got - raw)) <= 1e-9
        else:
            assert np.max(np.abs(np.array([r[1] for r in stored]) - raw)) <= 1e-9
        checked += len(stored)
    return checked


def assert_the_loop(project: DemoProject, job: str, runs: dict) -> None:
    kinds = project.query("SELECT kind, status, promoted, dataset_drift, champion_version FROM batchml.runs WHERE job = ? "
                          "ORDER BY started_at LIMIT 6", [job])  # (the compiled test below may add a run)
    assert [k[0] for k in kinds] == ["nightly", "replay", "replay", "replay", "nightly", "backfill"]
    assert all(k[1] == "succeeded" for k in kinds)
    assert "not delivered" not in runs["shifted"].stdout + runs["shifted"].stderr  # every report was written
    assert not any("not delivered" in message for message in runs["warnings"]), runs["warnings"]
    assert kinds[0][2] and kinds[0][4] == 1  # the first champion
    assert kinds[4][3], "the shifted weeks drift"
    events = project.query("SELECT version, event FROM batchml.model_events WHERE job = ? ORDER BY recorded_at, version", [job])
    assert (2, "promoted") in events, events  # the gate promoted the challenger trained on the shifted weeks
    assert kinds[4][4] == 2 and kinds[5][4] == 2  # and it scored that night's rows and the backfill
    scored = project.scalar(f"SELECT count(*) FROM scores.{job} WHERE run_id = (SELECT run_id FROM batchml.runs "
                            f"WHERE job = ? AND kind = 'backfill' ORDER BY started_at LIMIT 1)", [job])
    assert scored == 5 * 40


@pytest.fixture(scope="module")
def regression(tmp_path_factory) -> tuple[DemoProject, dict]:
    project = make_project(tmp_path_factory.mktemp("objectives"), "regression")
    return project, run_the_loop(project, "tickets_regression")


@pytest.fixture(scope="module")
def multiclass(tmp_path_factory) -> tuple[DemoProject, dict]:
    project = make_project(tmp_path_factory.mktemp("objectives"), "multiclass")
    return project, run_the_loop(project, "tickets_multiclass")


def test_a_regression_job_runs_the_loop_and_its_scores_are_lightgbms(regression):
    project, runs = regression
    assert_the_loop(project, "tickets_regression", runs)
    assert assert_reproduced(project, "tickets_regression", "regression") >= 4000
    # the gate compared the objective's metrics, rmse first (lower is better: the improvement is positive)
    decision = json.loads(project.scalar("SELECT metrics FROM batchml.model_events WHERE job = 'tickets_regression' AND event = 'promoted' "
                                         "AND version = 2"))
    assert decision["metric"] == "rmse" and set(decision["metrics_champion"]) == {"rmse", "mae", "r2"}
    assert decision["metrics_challenger"]["rmse"] < decision["metrics_champion"]["rmse"] and decision["bootstrap"]["diff"] > 0
    # bands are value thresholds; every band has rows, and reasons are given for every row (reason_bands null)
    bands = dict(project.query("SELECT risk_band, min(score) FROM scores.tickets_regression GROUP BY 1"))
    assert set(bands) == {"high", "medium", "low"} and bands["high"] >= 300 and 200 <= bands["medium"] < 300
    assert project.scalar("SELECT count(*) FROM scores.tickets_regression WHERE reasons IS NULL") == 0
    # NaN labels are left out as unlabeled, with a warning naming the column
    assert "(label.column) that is not a finite number" in runs["shifted"].stderr + runs["shifted"].stdout
    # realised performance of the champion, per event day, in the objective's metric; no CBPE estimate
    realised = project.query("SELECT metric, value, positives, estimated FROM batchml.performance WHERE job = 'tickets_regression'")
    assert realised and {r[0] for r in realised} == {"rmse"} and all(r[2] is None and not r[3] for r in realised)
    model = json.loads((project.root / "warehouse/models/tickets_regression/v1/model.json").read_text())
    assert model["objective"] == "regression" and "classes" not in model and model["params"]["objective"] == "regression"
    # models list gives each version's own holdout figure in the job's metric
    own = json.loads(project.scalar("SELECT metrics FROM batchml.models WHERE job = 'tickets_regression' AND version = 1"))["holdout"]["rmse"]
    listing = project.cli("models", "list", "tickets_regression", check=True).stdout
    v1 = next(line for line in listing.splitlines() if line.strip().startswith("v1 "))
    assert "own holdout rmse" in listing and f"{own:.4f}" in v1


def test_a_multiclass_job_runs_the_loop_with_classes_queryable_in_sql(multiclass):
    project, runs = multiclass
    job = "tickets_multiclass"
    assert_the_loop(project, job, runs)
    assert assert_reproduced(project, job, "multiclass") >= 4000
    model = json.loads((project.root / f"warehouse/models/{job}/v2/model.json").read_text())
    assert model["classes"] == CLASSES and model["params"]["num_class"] == 3  # the first window's classes, kept
    decision = json.loads(project.scalar(f"SELECT metrics FROM batchml.model_events WHERE job = '{job}' AND version = 2 AND event = 'promoted'"))
    assert decision["metric"] == "multi_logloss" and set(decision["metrics_champion"]) == {"multi_logloss", "accuracy", "macro_f1"}
    # SQL over the analysts' view: the predicted class, one probability by name, and the map as rows
    rows = project.query(f"SELECT predicted_class, score, probabilities['fraud'], probabilities FROM scores.{job}_latest")
    assert {r[0] for r in rows} == set(CLASSES)
    assert all(abs(sum(r[3].values()) - 1) < 1e-9 and r[1] == max(r[3].values()) for r in rows)
    assert all(r[2] == r[3]["fraud"] for r in rows)
    # ... and in the analysts' catalog (Parquet copies: the MAP stays a map)
    import duckdb

    catalog = duckdb.connect(str(project.root / "warehouse" / "catalog.duckdb"), read_only=True)
    try:
        published = catalog.execute(f"SELECT count(*), count(DISTINCT predicted_class), min(probabilities['tech']) "
                                    f"FROM scores.{job}_latest").fetchone()
    finally:
        catalog.close()
    assert published[0] == len(rows) and published[1] == 3 and 0 < published[2] < 1
    report = sorted((project.root / "warehouse" / "reports" / job).glob(f"{job}-*.html"))[0].read_text()
    assert "predicted fraud" in report  # no bands: the report counts the rows per predicted class
    per_class = project.query(f"SELECT key, avg(value) FROM (SELECT unnest(map_entries(probabilities)) AS e FROM scores.{job}) "
                              f"CROSS JOIN LATERAL (SELECT e.key, e.value) GROUP BY key ORDER BY key")
    assert [r[0] for r in per_class] == CLASSES
    # no bands configured: risk_band is null; reasons for every row, towards its predicted class
    assert project.scalar(f"SELECT count(*) FROM scores.{job} WHERE risk_band IS NOT NULL") == 0
    assert project.scalar(f"SELECT count(*) FROM scores.{job} WHERE reasons IS NULL") == 0
    # the class first seen after the first window is left out and warned about, by runs and by check
    assert "not one of the job's classes ('legal')" in runs["shifted"].stderr + runs["shifted"].stdout
    check = project.cli("check", job)
    assert "not one of the job's classes ('legal')" in check.stdout + check.stderr
    realised = project.query(f"SELECT DISTINCT metric FROM batchml.performance WHERE job = '{job}' AND value IS NOT NULL")
    assert realised == [("multi_logloss",)]


def test_multiclass_reasons_are_the_contributions_towards_the_predicted_class(multiclass):
    from batchml.models.reasons import PathExplainer, leaf_indices, shap_contributions

    project, _ = multiclass
    folder = project.root / "warehouse/models/tickets_multiclass/v2"
    booster = lgb.Booster(model_file=str(folder / "model.txt"))
    matrix = np.random.default_rng(1).normal(0, 1, (50, 4))
    matrix[:, 3] = np.random.default_rng(2).integers(0, 3, 50)
    predicted = booster.predict(matrix).argmax(axis=1)
    raw = booster.predict(matrix, raw_score=True)
    explainer = PathExplainer.from_model_text((folder / "model.txt").read_text(), 4, 3)
    path = explainer.contributions(leaf_indices(booster, matrix), predicted)
    shap = shap_contributions(booster, matrix, predicted)
    # both add up to the predicted class's raw score, less a per-class constant (the trees' root values / SHAP's bias)
    full = np.asarray(booster.predict(matrix, pred_contrib=True)).reshape(50, 3, 5)
    chosen_raw = raw[np.arange(50), predicted]
    assert np.allclose(shap.sum(axis=1) + full[np.arange(50), predicted, -1], chosen_raw)
    offsets = chosen_raw - path.sum(axis=1)
    for cls in np.unique(predicted):
        assert np.ptp(offsets[predicted == cls]) < 1e-9


@pytest.mark.parametrize(
    "objective, promotion, message",
    [
        ("regression", {"metric": "roc_auc"}, "promotion.metric: roc_auc is a binary metric but label.objective is regression: "
                                              "choose from rmse, mae, r2"),
        ("multiclass", {"guard": {"rmse": 1.0}}, "promotion.guard: unknown guard metric rmse (a regression metric) for "
                                                 "label.objective is multiclass"),
    ],
)
def test_a_metric_of_another_objective_is_refused_in_one_line(tmp_path, objective, promotion, message):
    project = DemoProject(tmp_path / "p", tickets(objective, per_day=2))
    job = f"tickets_{objective}"
    project.write_config(ticket_config(objective, promotion=promotion), job=job)
    load_source(project.warehouse, project.findings, name="raw.tickets")
    result = project.cli("run", job, "--as-of", at(30).isoformat())
    assert result.returncode == 2
    error = result.stderr.strip()
    assert message in error and "\n" not in error and "Traceback" not in error


def test_binary_stays_the_default_and_objectives_name_their_metrics():
    from batchml.config import JobConfig
    from conftest import job_config

    config = JobConfig.model_validate(job_config())
    assert config.label.objective == "binary" and config.promotion.metric == "roc_auc"
    assert config.scoring.bands == {"high": 0.5, "medium": 0.2} and config.promotion.guard == {"log_loss": 0.01}
    regression = JobConfig.model_validate(ticket_config("regression"))
    assert regression.promotion.metric == "rmse" and regression.promotion.guard == {}
    multiclass = JobConfig.model_validate(ticket_config("multiclass"))
    assert multiclass.promotion.guard == {"accuracy": 0.01} and multiclass.scoring.bands == {}
    assert OBJECTIVES["regression"].improvement("rmse", 10.0, 8.0) == 2.0  # lower is better
    assert OBJECTIVES["multiclass"].improvement("accuracy", 0.5, 0.6) == pytest.approx(0.1)


@pytest.mark.parametrize("objective", ["regression", "multiclass"])
def test_compiled_trees_score_every_objective_as_lightgbm_does(request, objective):
    """lleaves compiles binary, regression and multiclass models: the champion compiled by hand,
    verified against LightGBM, then scoring a backfill; its scores are LightGBM's to 1e-9."""
    pytest.importorskip("lleaves", reason="needs the compiled extra: pip install 'batchml[compiled]'")
    project, _ = request.getfixturevalue(objective)
    job = f"tickets_{objective}"
    project.write_config(ticket_config(objective, scoring={**ticket_config(objective).get("scoring", {}), "engine": "compiled"}), job=job)
    try:
        compiled = project.cli("models", "compile", job, check=True)
        assert "scores library ready" in compiled.stdout and "leaves library ready" in compiled.stdout, compiled.stdout + compiled.stderr
        result = project.cli("backfill", job, "--start", at(10).date().isoformat(), "--end", at(11).date().isoformat(), check=True)
    finally:
        project.write_config(ticket_config(objective), job=job)
    output = result.stdout + result.stderr
    assert "(compiled)" in output and "not used" not in output, output
    run_id = project.scalar("SELECT run_id FROM batchml.runs WHERE job = ? ORDER BY started_at DESC LIMIT 1", [job])
    assert assert_reproduced(project, job, objective, run_id) == 2 * 40


@pytest.mark.parametrize("objective", ["regression", "multiclass"])
def test_try_judges_a_candidate_with_the_objectives_metrics(request, objective):
    project, _ = request.getfixturevalue(objective)
    result = project.cli("try", f"tickets_{objective}", "--format", "json")
    assert result.returncode in (0, 4), result.stderr
    trial = json.loads(result.stdout)
    assert trial["metric"] == OBJECTIVES[objective].default_metric
    assert trial["rows"]["holdout_positives"] is None and trial["champion"]["version"] >= 2
    assert {c["name"] for c in trial["conditions"]} >= {"min_holdout_rows", "comparable", "min_improvement"}
    assert {m["name"] for m in trial["metrics"]} == set(OBJECTIVES[objective].metrics)


def test_regression_and_multiclass_metrics_agree_with_sklearn():
    from sklearn import metrics as sk

    rng = np.random.default_rng(3)
    y = rng.normal(10, 3, 500)
    p = y + rng.normal(0, 1, 500)
    got = OBJECTIVES["regression"].compute_metrics(y, p)
    assert got["rmse"] == pytest.approx(np.sqrt(sk.mean_squared_error(y, p)), abs=1e-12)
    assert got["mae"] == pytest.approx(sk.mean_absolute_error(y, p), abs=1e-12)
    assert got["r2"] == pytest.approx(sk.r2_score(y, p), abs=1e-12)
    classes = rng.integers(0, 4, 500)
    logits = rng.normal(0, 1, (500, 4)) + 1.5 * np.eye(4)[classes]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    got = OBJECTIVES["multiclass"].compute_metrics(classes, probabilities)
    assert got["multi_logloss"] == pytest.approx(sk.log_loss(classes, probabilities, labels=range(4)), abs=1e-12)
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(classes, probabilities.argmax(axis=1)), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(sk.f1_score(classes, probabilities.argmax(axis=1), average="macro"), abs=1e-12)


@pytest.mark.parametrize("objective", ["regression", "multiclass"])
def test_the_paired_bootstrap_resamples_as_the_binary_one_does(objective):
    """Weighted by resample counts, each resample's figure is the metric of the resampled rows."""
    from batchml.models.evaluate import _resample_counts

    rng = np.random.default_rng(4)
    if objective == "regression":
        y = rng.normal(0, 1, 300)
        a, b = y + rng.normal(0, 1, 300), y + rng.normal(0, 0.5, 300)
    else:
        y = rng.integers(0, 3, 300)
        a = rng.dirichlet(np.ones(3), 300)
        b = 0.5 * a + 0.5 * np.eye(3)[y]
    obj = OBJECTIVES[objective]
    counts = _resample_counts(np.random.default_rng(0), 300, 5)
    for metric in obj.metrics:
        weighted = obj._weighted(metric, y, b, counts)
        for i in range(5):
            rows = np.repeat(np.arange(300), counts[i])
            assert weighted[i] == pytest.approx(obj.compute_metrics(y[rows], b[rows])[metric], abs=1e-12)
    result = obj.paired_bootstrap(y, a, b, obj.default_metric, resamples=300, seed=1)
    assert result.diff > 0 and result.low > 0 and result.resamples == 300  # b is the better model, clearly
