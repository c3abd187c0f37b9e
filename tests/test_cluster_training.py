"""Challengers trained on a Dask cluster (``training.engine: dask``) on real LocalClusters (worker
processes, one of each size per module): the whole loop, closeness to local training, and a worker
killed during training (a retry, then one clear failure, never a hang)."""

from __future__ import annotations

import json
from collections import Counter
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from batchml.cluster.training import early_stopping_round, fit_on_cluster
from batchml.config import parse_job_config
from batchml.data.extract import EVENT_TIME, LABEL
from batchml.data.features import FeatureSpec, to_matrix
from batchml.demo import data as demo_data
from batchml.errors import ClusterError
from batchml.models import evaluate
from batchml.models.retrain import build_profile
from batchml.models.train import fit, labels, predict, split_by_time
from batchml.pipeline.nightly import run_job
from conftest import START, DemoProject, day, job_config, load_source

distributed = pytest.importorskip("distributed", reason="the dask extra is installed by `make test`")

# a one-worker cluster against local training on the same rows (measured: 0 and 0)
AUC_TOLERANCE = 1e-9
PROBABILITY_TOLERANCE = 1e-9
MOMENT_TOLERANCE = 1e-12  # a merged profile's mean and std: Chan's merge of the parts' moments, not one pass


@pytest.fixture(scope="module")
def source() -> pa.Table:
    return demo_data.generate_findings(START, 110, seed=11, rows_per_day=50, shift_day=90)


