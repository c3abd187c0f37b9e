"""The Dask engine on a real LocalCluster (one per module, worker processes): the same nights give
the same scores, quarantine and drift as the local engine; a killed worker, a killed client and an
unreachable scheduler leave nothing half done."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchml.demo import data as demo_data
from batchml.pipeline.backfill import backfill
from batchml.cluster import tasks
from batchml.cluster.run import SHARES_PER_WORKER
from batchml.cluster.connect import scheduler_address
from batchml.config import parse_job_config
from batchml.errors import ConfigError
from batchml.pipeline.nightly import run_job
from conftest import REPO, START, DemoProject, day, job_config

distributed = pytest.importorskip("distributed", reason="the dask extra is installed by `make test`")

NIGHTS = (60, 100)  # the first champion is trained at 60; 100 is after the shift (drift)


@pytest.fixture(scope="module")
def source() -> pa.Table:
    """Findings with bad rows of every kind and a few ids landing twice (the later one wins)."""
    findings = demo_data.generate_findings(START, 110, seed=11, rows_per_day=50, shift_day=90)
    findings = demo_data.inject_bad_rows(findings, 0.02, seed=3)
    again = findings.slice(200, 6)
    later = pa.compute.add(again.column("ingested_at"), pa.scalar(3_600_000_000, pa.duration("us")))
    again = again.set_column(again.schema.get_field_index("ingested_at"), "ingested_at", later.cast(again.schema.field("ingested_at").type))
    return pa.concat_tables([findings, again])


def parquet_project(root: Path, table: pa.Table, files: int, row_group_size: int | None = None, overrides: dict | None = None,
                    **execution) -> DemoProject:
    """A project whose source is ``table`` cut into ``files`` Parquet files (of ``row_group_size`` row groups)."""
    landing = root / "landing"
    landing.mkdir(parents=True)
    cuts = np.linspace(0, table.num_rows, files + 1).astype(int)
    for i in range(files):
        pq.write_table(table.slice(cuts[i], cuts[i + 1] - cuts[i]), landing / f"part-{i}.parquet", row_group_size=row_group_size)
    project = DemoProject(root, table)
    config = job_config(**(overrides or {}))
    config["source"] = {"parquet": "landing/*.parquet", "entity_id": "finding_id", "event_time": "found_at", "watermark": "ingested_at"}
    if execution:
        config["execution"] = execution
    project.write_config(config)
    return project


AS_OF = "CASE WHEN kind = 'backfill' THEN NULL ELSE as_of END"  # a backfill runs as of now


def results(project: DemoProject) -> dict:
    """What must not depend on the engine, run ids and times left out."""
    return {
        "scores": project.query("SELECT finding_id, score, risk_band, model_version, event_time, reasons, r.kind "
                                "FROM scores.vuln_risk s JOIN batchml.runs r USING (run_id) ORDER BY ALL"),
        "quarantine": project.query("SELECT entity_id, rule, reason, record FROM batchml.quarantine ORDER BY ALL"),
        "drift": project.query(f"SELECT {AS_OF.replace('kind', 'r.kind')}, feature, method, d.kind, statistic, p_value, drifted, n_reference, n_current, histogram "
                               "FROM batchml.drift d JOIN batchml.runs r USING (run_id) ORDER BY ALL NULLS FIRST"),
        "runs": project.query(f"SELECT {AS_OF}, status, rows_extracted, rows_quarantined, rows_scored, champion_version, promoted, "
                              "watermark_to FROM batchml.runs ORDER BY ALL"),
    }


def run_nights(project: DemoProject, nights=NIGHTS, **kwargs) -> None:
    for night in nights:
        run = run_job(project.project, "vuln_risk", as_of=day(night), notify=False, **kwargs)
        assert run.status == "succeeded", run.error


def nights_and_backfill(project: DemoProject) -> None:
    run_nights(project)
    run = backfill(project.project, "vuln_risk", (START + timedelta(days=20)), (START + timedelta(days=40)))
    assert run.status == "succeeded" and run.rows_scored > 0


@pytest.fixture(scope="module")
def local_results(tmp_path_factory, source) -> dict:
    project = parquet_project(tmp_path_factory.mktemp("local") / "project", source, files=3)
    nights_and_backfill(project)
    return results(project)


def assert_same(found: dict, expected: dict) -> None:
    assert found["runs"] == expected["runs"]
    assert found["scores"] == expected["scores"]  # bitwise: DuckDB compares the doubles exactly
    assert found["quarantine"] == expected["quarantine"]
    assert len(found["drift"]) == len(expected["drift"])
    for ours, theirs in zip(found["drift"], expected["drift"]):
        assert ours[:4] == theirs[:4] and ours[6:] == theirs[6:]
        for a, b in zip(ours[4:6], theirs[4:6]):  # statistic, p-value
            assert (a is None and b is None) or abs(a - b) <= 1e-9


@pytest.mark.parametrize("workers, files, row_group_size, keys_per_bucket",
                         [(1, 3, None, None), (2, 7, None, None), (2, 1, 700, None), (2, 7, None, 500)])
def test_the_dask_engine_gives_the_local_engines_scores_quarantine_and_drift(tmp_path, source, local_results, cluster, one_worker,
                                                                               workers, files, row_group_size, keys_per_bucket,
                                                                               caplog, monkeypatch):
    """Shares cut by file (7 files) or by row group (one file): the duplicates' first copies lie in
    the first share, their later copies in the last, and the later copies still win; also when the
    keys are hashed into more buckets than shares (a big night's: ``KEYS_PER_BUCKET``)."""
    if keys_per_bucket:
        monkeypatch.setattr(tasks, "KEYS_PER_BUCKET", keys_per_bucket)  # read on the client, which plans the buckets
    address = (one_worker if workers == 1 else cluster).scheduler_address
    project = parquet_project(tmp_path / "project", source, files, row_group_size, engine="dask", scheduler=address)
    with caplog.at_level("INFO", logger="batchml"):
        nights_and_backfill(project)  # the backfill too runs on the cluster
    found = results(project)
    assert found["scores"] and found["quarantine"] and found["drift"]
    assert {rule for _, rule, _, _ in found["quarantine"]} >= {"null_entity_id", "out_of_range", "non_finite", "duplicate"}
    assert_same(found, local_results)
    per_run = project.query("SELECT count(*), count(DISTINCT partition) FROM batchml.manifests WHERE kind = 'scores' GROUP BY run_id")
    assert len(per_run) == len(NIGHTS) + 1
    assert all(files == shares <= SHARES_PER_WORKER * workers for files, shares in per_run)  # one file per partition and run, no stray attempt
    assert max(shares for _, shares in per_run) == SHARES_PER_WORKER * workers  # row groups enough for every share
    shared = [r.getMessage() for r in caplog.records if "occur in more than one partition" in r.getMessage()]
    assert shared  # the split duplicates were ranked across shares (one worker's night has two too)


def test_shares_whose_ids_cannot_meet_skip_the_keys_step_and_still_give_the_local_engines_results(tmp_path, source, cluster,
                                                                                                    caplog):
    """Sorted by id, each file's ids span a range of their own (the later copies of a duplicate
    sit beside their first copies): the footers say no id lies in two shares, so no keys step runs,
    and each share's own ranking still picks the local engine's winners."""
    ordered = source.sort_by([("finding_id", "ascending"), ("ingested_at", "ascending")])
    local = parquet_project(tmp_path / "local", ordered, 4)
    nights_and_backfill(local)
    dask = parquet_project(tmp_path / "dask", ordered, 4, engine="dask", scheduler=cluster.scheduler_address)
    with caplog.at_level("INFO", logger="batchml"):
        nights_and_backfill(dask)
    messages = [r.getMessage() for r in caplog.records]
    assert any("no finding_id lies in two partitions" in m for m in messages)
    assert not any("occur in more than one partition" in m for m in messages)
    found = results(dask)
    assert "duplicate" in {rule for _, rule, _, _ in found["quarantine"]}
    assert_same(found, results(local))


def test_shared_keys_finds_keys_of_several_shares_and_shares_holding_a_key_twice(tmp_path):
    """One bucket's key files of three shares: key 1 in shares 0 and 2, key 2 twice in share 1,
    key 3 once, key 7 (no event time: a key like any other) in shares 0 and 2."""
    at = pa.array([1, 1, 2, 2, 3, None, None], pa.timestamp("us"))
    rows = pa.table({"__id": [1, 1, 2, 2, 3, 7, 7], "__at": at, "__part": [0, 2, 1, 1, 1, 0, 2]})
    folders = []
    for share in range(3):
        folder = tmp_path / f"keys-{share}" / "__bucket=0"
        folder.mkdir(parents=True)
        pq.write_table(rows.filter(pa.compute.equal(rows["__part"], share)), folder / "data_0.parquet")
        folders.append(str(folder.parent))
    shared, twice = tasks.shared_keys(folders, 0)
    assert sorted(zip(shared["__id"].to_pylist(), shared["parts"].to_pylist())) == [(1, [0, 2]), (7, [0, 2])]
    assert twice == {1}
    assert tasks.shared_keys(folders, 1) == (pa.table({}), set())  # an empty bucket


UNPASSABLE_SHADOW = {"promotion.min_improvement": 0.5, "promotion.shadow": True}  # every challenger rejected, and scoring in the shadow


def test_shadow_scores_on_the_dask_engine_are_the_local_engines(tmp_path, source, cluster):
    shadow = "SELECT finding_id, score, risk_band, model_version FROM scores.vuln_risk_shadow ORDER BY ALL"
    local = parquet_project(tmp_path / "local", source, 3, overrides=UNPASSABLE_SHADOW)
    run_nights(local, nights=(60, 100, 101))
    on_dask = parquet_project(tmp_path / "dask", source, 7, overrides=UNPASSABLE_SHADOW, engine="dask",
                              scheduler=cluster.scheduler_address)
    run_nights(on_dask, nights=(60, 100, 101))
    expected = local.query(shadow)
    assert expected and min(version for *_, version in expected) >= 2  # rejected challengers scored in the shadow, not the champion v1
    assert on_dask.query(shadow) == expected
    latest = "SELECT count(*), count(DISTINCT finding_id) FROM scores.vuln_risk_shadow_latest"
    assert on_dask.query(latest) == local.query(latest)
    assert on_dask.scalar("SELECT count(*) FROM batchml.manifests WHERE kind = 'shadow'") > 0


def test_a_night_with_a_promotion_on_dask_stores_the_new_champions_scores_as_the_local_engine(tmp_path, findings, cluster):
    """The tasks score with the night's first champion (v1) as they read; v2, promoted after the
    gate, scores the rows they kept: the stored scores are v2's, equal to the local engine's, and
    the pass's v1 files are not left in the lake."""
    promotion = {"metric": "roc_auc", "min_improvement": 0.002, "guard": {"log_loss": 0.01}, "max_latency_ratio": 50,
                 "bootstrap_resamples": 500}
    stored = {}
    for engine in ("local", "dask"):
        execution = {"engine": "dask", "scheduler": cluster.scheduler_address} if engine == "dask" else {}
        project = parquet_project(tmp_path / engine, findings, 2, overrides={"promotion": promotion}, **execution)
        run_nights(project, nights=(60,))
        run = run_job(project.project, "vuln_risk", as_of=day(135), force_retrain=True, notify=False)
        assert run.status == "succeeded" and run.promoted and run.champion_version == 2, run.error
        stored[engine] = project.query("SELECT finding_id, score, model_version FROM scores.vuln_risk WHERE run_id = ? "
                                       "ORDER BY finding_id", [run.run_id])
    assert len(stored["dask"]) == run.rows_scored > 0 and {version for *_, version in stored["dask"]} == {2}
    assert stored["dask"] == stored["local"]
    lake = project.root / "warehouse" / "lake" / "vuln_risk" / "scores"
    assert sorted(str(p) for p in lake.rglob("*.parquet")) == sorted(
        path for (path,) in project.query("SELECT path FROM batchml.manifests WHERE kind = 'scores'"))


def test_workers_load_the_champions_registered_compiled_trees_instead_of_building_them_again(tmp_path, source, cluster):
    pytest.importorskip("lleaves", reason="the compiled extra is installed by `make test`")
    project = parquet_project(tmp_path / "project", source, 3, overrides={"scoring.engine": "compiled"}, engine="dask",
                              scheduler=cluster.scheduler_address)
    run_nights(project, nights=(60,))  # v1 trained and promoted; compiled after the commit, its libraries registered
    registered = project.query("SELECT file, sha256 FROM batchml.compiled_libraries WHERE version = 1 ORDER BY ALL")
    libraries = [path for file, _ in registered for path in (project.root / "warehouse" / "models").rglob(file)]
    built = {path: path.stat().st_mtime_ns for path in libraries}
    run_nights(project, nights=(100,))  # the workers score with v1
    assert registered and len(libraries) == len(registered)
    assert {path: path.stat().st_mtime_ns for path in libraries} == built  # a worker refusing them would build them again
    assert project.query("SELECT file, sha256 FROM batchml.compiled_libraries WHERE version = 1 ORDER BY ALL") == registered


def test_analysts_read_the_committed_lake_files_linked_into_published_not_written_again(tmp_path, source, cluster):
    project = parquet_project(tmp_path / "project", source, 7, engine="dask", scheduler=cluster.scheduler_address)
    run_nights(project)
    published = {path.stat().st_ino for path in (project.root / "warehouse" / "published" / "scores" / "vuln_risk").glob("*.parquet")}
    scored = project.query("SELECT path FROM batchml.manifests WHERE kind = 'scores' AND rows > 0")
    assert len(scored) > 2 and {Path(path).stat().st_ino for path, in scored} == published  # two nights, several partitions each
    with duckdb.connect(str(project.root / "warehouse" / "catalog.duckdb"), read_only=True) as catalog:
        seen = catalog.execute("SELECT finding_id, score, run_id FROM scores.vuln_risk ORDER BY ALL").fetchall()
    assert seen and seen == project.query("SELECT finding_id, score, run_id FROM scores.vuln_risk ORDER BY ALL")


def test_files_no_manifest_lists_are_invisible_and_swept_by_the_next_run(tmp_path, source, cluster):
    project = parquet_project(tmp_path / "project", source, 3, engine="dask", scheduler=cluster.scheduler_address)
    run_nights(project, nights=(60,))
    rows = project.scalar("SELECT count(*) FROM scores.vuln_risk")
    listed = Path(project.scalar("SELECT min(path) FROM batchml.manifests WHERE kind = 'scores'"))
    stray = listed.with_name("part-00000-stray000.parquet")  # as a retried task's other attempt would leave it
    stray.write_bytes(listed.read_bytes())
    os.utime(stray, (time.time() - 60, time.time() - 60))
    assert project.scalar("SELECT count(*) FROM scores.vuln_risk") == rows
    assert project.scalar("SELECT count(*) FROM scores.vuln_risk_latest") == project.scalar("SELECT count(DISTINCT finding_id) FROM scores.vuln_risk")
    run_nights(project, nights=(61,))
    assert not stray.exists() and listed.exists()


def test_a_worker_killed_during_scoring_costs_a_retry_and_loses_nothing(tmp_path, source, local_results, cluster, monkeypatch):
    project = parquet_project(tmp_path / "project", source, 3, engine="dask", scheduler=cluster.scheduler_address)
    run_nights(project, nights=NIGHTS[:1])
    monkeypatch.setenv("BATCHML_PAUSE_AT", "score_partition")  # scoring tasks wait 2 s before they start
    monkeypatch.setenv("BATCHML_PAUSE_SECONDS", "2")
    outcome: dict = {}
    night = threading.Thread(target=lambda: outcome.update(run=run_job(project.project, "vuln_risk", as_of=day(NIGHTS[1]), notify=False)))
    night.start()
    with distributed.Client(cluster.scheduler_address) as client:
        victim = None
        deadline = time.monotonic() + 60
        while victim is None and time.monotonic() < deadline:
            victim = next((w for w, keys in client.processing().items() if any(str(k).startswith("score-") for k in keys)), None)
            time.sleep(0.05)
        assert victim is not None, "no scoring task started"
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        night.join(120)
        client.wait_for_workers(2, timeout=60)  # the nanny restarts it, for the tests that follow
    assert outcome["run"].status == "succeeded"
    nightly = [row for row in local_results["scores"] if row[-1] != "backfill"]
    assert results(project)["scores"] == nightly  # every row scored exactly once, same scores
    assert project.scalar("SELECT count(*) FROM scores.vuln_risk") == project.scalar("SELECT count(*) FROM (SELECT DISTINCT finding_id, run_id FROM scores.vuln_risk)")


def test_the_client_killed_before_its_commit_leaves_nothing_visible_and_the_next_run_does_the_night(tmp_path, source, cluster):
    project = parquet_project(tmp_path / "project", source, 3, engine="dask", scheduler=cluster.scheduler_address)
    run_nights(project, nights=(60,))
    before = project.scalar("SELECT count(*) FROM scores.vuln_risk")
    lake = project.root / "warehouse" / "lake" / "vuln_risk" / "scores"
    files_before = set(lake.rglob("*.parquet"))
    env = {**os.environ, "BATCHML_THREADS": "1", "BATCHML_PAUSE_AT": "score", "BATCHML_PAUSE_SECONDS": "60"}
    child = subprocess.Popen([sys.executable, "-m", "batchml.cli", "--project", str(project.root), "run", "vuln_risk",
                              "--as-of", "2026-03-10", "--no-notify"], env=env, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        for line in child.stderr:  # the workers have written the night's scores; the client has not committed
            if "paused at score" in line:
                break
        written = set(lake.rglob("*.parquet")) - files_before
        assert written
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(30)
    assert project.scalar("SELECT count(*) FROM scores.vuln_risk") == before
    assert project.scalar("SELECT count(*) FROM batchml.watermarks WHERE value > TIMESTAMP '2026-03-02'") == 0
    time.sleep(1.1)  # the next run sweeps files older than its start
    run = run_job(project.project, "vuln_risk", as_of=day(68), notify=False)
    assert run.status == "succeeded" and run.rows_scored > 0
    assert project.scalar("SELECT count(*) FROM scores.vuln_risk") == before + run.rows_scored
    assert project.scalar("SELECT count(*) FROM scores.vuln_risk") == project.scalar("SELECT count(DISTINCT finding_id) FROM scores.vuln_risk")
    assert not any(path.exists() for path in written)  # the dead run's files are swept
    assert project.query("SELECT status FROM batchml.runs ORDER BY started_at") == [("succeeded",), ("crashed",), ("succeeded",)]


def test_an_unreachable_scheduler_fails_the_run_in_one_line_naming_it(tmp_path, source):
    project = parquet_project(tmp_path / "project", source, 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    address = f"tcp://127.0.0.1:{port}"
    result = project.cli("run", "vuln_risk", "--as-of", "2026-03-02", "--no-notify", "--cluster", address)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " INFO " not in line and line.strip()]
    assert len(errors) == 1 and address in errors[0] and "dask scheduler" in errors[0], result.stderr
    assert "connection refused" in errors[0]  # nothing listens on the port: said at once, not after Dask's retries
    assert project.scalar("SELECT count(*) FROM batchml.watermarks") == 0
    assert project.query("SELECT status FROM batchml.runs") == [("failed",)]


def test_the_scheduler_comes_from_the_cli_then_the_environment_then_the_config(monkeypatch):
    config = parse_job_config({**job_config(), "source": {"parquet": "x/*.parquet", "entity_id": "finding_id", "event_time": "found_at",
                                                          "watermark": "ingested_at"},
                               "execution": {"engine": "dask", "scheduler": "tcp://configured:8786"}}, Path("configs/vuln_risk.yaml"))
    assert scheduler_address(config) == "tcp://configured:8786"
    monkeypatch.setenv("BATCHML_DASK_SCHEDULER", "tcp://from-env:8786")
    assert scheduler_address(config) == "tcp://from-env:8786"
    assert scheduler_address(config, "tcp://from-cli:8786") == "tcp://from-cli:8786"


def test_the_dask_engine_refuses_a_table_source_in_the_config(tmp_path):
    with pytest.raises(ConfigError, match="execution.engine dask reads source.parquet"):
        parse_job_config({**job_config(), "execution": {"engine": "dask"}}, Path("configs/vuln_risk.yaml"))


@pytest.mark.parametrize("objective", ["regression", "multiclass"])
def test_regression_and_multiclass_jobs_score_on_the_dask_engine_as_on_the_local_one(tmp_path, cluster, objective):
    """The objective's own columns (a value; the predicted class and every class's probability)
    and reasons come out of the workers bitwise as the local engine writes them."""
    from test_objectives import at, ticket_config, tickets

    job, table = f"tickets_{objective}", tickets(objective, per_day=30)
    found = {}
    for engine in ("local", "dask"):
        root = tmp_path / engine
        (root / "landing").mkdir(parents=True)
        for i, cut in enumerate(np.array_split(np.arange(table.num_rows), 4)):  # 4 files: 2 shares a night on 2 workers
            pq.write_table(table.take(cut), root / "landing" / f"part-{i}.parquet")
        config = ticket_config(objective, source={"parquet": "landing/*.parquet", "entity_id": "ticket_id", "event_time": "opened_at",
                                                   "watermark": "loaded_at"})
        if engine == "dask":
            config["execution"] = {"engine": "dask", "scheduler": cluster.scheduler_address}
        project = DemoProject(root, table)
        project.write_config(config, job=job)
        for night in (30, 45):  # the first champion, then a night of new rows scored by it
            run = run_job(project.project, job, as_of=at(night), notify=False)
            assert run.status == "succeeded" and run.rows_scored > 0, run.error
        found[f"{engine} columns"] = project.query(f"SELECT column_name, column_type FROM (DESCRIBE scores.{job})")
        found[engine] = project.query(f"SELECT * EXCLUDE (run_id, scored_at) FROM scores.{job} ORDER BY ALL")
    on_workers = project.scalar(f"SELECT count(*) FROM batchml.manifests WHERE kind = 'scores' AND job = '{job}'")
    assert on_workers >= 2  # the dask nights' scores are lake files from the workers
    assert found["dask"] == found["local"] and len(found["local"]) > 400
    assert found["dask columns"] == found["local columns"]  # the same columns for analysts' SQL (no hive column from the lake's folders)


def test_dask_training_refuses_regression_and_multiclass_in_one_line():
    from test_objectives import ticket_config

    parquet = {"parquet": "landing/*.parquet", "entity_id": "ticket_id", "event_time": "opened_at", "watermark": "loaded_at"}
    config = ticket_config("regression", source=parquet, execution={"engine": "dask"})
    assert parse_job_config(config, Path("configs/tickets_regression.yaml")).execution.engine == "dask"  # scoring on the cluster: fine
    with pytest.raises(ConfigError, match="label.objective regression trains on the local engine only"):
        parse_job_config({**config, "training": {**config["training"], "engine": "dask"}}, Path("configs/tickets_regression.yaml"))
