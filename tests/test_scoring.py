"""The scoring path's parts: the pull into an Arrow run file, risk bands, and batches predicted
concurrently but written in order. Real DuckDB, real LightGBM."""

from __future__ import annotations

import random
import threading
import time
from datetime import datetime
from pathlib import Path

import duckdb
import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pytest

from batchml.demo import data as demo_data
from batchml.config import parse_job_config
from batchml.errors import DataError
from batchml.data.extract import ENTITY, EVENT_TIME, read_run_file, run_file_batches
from batchml.storage.source import count_rows, pull
from batchml.data.features import FeatureSpec, to_matrix
from batchml.storage.warehouse import size_bytes
from batchml.models.registry import LoadedModel
from batchml.models.scoring import LightGBMPredictor, ScoreSummary, band_codes, score_batches
from conftest import job_config

ALL_ROWS = "TRUE"


def source(rows: pa.Table) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("CREATE SCHEMA raw")
    con.register("incoming", rows)
    con.execute("CREATE TABLE raw.vuln_findings AS SELECT * FROM incoming")
    return con


def config(**overrides):
    return parse_job_config(job_config(**overrides), Path("vuln_risk.yaml"))


# --- the pull ------------------------------------------------------------------------------------


def test_the_duplicate_check_and_the_run_file(tmp_path):
    rows = demo_data.generate_rows(3_000, seed=3, start=datetime(2026, 1, 1))
    cfg = config(**{"scoring.batch_size": 1_000})
    con = source(rows)
    assert count_rows(con, cfg, tmp_path, ALL_ROWS) == (3_000, False)

    pulled = pull(con, cfg, tmp_path, ALL_ROWS, tmp_path / "clean.arrow")
    valid = read_run_file(pulled.path)
    assert pulled.rows == 3_000 and valid.num_rows == 3_000 - sum(pulled.by_rule.values())
    assert set(valid.column(ENTITY).to_pylist()) <= set(rows.column("finding_id").to_pylist())
    assert pulled.watermark_max == max(rows.column("ingested_at").to_pylist())
    assert sum(b.num_rows for b in run_file_batches(pulled.path, valid=False)) == sum(pulled.by_rule.values())
    assert sum(b.num_rows for b in run_file_batches(pulled.path, valid=None)) == 3_000

    # one id twice: found by the check, and the older row is quarantined as a duplicate
    con.execute("INSERT INTO raw.vuln_findings SELECT * REPLACE (ingested_at - INTERVAL 1 MINUTE AS ingested_at) "
                "FROM raw.vuln_findings WHERE finding_id = (SELECT min(finding_id) FROM raw.vuln_findings)")
    assert count_rows(con, cfg, tmp_path, ALL_ROWS) == (3_001, True)
    again = pull(con, cfg, tmp_path, ALL_ROWS, tmp_path / "dup.arrow")
    assert again.rows == 3_001 and again.by_rule.get("duplicate") == 1
    assert sorted(read_run_file(again.path).column(ENTITY).to_pylist()) == sorted(valid.column(ENTITY).to_pylist())


def test_a_repeated_key_is_found_alike_in_memory_and_by_duckdb(tmp_path, monkeypatch):
    """Batches up to SORTED_KEYS rows sort their keys' hashes in memory, larger ones group them in
    DuckDB: both give the same answers, and rows without an id never count as a repeated key."""
    from batchml.storage import source as pulling

    rows = demo_data.generate_rows(2_000, seed=5, start=datetime(2026, 1, 1))
    cfg = config()
    con = source(rows)
    # two rows without an id at the same time: rejected by the contract, not a repeated key
    con.execute("UPDATE raw.vuln_findings SET finding_id = NULL, found_at = TIMESTAMP '2026-01-02' "
                "WHERE finding_id IN (SELECT finding_id FROM raw.vuln_findings ORDER BY finding_id LIMIT 2)")
    answers = []
    for limit in (pulling.SORTED_KEYS, 0):
        monkeypatch.setattr(pulling, "SORTED_KEYS", limit)
        answers.append(count_rows(con, cfg, tmp_path, ALL_ROWS))
    # the same id at another time is another key; at the same time it repeats
    con.execute("INSERT INTO raw.vuln_findings SELECT * REPLACE (found_at + INTERVAL 1 DAY AS found_at) "
                "FROM raw.vuln_findings WHERE finding_id = (SELECT max(finding_id) FROM raw.vuln_findings)")
    for limit in (pulling.SORTED_KEYS, 0):
        monkeypatch.setattr(pulling, "SORTED_KEYS", limit)
        answers.append(count_rows(con, cfg, tmp_path, ALL_ROWS))
    con.execute("INSERT INTO raw.vuln_findings SELECT * FROM raw.vuln_findings WHERE finding_id = (SELECT min(finding_id) FROM raw.vuln_findings)")
    for limit in (10**9, 0):
        monkeypatch.setattr(pulling, "SORTED_KEYS", limit)
        answers.append(count_rows(con, cfg, tmp_path, ALL_ROWS))
    assert answers == [(2_000, False)] * 2 + [(2_001, False)] * 2 + [(2_002, True)] * 2