@pytest.fixture
def doomed_cluster():
    """Two workers of their own for a test that SIGKILLs them: the shared cluster stays whole, and
    nothing waits for a nanny to bring a killed worker back (on a busy CI machine it may not in time)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  scheduler_kwargs={"dashboard_address": ":0"}) as local:
        yield local


def dask_project(root: Path, source: pa.Table, address: str, **training):
    """A project training on the cluster at ``address``; the rest of the run is local (a table source)."""
    project = DemoProject(root, source)
    load_source(project.warehouse, source)
    config = job_config()
    config["execution"] = {"scheduler": address}
    config["training"].update(engine="dask", time_out_minutes=1, **training)
    project.write_config(config)
    return project, config


def test_a_challenger_trained_on_the_cluster_goes_through_the_whole_loop(tmp_path, source, cluster):
    project, _ = dask_project(tmp_path / "project", source, cluster.scheduler_address)
    # 60: the first model, crowned, by the command: a fresh process imports lightgbm without its
    # scikit-learn estimators (models.lgbm) and must import them for lightgbm.dask
    project.cli("run", "vuln_risk", "--as-of", f"{day(60):%Y-%m-%d}", "--no-notify", check=True)
    # 100: after the shift, a challenger gated against it
    run = run_job(project.project, "vuln_risk", as_of=day(100), notify=False, force_retrain=True)
    assert run.status == "succeeded", run.error
    models = project.query("SELECT version, status, params, artifact_path FROM batchml.models ORDER BY version")
    assert len(models) == 2
    for _, _, params, _ in models:
        params = json.loads(params)
        assert params["engine"] == "dask" and params["num_machines"] == 2 and params["tree_learner"] == "data"
    decisions = project.query("SELECT event FROM batchml.model_events WHERE version = 2")
    assert {event for (event,) in decisions} & {"promoted", "rejected"}
    # every score of the night comes back from model.txt + model.json with plain LightGBM
    champion = project.scalar("SELECT champion_version FROM batchml.runs WHERE as_of = ?", [day(100)])
    folder = Path(next(path for version, _, _, path in models if version == champion))
    booster = lgb.Booster(model_file=str(folder / "model.txt"))
    spec = FeatureSpec.from_dict(json.loads((folder / "model.json").read_text()))
    scored = project.query("SELECT finding_id, score FROM scores.vuln_risk WHERE model_version = ? ORDER BY finding_id", [champion])
    assert len(scored) > 100
    ids = pa.array([i for i, _ in scored], pa.int64())
    rows = source.filter(pc.is_in(source.column("finding_id"), value_set=ids)).sort_by("finding_id")
    assert rows.column("finding_id").to_pylist() == [i for i, _ in scored]
    again = booster.predict(to_matrix(rows, spec))
    assert np.max(np.abs(again - np.array([s for _, s in scored]))) <= 1e-9


def training_split(source: pa.Table, config):
    labeled = source.filter(pc.is_valid(source.column(config.label.column)))
    renamed = [LABEL if c == config.label.column else EVENT_TIME if c == config.source.event_time else c for c in labeled.column_names]
    return split_by_time(labeled.rename_columns(renamed), config)


def test_on_one_worker_it_trains_the_local_model(source, one_worker):
    """One worker bins and grows trees on the same rows as local training, and the validation tail's
    losses cut it at the same round: the same model (measured: every holdout probability equal)."""
    raw = job_config()
    raw["training"]["engine"] = "dask"
    config = parse_job_config(raw, Path("vuln_risk.yaml"))
    split = training_split(source, config)
    local = fit(split, config)
    with distributed.Client(one_worker.scheduler_address) as client:
        on_cluster = fit_on_cluster(split, config, client)
    assert on_cluster.spec == local.spec  # the same encoder
    assert on_cluster.best_iteration == local.best_iteration  # early stopping picked the same round
    y = labels(split.holdout)
    p_local, p_dask = predict(local.booster, split.holdout, local.spec), predict(on_cluster.booster, split.holdout, on_cluster.spec)
    assert abs(evaluate.compute_metrics(y, p_local)["roc_auc"] - evaluate.compute_metrics(y, p_dask)["roc_auc"]) <= AUC_TOLERANCE
    assert np.max(np.abs(p_local - p_dask)) <= PROBABILITY_TOLERANCE


def test_early_stopping_keeps_the_rounds_lightgbms_callback_keeps():
    losses = np.array([5.0, 4.0, 3.0, 3.5, 3.2, 3.0, 3.1, 2.9])
    assert early_stopping_round(losses, 3) == 3  # no improvement on round 3 for 3 rounds: stopped at round 6
    assert early_stopping_round(losses, 5) == 8
    assert early_stopping_round(losses, None) == 8


def kill_training_workers(address: str, times: int, killed: list[str], stop: threading.Event) -> None:
    """SIGKILL a worker running a LightGBM training task, once per fit attempt, ``times`` times."""
    with distributed.Client(address) as client:
        seen: set[str] = set()
        while len(killed) < times and not stop.is_set():
            training = {worker: [str(k) for k in keys if str(k).startswith("_train_part")] for worker, keys in client.processing().items()}
            victim = next((w for w, keys in training.items() if set(keys) - seen), None)
            if victim is not None:
                seen.update(k for keys in training.values() for k in keys)  # this attempt's tasks: the next kill waits for the retry's
                pid = client.run(os.getpid, workers=[victim])[victim]
                os.kill(pid, signal.SIGKILL)
                killed.append(victim)
            time.sleep(0.05)


@contextmanager
def killed_during_training(project, config: dict, address: str, times: int, caplog):
    """The champion trained here; then a forced retrain on the cluster, losing a worker ``times`` times."""
    config["training"]["engine"] = "local"
    project.write_config(config)
    assert run_job(project.project, "vuln_risk", as_of=day(60), notify=False).status == "succeeded"
    config["training"]["engine"] = "dask"
    project.write_config(config)
    killed: list[str] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_training_workers, args=(address, times, killed, stop), daemon=True)
    killer.start()
    try:
        yield
    finally:
        stop.set()
        killer.join(30)
    assert len(killed) == times
    assert "retrying the whole fit once" in caplog.text


SLOW_TRAINING = {"num_leaves": 15, "learning_rate": 0.02, "num_boost_round": 3000}  # long enough to be killed in


@pytest.mark.parametrize("window", [None, "workers"], ids=["client-split", "window-read-by-workers"])
def test_a_worker_killed_during_training_costs_a_retry(tmp_path, source, doomed_cluster, caplog, window):
    """With the window read by the workers, a killed worker's fit rows are rebuilt from the staged window."""
    address = doomed_cluster.scheduler_address
    build = parquet_dask_project if window == "workers" else dask_project
    project, config = build(tmp_path / "project", source, address, params=SLOW_TRAINING)
    with killed_during_training(project, config, address, 1, caplog):
        run = run_job(project.project, "vuln_risk", as_of=day(61), notify=False, force_retrain=True)
    assert run.status == "succeeded" and run.challenger_version == 2
    params = json.loads(project.scalar("SELECT params FROM batchml.models WHERE version = 2"))
    assert params["engine"] == "dask" and params.get("window") == window