def test_a_streamed_pull_hands_over_the_valid_rows_and_keeps_only_rejected_ones(tmp_path):
    rows = demo_data.inject_bad_rows(demo_data.generate_rows(3_000, seed=3, start=datetime(2026, 1, 1)), 0.05, seed=4)
    con = source(rows)
    con.execute("SET threads = 2")
    con.execute("SET memory_limit = '256MB'")
    seen = {}

    def consume(batches, total):
        # DuckDB's settings are the database's: a second cursor sees what the scan runs under
        seen["settings"] = con.cursor().execute("SELECT current_setting('threads'), current_setting('memory_limit')").fetchall()[0]
        seen["total"], seen["ids"] = total, [i for b in batches for i in b.column(ENTITY).to_pylist()]

    pulled = pull(con, config(**{"scoring.batch_size": 1_000}), tmp_path, ALL_ROWS, tmp_path / "rejected.arrow", valid_rows=consume)

    quarantined = sum(pulled.by_rule.values())
    assert quarantined > 0 and seen["total"] == pulled.rows == rows.num_rows
    assert len(seen["ids"]) == pulled.rows - quarantined
    kept = read_run_file(pulled.path, valid=None)
    assert kept.num_rows == quarantined and kept.column("__rule").null_count == 0  # the run file holds the rejected rows only
    scan_threads, scan_limit = seen["settings"]
    assert scan_threads == 1 and size_bytes(scan_limit) <= 256e6 / 2  # one scan thread, a small cache for a plain scan
    threads, limit = con.execute("SELECT current_setting('threads'), current_setting('memory_limit')").fetchall()[0]
    assert threads == 2 and abs(size_bytes(limit) - 256e6) <= 0.2 * 2**20  # put back, as DuckDB prints it (to 0.1 MiB, rounded down)


def test_checks_follow_the_source_types_and_text_columns_are_still_checked(tmp_path):
    from batchml.data.validate import rule_cases

    cfg = config()
    typed = {name: "DOUBLE" for name in cfg.features.numeric} | {"dependency_depth": "INTEGER", cfg.source.event_time: "TIMESTAMP"}
    checks = {(rule, cond.split()[0]) for rule, cond, _ in rule_cases(cfg, typed)}
    assert not any(rule == "bad_type" for rule, _ in checks)  # DOUBLE, INTEGER and TIMESTAMP always cast
    assert ("non_finite", 'isinf(try_cast("cvss_base"') in checks and ("non_finite", 'isinf(try_cast("dependency_depth"') not in checks
    assert len(rule_cases(cfg)) > len(rule_cases(cfg, typed))  # no types known: every check

    rows = demo_data.generate_rows(1_000, seed=3, start=datetime(2026, 1, 1))
    text = {"cvss_base": [str(v) for v in rows.column("cvss_base").to_pylist()],
            "found_at": [v.isoformat(sep=" ") for v in rows.column("found_at").to_pylist()]}
    text["cvss_base"][5], text["found_at"][7] = "n/a", "yesterday"
    for name, values in text.items():
        rows = rows.set_column(rows.schema.get_field_index(name), name, pa.array(values, pa.string()))
    con = source(rows)

    pulled = pull(con, cfg, tmp_path, ALL_ROWS, tmp_path / "batch.arrow")

    assert pulled.by_rule == {"bad_type": 2} and pulled.rows == 1_000
    reasons = sorted(read_run_file(pulled.path, valid=False).column("__reason").to_pylist())
    assert reasons == ["cvss_base=n/a cannot be cast to DOUBLE", "found_at=yesterday is not a timestamp"]