def test_a_worker_killed_in_the_retry_too_fails_the_run_in_one_line(tmp_path, source, doomed_cluster, caplog):
    address = doomed_cluster.scheduler_address
    project, config = dask_project(tmp_path / "project", source, address, params=SLOW_TRAINING)
    scores_before = None
    with killed_during_training(project, config, address, 2, caplog):
        scores_before = project.scalar("SELECT count(*) FROM scores.vuln_risk")
        with pytest.raises(ClusterError) as failure:
            run_job(project.project, "vuln_risk", as_of=day(61), notify=False, force_retrain=True)
    message = str(failure.value)
    assert "\n" not in message and "failed twice" in message and "champion keeps scoring" in message
    assert project.query("SELECT status FROM batchml.runs ORDER BY started_at") == [("succeeded",), ("failed",)]
    assert project.scalar("SELECT count(*) FROM batchml.models") == 1  # no challenger registered
    assert project.scalar("SELECT count(*) FROM scores.vuln_risk") == scores_before
    # the champion scores the next night as before
    config["training"]["engine"] = "local"
    project.write_config(config)
    run = run_job(project.project, "vuln_risk", as_of=day(62), notify=False)
    assert run.status == "succeeded" and run.champion_version == 1 and run.rows_scored > 0


# -- the training window read by the workers (a Parquet source) ------------------------------------


def lake_source(root: Path, source: pa.Table, files: int, row_group_size: int):
    """``source`` as Parquet files in ``root`` (with a few keys landed twice, one copy in another
    file: the duplicate rule must rank across shares) and the job's config reading them."""
    import pyarrow.parquet as pq

    again = source.slice(700, 5)
    later = pc.add(again.column("ingested_at"), pa.scalar(3_600_000_000, pa.duration("us")))
    again = again.set_column(again.schema.get_field_index("ingested_at"), "ingested_at", later.cast(again.schema.field("ingested_at").type))
    table = pa.concat_tables([source, again])
    (root / "landing").mkdir(parents=True)
    cuts = np.linspace(0, table.num_rows, files + 1).astype(int)
    for i in range(files):
        pq.write_table(table.slice(cuts[i], cuts[i + 1] - cuts[i]), root / "landing" / f"part-{i}.parquet", row_group_size=row_group_size)
    raw = job_config()
    raw["source"] = {"parquet": "landing/*.parquet", "entity_id": "finding_id", "event_time": "found_at", "watermark": "ingested_at"}
    raw["training"]["engine"] = "dask"
    return parse_job_config(raw, Path("vuln_risk.yaml"))


def local_window(root: Path, config, as_of):
    """The local engine's training pull and split of the same window."""
    from batchml.data.extract import read_run_file, training_filter
    from batchml.storage.source import pull
    from batchml.storage.warehouse import memory_connection

    con = memory_connection("1GB")
    try:
        pulled = pull(con, config, root, training_filter(config, as_of), root / "local-train.arrow")
    finally:
        con.close()
    return pulled, split_by_time(read_run_file(root / "local-train.arrow"), config)


def window_on(client, root: Path, config, as_of):
    from batchml.cluster.window import pull_window
    from batchml.storage.source import describe_source
    from batchml.storage.warehouse import memory_connection

    con = memory_connection("1GB")
    try:
        columns = describe_source(con, config, root)
        return pull_window(client, client.gather, config, config, root, root / "lake", "run-1", as_of, columns, "256MB", con)
    finally:
        con.close()


def same_rows(a: pa.Table, b: pa.Table) -> bool:
    columns = [c for c in a.column_names if not c.startswith("__rule") and c != "__reason" and c != "__record"]
    return a.select(columns).equals(b.select(columns))


def test_the_workers_read_the_window_and_split_it_as_locally(tmp_path, source, cluster):
    """Two workers pull their shares of 3 files x 97-row row groups (duplicates across files); the
    client's split from their answers holds the local split's validation and holdout rows, in its
    order, and its fit rows are the local fit rows (counted, and encoded with the same levels)."""
    from batchml.cluster.window import build_matrices, encode_on_workers, reference_profile
    from batchml.data.features import fit_spec

    config = lake_source(tmp_path, source, 3, 97)
    as_of = day(100)
    pulled, split = local_window(tmp_path, config, as_of)
    with distributed.Client(cluster.scheduler_address) as client:
        window = window_on(client, tmp_path, config, as_of)
        assert len(window.shares) == 2 and all(s.valid for s in window.shares)
        spec = encode_on_workers(client, client.gather, window, config)
        build_matrices(client, window, config, sorted(client.scheduler_info(n_workers=-1)["workers"]))
        fit_rows = [client.gather(x).shape[0] for x, _, _ in window.matrices]
        scores = np.linspace(0.01, 0.99, window.split.holdout.num_rows)
        merged = reference_profile(client, client.gather, window, config, scores).to_dict()
    assert window.pulled.rows == pulled.rows and window.pulled.by_rule == pulled.by_rule and pulled.by_rule.get("duplicate")
    assert window.split.holdout.num_rows > 0 and window.split.validation.num_rows > 0
    assert same_rows(window.split.holdout, split.holdout)
    assert same_rows(window.split.validation, split.validation)
    assert window.fit_rows == sum(fit_rows) == split.fit.num_rows
    assert window.fit_range == tuple(pc.min_max(split.fit.column(EVENT_TIME)).as_py().values())
    assert spec == fit_spec(split.fit, config.features.numeric, config.features.categorical)
    # the reference profile from the parts' counts: the local one (the sample: another uniform sample)
    local_profile = build_profile(split, SimpleNamespace(spec=spec), scores, config.training.seed).to_dict()
    assert_same_profile(merged, local_profile, same_sample=False)