def test_a_source_column_named_like_batchmls_own_is_refused(tmp_path):
    rows = demo_data.generate_rows(100, seed=3, start=datetime(2026, 1, 1))
    con = source(rows.append_column("__rule", rows.column("cvss_base")))  # would be read as the quarantine rule
    with pytest.raises(DataError, match=r"has column\(s\) __rule .*names starting with __ are batchml's own"):
        pull(con, config(), tmp_path, ALL_ROWS, tmp_path / "batch.arrow")


def test_a_pull_out_of_memory_names_the_setting_to_raise(tmp_path):
    con = source(demo_data.generate_rows(20_000, seed=3, start=datetime(2026, 1, 1)))
    con.execute("SET memory_limit = '1MB'")
    with pytest.raises(DataError, match=r"^cannot read source raw.vuln_findings for job vuln_risk: Out of Memory Error.*BATCHML_MEMORY_LIMIT"):
        pull(con, config(), tmp_path, ALL_ROWS, tmp_path / "batch.arrow")


# --- the model matrix ----------------------------------------------------------------------------


def test_the_matrix_holds_every_feature_in_model_order_with_nan_for_missing():
    n = 10_001  # more than two transpose blocks, not a multiple of one
    rng = np.random.default_rng(4)
    x, k = rng.normal(size=n), rng.integers(0, 50, size=n)
    levels = np.array(["npm", "pypi", "maven", "hex", None], dtype=object)[rng.integers(0, 5, size=n)]
    x_with_nulls = pa.array(np.where(rng.random(n) < 0.1, np.nan, x), from_pandas=True)  # NaN read as null
    table = pa.table({"x": x_with_nulls, "k": pa.array(k, pa.int32()), "eco": pa.array(levels, pa.string())})
    spec = FeatureSpec(["k", "x"], ["eco"], {"eco": ["pypi", "npm", "maven"]})  # "hex" unseen

    matrix = to_matrix(table, spec)

    assert matrix.shape == (n, 3) and matrix.dtype == np.float64 and matrix.flags.c_contiguous
    np.testing.assert_array_equal(matrix[:, 0], k.astype(float))
    np.testing.assert_array_equal(matrix[:, 1], np.asarray(x_with_nulls.to_numpy(zero_copy_only=False), dtype=float))
    codes = {"pypi": 0.0, "npm": 1.0, "maven": 2.0}
    np.testing.assert_array_equal(matrix[:, 2], [codes.get(level, np.nan) for level in levels])
    assert np.isnan(matrix[:, 1]).sum() == x_with_nulls.null_count > 0


# --- bands ---------------------------------------------------------------------------------------


def test_band_codes_pick_the_highest_band_reached_and_low_below_all():
    cfg = config(**{"scoring.bands": {"critical": 0.9, "high": 0.5, "medium": 0.2}})
    scores = np.array([0.0, 0.19999, 0.2, 0.5, 0.89, 0.9, 1.0, 0.35])
    codes, names = band_codes(scores, cfg)
    assert [names[c] for c in codes] == ["low", "low", "medium", "high", "high", "critical", "critical", "medium"]
    assert names[-1] == "low"


# --- concurrent predicts, ordered output -----------------------------------------------------------


class Jittery:
    """A real LightGBM predictor that takes a random while per batch, several batches at once:
    batches finish out of order, as they can with compiled trees on several cores."""

    name = "jittery"
    concurrent_batches = 3

    def __init__(self, model: LoadedModel) -> None:
        self.inner = LightGBMPredictor(model)
        self.threads_seen: set[int | None] = set()
        self.callers: set[str] = set()  # the threads predicting

    def predict(self, matrix: np.ndarray, threads: int | None = None) -> np.ndarray:
        self.threads_seen.add(threads)
        self.callers.add(threading.current_thread().name)
        time.sleep(random.Random(len(matrix) + int(matrix[0, 0] * 1e6)).uniform(0, 0.05))
        return self.inner.predict(matrix, threads=threads)


def seven_hundred_row_batches() -> tuple[list[pa.RecordBatch], LoadedModel, np.ndarray]:
    """6,000 rows in batches of 700, a real 20-tree booster, and its predictions."""
    rng = np.random.default_rng(11)
    X = rng.normal(size=(6_000, 3))
    y = (rng.random(6_000) < 1 / (1 + np.exp(-X[:, 0]))).astype(float)
    booster = lgb.train({"objective": "binary", "verbosity": -1, "num_leaves": 7, "num_threads": 1}, lgb.Dataset(X, y), 20)
    spec = FeatureSpec(["a", "b", "c"], [])
    model = LoadedModel("vuln_risk", 1, booster, spec, {}, Path("."), "0" * 64)
    ids = np.arange(6_000)
    batches = [pa.RecordBatch.from_pydict({ENTITY: ids[i:i + 700], EVENT_TIME: pa.array([datetime(2026, 1, 1)] * len(ids[i:i + 700])),
                                           "a": X[i:i + 700, 0], "b": X[i:i + 700, 1], "c": X[i:i + 700, 2]})
               for i in range(0, 6_000, 700)]
    return batches, model, booster.predict(X)


def test_batches_predicted_concurrently_come_out_in_order_with_lightgbm_scores(monkeypatch):
    monkeypatch.setenv("BATCHML_THREADS", "2")
    batches, model, expected = seven_hundred_row_batches()
    predictor, summary = Jittery(model), ScoreSummary()
    cfg = config(**{"scoring.reasons": 0})

    out = list(score_batches(batches, model, predictor, cfg, run_id="r", scored_at=datetime(2026, 1, 2), summary=summary))

    table = pa.Table.from_batches(out)
    assert table.column("finding_id").to_pylist() == list(range(6_000))
    np.testing.assert_allclose(table.column("score").to_numpy(), expected, rtol=0, atol=1e-12)
    assert predictor.threads_seen == {1}  # each batch on one thread, several at once
    assert all(name.startswith("batchml-predict") for name in predictor.callers)
    assert summary.rows == 6_000 and sum(summary.bands.values()) == 6_000


def test_a_budget_of_one_thread_predicts_in_the_scoring_thread_itself(monkeypatch):
    """``BATCHML_THREADS=1`` (a one-thread Dask worker's): no predict beside the reading and
    encoding of the next batch, so the scoring keeps one core busy, not two."""
    monkeypatch.setenv("BATCHML_THREADS", "1")
    batches, model, expected = seven_hundred_row_batches()
    predictor = Jittery(model)

    out = list(score_batches(batches, model, predictor, config(**{"scoring.reasons": 0}), run_id="r",
                             scored_at=datetime(2026, 1, 2), summary=ScoreSummary()))

    assert predictor.callers == {threading.current_thread().name}
    np.testing.assert_allclose(pa.Table.from_batches(out).column("score").to_numpy(), expected, rtol=0, atol=1e-12)


def test_a_failing_predict_fails_the_scoring():
    class Broken(Jittery):
        def predict(self, matrix, threads=None):
            raise RuntimeError("library went away")

    rng = np.random.default_rng(1)
    X = rng.normal(size=(500, 1))
    booster = lgb.train({"objective": "binary", "verbosity": -1, "num_threads": 1}, lgb.Dataset(X, (X[:, 0] > 0).astype(float)), 5)
    model = LoadedModel("vuln_risk", 1, booster, FeatureSpec(["a"], []), {}, Path("."), "0" * 64)
    batch = pa.RecordBatch.from_pydict({ENTITY: np.arange(500), EVENT_TIME: pa.array([datetime(2026, 1, 1)] * 500), "a": X[:, 0]})
    with pytest.raises(RuntimeError, match="went away"):
        list(score_batches([batch, batch], model, Broken(model), config(), run_id="r", scored_at=datetime(2026, 1, 2), summary=ScoreSummary()))