def assert_same_profile(merged: dict, local: dict, same_sample: bool) -> None:
    """Edges, counts, missing and levels equal; moments to float rounding; the numeric sample equal
    (one worker: the same keys) or of the same size (several: the same stream, dealt otherwise)."""
    assert merged["categorical"] == local["categorical"] and merged["score"] == local["score"]
    assert merged["numeric"].keys() == local["numeric"].keys()
    for name, ours in merged["numeric"].items():
        theirs = local["numeric"][name]
        assert (ours["edges"], ours["counts"], ours["missing"]) == (theirs["edges"], theirs["counts"], theirs["missing"]), name
        assert ours["mean"] == pytest.approx(theirs["mean"], rel=MOMENT_TOLERANCE, abs=1e-12), name
        assert ours["std"] == pytest.approx(theirs["std"], rel=MOMENT_TOLERANCE, abs=1e-12), name
        if same_sample:
            assert ours["sample"] == theirs["sample"], name
        else:
            assert len(ours["sample"]) == len(theirs["sample"]) and ours["sample"] != theirs["sample"], name


def test_on_one_worker_the_window_read_there_trains_the_local_model(tmp_path, source, one_worker):
    """One worker reads the window from Parquet and trains where the rows are: the model local
    training builds from the local pull (measured: every holdout probability equal)."""
    from batchml.cluster.window import fit_resident, reference_profile

    config = lake_source(tmp_path, source, 2, 200)
    as_of = day(100)
    _, split = local_window(tmp_path, config, as_of)
    local = fit(split, config)
    with distributed.Client(one_worker.scheduler_address) as client:
        window = window_on(client, tmp_path, config, as_of)
        on_cluster = fit_resident(client, client.gather, window, config)
        scores = predict(on_cluster.booster, window.split.holdout, on_cluster.spec)
        merged = reference_profile(client, client.gather, window, config, scores).to_dict()
    assert on_cluster.spec == local.spec and on_cluster.best_iteration == local.best_iteration
    assert (on_cluster.train_rows, on_cluster.train_start, on_cluster.train_end) == (local.train_rows, local.train_start, local.train_end)
    p_local = predict(local.booster, split.holdout, local.spec)
    p_dask = predict(on_cluster.booster, window.split.holdout, on_cluster.spec)
    assert np.max(np.abs(p_local - p_dask)) <= PROBABILITY_TOLERANCE
    assert_same_profile(merged, build_profile(split, local, scores, config.training.seed).to_dict(), same_sample=True)


@pytest.mark.parametrize("pivots", [1, 4, 2048])
def test_a_profile_merged_from_parts_has_the_edges_and_counts_of_one_pass(monkeypatch, pivots):
    """The distributed selection finds every quantile edge exactly, whether a rank falls on a pivot
    or in a gap between pivots (few pivots: wide gaps), over ties, missing and infinite values, and
    parts of very different sizes (one empty)."""
    from batchml.cluster import reference
    from batchml.monitoring.profiles import build_profile as one_pass

    monkeypatch.setattr(reference, "PIVOTS", pivots)
    rng = np.random.default_rng(5)
    n = 5_000
    heavy = np.where(rng.random(n) < 0.6, 0.0, rng.exponential(3.0, n))  # 60 % zeros: edges on a tie
    spread = rng.normal(10, 2, n)
    spread[rng.random(n) < 0.05] = np.nan
    spread[:3] = [np.inf, -np.inf, np.inf]
    few = rng.integers(0, 4, n).astype(np.float64)
    matrix = np.column_stack([heavy, spread, few])
    cuts = [0, 0, 700, 4_100, n]  # a part with no rows
    parts = [matrix[a:b] for a, b in zip(cuts[:-1], cuts[1:])]

    def run_on_parts(fn, *args):
        return [fn(part, i, *args) for i, part in enumerate(parts)]

    levels = Counter(rng.choice(["a", "b", "c"], n).tolist())
    scores = rng.random(300)
    merged = reference.merged_profile(run_on_parts, ["heavy", "spread", "few"], {"kind": levels}, {"kind": 0}, cuts[:-1],
                                      scores, seed=3).to_dict()
    local = one_pass({"heavy": heavy, "spread": spread, "few": few}, {"kind": np.array(sum(([k] * c for k, c in levels.items()), []),
                                                                                            dtype=object)}, scores, seed=3).to_dict()
    assert merged["numeric"]["heavy"]["edges"][0] == 0.0  # the tie is an edge
    assert_same_profile(merged, local, same_sample=True)  # one stream of keys, dealt by offset: the same sample


def parquet_dask_project(root: Path, source: pa.Table, address: str, execution: str = "local", **training):
    """A project reading ``source`` from 3 Parquet files (300-row row groups), training on the cluster."""
    import pyarrow.parquet as pq

    (root / "landing").mkdir(parents=True)
    for i, cut in enumerate(np.array_split(np.arange(source.num_rows), 3)):
        pq.write_table(source.take(cut), root / "landing" / f"part-{i}.parquet", row_group_size=300)
    project = DemoProject(root, source)
    config = job_config()
    config["source"] = {"parquet": "landing/*.parquet", "entity_id": "finding_id", "event_time": "found_at", "watermark": "ingested_at"}
    config["execution"] = {"engine": execution, "scheduler": address}
    config["training"].update(engine="dask", time_out_minutes=1, **training)
    project.write_config(config)
    return project, config


@pytest.mark.parametrize("execution", ["local", "dask"])
def test_a_challenger_trained_on_the_window_the_workers_read_goes_through_the_whole_loop(tmp_path, source, cluster, execution):
    """A Parquet source: the workers read the window, the challenger is trained where its rows are,
    profiled from the parts, gated, registered and scores as any model (either execution engine)."""
    root = tmp_path / "project"
    project, _ = parquet_dask_project(root, source, cluster.scheduler_address, execution)
    for night in (60, 100):
        run = run_job(project.project, "vuln_risk", as_of=day(night), notify=False, force_retrain=night == 100)
        assert run.status == "succeeded", run.error
    models = project.query("SELECT version, params, artifact_path, train_rows, holdout_rows FROM batchml.models ORDER BY version")
    assert len(models) == 2
    for _, params, folder, train_rows, holdout_rows in models:
        params = json.loads(params)
        assert params["window"] == "workers" and params["num_machines"] == 2 and train_rows > 0 and holdout_rows > 0
        assert json.loads((Path(folder) / "profile.json").read_text())["numeric"]  # the merged reference profile
    assert {e for (e,) in project.query("SELECT event FROM batchml.model_events WHERE version = 2")} & {"promoted", "rejected"}
    champion = project.scalar("SELECT champion_version FROM batchml.runs WHERE as_of = ?", [day(100)])
    folder = Path(next(path for version, _, path, _, _ in models if version == champion))
    booster = lgb.Booster(model_file=str(folder / "model.txt"))
    spec = FeatureSpec.from_dict(json.loads((folder / "model.json").read_text()))
    scored = project.query("SELECT finding_id, score FROM scores.vuln_risk WHERE model_version = ? ORDER BY finding_id", [champion])
    assert len(scored) > 100
    rows = source.filter(pc.is_in(source.column("finding_id"), value_set=pa.array([i for i, _ in scored], pa.int64()))).sort_by("finding_id")
    assert np.max(np.abs(booster.predict(to_matrix(rows, spec)) - np.array([s for _, s in scored]))) <= 1e-9
    assert not list((root / "warehouse").rglob("*-window.arrow"))  # the window's staging files are gone


def test_a_run_imports_lightgbm_without_scikit_learn_until_it_trains_on_dask():
    """The core of LightGBM is all a run needs (models.lgbm: 1.5 s less per process start)."""
    script = (
        "import sys; import batchml.pipeline.nightly, batchml.pipeline.backfill, batchml.cli; import lightgbm; "
        "print(sorted({'sklearn', 'pandas'} & set(sys.modules)), lightgbm.compat.SKLEARN_INSTALLED); "
        "from batchml.cluster import training; import lightgbm; "
        "print(lightgbm.compat.SKLEARN_INSTALLED, lightgbm.compat.PANDAS_INSTALLED, training.lgb is lightgbm, "
        "type(lightgbm.DaskLGBMClassifier(n_estimators=2)).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[] False", "True True True DaskLGBMClassifier"]
