"""Compiled trees (lleaves): cache key, verification against LightGBM, fallbacks, reuse of the cache.

Small real models (20 trees) in tmp_path; a 20-tree model compiles in well under a second. Tests of
compiled trees take the ``lleaves`` fixture: without the extra they are reported as skipped (``make
test`` installs it, so they run). What happens without lleaves is tested by hiding it
(``without_lleaves``), whether or not it is installed. The leaves library (leaf indices for reason
codes) is checked against ``pred_leaf`` the same way.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import day, job_config

from batchml.models import compiled, verification
from batchml.demo import data as demo_data
from batchml.models import scoring as score
from batchml.config import JobConfig
from batchml.data.features import FeatureSpec, fit_spec, to_matrix
from batchml.models.registry import LoadedModel, write_artifact
from batchml.models.scoring import LightGBMPredictor, make_predictor, reason_codes

START = dt.datetime(2026, 1, 1)


def train_model(folder: Path, seed: int, version: int = 1, trees: int = 20) -> LoadedModel:
    """A small categorical-aware model written as a registry artifact (golden set included)."""
    table = demo_data.generate_rows(4000, seed=seed, start=START)
    spec = fit_spec(table, demo_data.NUMERIC, demo_data.CATEGORICAL)
    labels = table.column(demo_data.LABEL).to_numpy().astype(float)
    params = {"objective": "binary", "num_leaves": 15, "min_data_in_leaf": 5, "verbosity": -1, "num_threads": 1, "seed": seed}
    data = lgb.Dataset(to_matrix(table, spec), labels, categorical_feature=spec.categorical_indices)
    booster = lgb.train(params, data, num_boost_round=trees)
    folder.mkdir(parents=True)
    golden = table.slice(0, 256).select(spec.features)
    scores = booster.predict(to_matrix(golden, spec), num_threads=1)
    pq.write_table(golden.append_column("__score", pa.array(scores)), str(folder / "golden.parquet"))
    sha, _ = write_artifact(folder, booster, {**spec.to_dict(), "version": version})
    return reload(LoadedModel("toy", version, booster, spec, {}, folder, sha))


def reload(model: LoadedModel) -> LoadedModel:
    """The same artifact as a later run sees it: a fresh booster and an empty per-process cache."""
    booster = lgb.Booster(model_file=str(model.path / "model.txt"))
    # the registry's record of its compiled libraries goes with it, as batchml.compiled_libraries would
    return LoadedModel(model.job, model.version, booster, model.spec, model.manifest, model.path, model.sha256,
                       libraries=model.libraries)


def scoring_rows(model: LoadedModel, n: int = 3000) -> np.ndarray:
    """New rows as batchml encodes them, with missing numbers, unseen and missing categories."""
    table = demo_data.generate_rows(n, seed=99, start=START)
    rng = np.random.default_rng(5)
    eco = np.array(table.column("ecosystem").to_pylist(), dtype=object)
    eco[rng.random(n) < 0.1] = "hex"  # a level the model never saw: encoded as missing
    eco[rng.random(n) < 0.1] = None
    table = table.set_column(table.schema.get_field_index("ecosystem"), "ecosystem", pa.array(eco, pa.string()))
    matrix = to_matrix(table, model.spec)
    matrix[rng.random(matrix.shape) < 0.05] = np.nan
    return matrix


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[LoadedModel, LoadedModel]:
    root = tmp_path_factory.mktemp("compiled")
    return train_model(root / "a" / "v1", seed=1), train_model(root / "b" / "v1", seed=2)


@pytest.fixture
def model(models, tmp_path) -> LoadedModel:
    """Model A in a folder of its own, so each test starts with an empty cache."""
    folder = tmp_path / "toy" / "v1"
    shutil.copytree(models[0].path, folder)
    return reload(LoadedModel("toy", 1, models[0].booster, models[0].spec, {}, folder, models[0].sha256))


@pytest.fixture
def lleaves():
    """Compiled trees need the extra: skipped, and reported so, where it is missing."""
    return pytest.importorskip("lleaves", reason="needs the compiled extra: pip install 'batchml[compiled]'")


@pytest.fixture
def without_lleaves(monkeypatch):
    """batchml as it runs where the compiled extra is not installed."""
    monkeypatch.setattr(compiled, "available", lambda: False)


@pytest.fixture
def any_size(monkeypatch):
    """engine: auto considers every model, however small."""
    monkeypatch.setattr(compiled, "AUTO_MIN_LEAVES", 0)


def assert_lightgbm_scores(predictor, model: LoadedModel) -> None:
    matrix = scoring_rows(model)
    assert isinstance(predictor, LightGBMPredictor)
    assert np.array_equal(predictor.predict(matrix), model.booster.predict(matrix, num_threads=1))


# -- cache key ---------------------------------------------------------------------------------


def test_cache_key_changes_with_the_model_hash_and_the_toolchain(model):
    tools = compiled.toolchain()
    key = compiled.cache_key(model, tools)

    assert compiled.cache_key(reload(model), dict(tools)) == key
    other = LoadedModel(model.job, model.version, model.booster, model.spec, {}, model.path, "0" * 64)
    assert compiled.cache_key(other, tools) != key
    for part, value in [("lleaves", "1.4.0"), ("llvmlite", "0.43.0"), ("cpu", "other-cpu"), ("cpu_features", "f00"), ("machine", "aarch64")]:
        assert compiled.cache_key(model, {**tools, part: value}) != key, part
    assert compiled.CachePaths.of(model).library == model.path / "compiled" / f"{key}.so"
    leaves_key = compiled.cache_key(model, compiled.toolchain(compiled.LEAVES))
    assert leaves_key != key and compiled.toolchain(compiled.LEAVES)["kind"] == "leaves"
    assert compiled.CachePaths.of(model, compiled.LEAVES).record == model.path / "compiled" / f"{leaves_key}-leaves.json"


# -- fallbacks -----------------------------------------------------------------------------------


def test_a_compile_failure_falls_back_to_lightgbm_with_a_warning(model, lleaves, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("LLVM ERROR: out of registers")

    monkeypatch.setattr(lleaves.Model, "compile", broken)
    warnings: list[str] = []

    predictor = make_predictor(model, "compiled", warn=warnings.append)

    assert_lightgbm_scores(predictor, model)
    assert len(warnings) == 1 and "toy v1" in warnings[0] and "LightGBM" in warnings[0] and "out of registers" in warnings[0]
    # recorded: the next run does not pay for the same failing compile again
    again: list[str] = []
    assert_lightgbm_scores(make_predictor(reload(model), "compiled", warn=again.append), model)
    assert "recorded" in again[0] and not compiled.CachePaths.of(model).library.exists()
    assert compiled.precompile(reload(model), force=True) is None  # promotion goes on without a library


def test_without_lleaves_every_engine_scores_with_lightgbm(model, any_size, without_lleaves):
    warnings: list[str] = []

    assert_lightgbm_scores(make_predictor(model, "compiled", warn=warnings.append), model)
    assert len(warnings) == 1 and "toy v1" in warnings[0] and "lleaves is not installed" in warnings[0]
    auto: list[str] = []
    assert_lightgbm_scores(make_predictor(reload(model), "auto", warn=auto.append), model)
    assert auto == []  # auto without lleaves: silently LightGBM
    assert compiled.precompile(reload(model), force=True) is None
    assert compiled.compiled_leaves(reload(model), required=True) is None
    assert not (model.path / "compiled").exists()


def test_a_corrupt_cached_library_is_refused_without_crashing(model, any_size, lleaves):
    library = compiled.CachePaths.of(model).library
    library.parent.mkdir(parents=True)
    library.write_bytes(os.urandom(4096))  # LLVM aborts the process on this: unregistered, it is never loaded
    warnings: list[str] = []

    predictor = make_predictor(model, "auto", warn=warnings.append)

    assert_lightgbm_scores(predictor, model)
    assert len(warnings) == 1 and "toy v1" in warnings[0] and "is not the library registered for this model" in warnings[0]
    assert not library.exists() and library.with_name(library.name + ".rejected").exists()


def test_a_library_compiled_from_another_model_is_refused(model, models, any_size, lleaves):
    other = reload(models[1])
    other_library = compiled.precompile(other, force=True)
    library = compiled.CachePaths.of(model).library
    library.parent.mkdir(parents=True)
    shutil.copy(other_library, library)
    warnings: list[str] = []

    predictor = make_predictor(model, "auto", warn=warnings.append)

    assert_lightgbm_scores(predictor, model)
    assert len(warnings) == 1 and "is not the library registered for this model" in warnings[0] and "toy v1" in warnings[0]
    # engine: compiled builds a correct library in place of the refused one
    rebuilt = make_predictor(reload(model), "compiled", warn=warnings.append)
    matrix = scoring_rows(model)
    assert rebuilt.name == "compiled"
    assert np.max(np.abs(rebuilt.predict(matrix) - model.booster.predict(matrix, num_threads=1))) <= 1e-9


def test_auto_never_compiles_on_load_and_ignores_small_models(model, monkeypatch):
    assert make_predictor(model, "auto").name == "lightgbm"  # 20 x 15 leaves: far below AUTO_MIN_LEAVES
    monkeypatch.setattr(compiled, "AUTO_MIN_LEAVES", 0)
    assert make_predictor(reload(model), "auto").name == "lightgbm"  # large enough, but nothing cached
    assert not (model.path / "compiled").exists()


def test_a_compile_pays_when_the_batch_saves_more_than_it_costs(model):
    trees, leaves = model.booster.num_trees(), verification.total_leaves(model)
    # the smallest batch whose saving, NIGHTS_TO_PAY_BACK times over, covers one compile (two: with the leaves library)
    one = compiled.compile_seconds(leaves) / (trees * compiled.SAVED_SECONDS_PER_TREE_ROW * compiled.NIGHTS_TO_PAY_BACK)
    assert not compiled.compile_pays(model, int(one) - 1) and compiled.compile_pays(model, int(one) + 1)
    assert not compiled.compile_pays(model, int(one) + 1, kinds=2) and compiled.compile_pays(model, int(2 * one) + 1, kinds=2)
    # the compile grows faster than the leaves: as measured (1,302 leaves ~1 s; 18,900 leaves 44-77 s)
    assert 0.5 < compiled.compile_seconds(1_302) < 2 and 40 < compiled.compile_seconds(18_900) < 90


def test_auto_compiles_a_small_model_for_a_batch_big_enough_and_a_later_run_loads_it(model, lleaves, monkeypatch):
    config = JobConfig.model_validate(job_config())
    assert config.scoring.engine == "auto" and config.scoring.reasons and config.scoring.reason_method == "path"
    lightgbm = make_predictor(model, "auto")
    with monkeypatch.context() as patched:  # a small batch: not worth a compile, nor importing lleaves to find out
        patched.setattr(compiled, "available", lambda: pytest.fail("a small batch asked for lleaves"))
        assert score.for_batch(lightgbm, model, config, rows=10_000) is lightgbm
    assert not (model.path / "compiled").exists()

    big = score.for_batch(lightgbm, model, config, rows=100_000_000)  # the rows are only counted, not scored

    matrix = scoring_rows(model)
    assert big.name == "compiled"
    assert np.max(np.abs(big.predict(matrix) - model.booster.predict(matrix, num_threads=1))) <= 1e-9
    # the leaves library too (reason codes), used by this run from now on
    leaves = compiled.compiled_leaves(model, required=False)
    assert leaves is not None and np.array_equal(leaves.predict(matrix), model.booster.predict(matrix, pred_leaf=True, num_threads=1))
    built = {entry["kind"] for entry in model.unregistered}  # registered by the run's commit
    assert built == {"scores", "leaves"}
    # a later run of the model, with those libraries registered: loads them at once, whatever the batch
    registered = {entry["file"]: entry["sha256"] for entry in model.take_unregistered()}
    later = reload(LoadedModel(model.job, model.version, model.booster, model.spec, {}, model.path, model.sha256, libraries=registered))
    assert make_predictor(later, "auto").name == "compiled"
    # engine: lightgbm never compiles, whatever the batch
    plain = JobConfig.model_validate(job_config(scoring={**job_config()["scoring"], "engine": "lightgbm"}))
    assert score.for_batch(LightGBMPredictor(reload(model)), model, plain, rows=100_000_000).name == "lightgbm"


def test_a_night_big_enough_compiles_the_champion_registers_it_and_the_next_night_loads_it(champion_project, lleaves, monkeypatch, caplog):
    from batchml.pipeline.nightly import run_job

    assert champion_project.scalar("SELECT count(*) FROM batchml.compiled_libraries") == 0  # the demo model: below AUTO_MIN_LEAVES
    monkeypatch.setattr(compiled, "SAVED_SECONDS_PER_TREE_ROW", 1.0)  # as if every batch were millions of rows
    with caplog.at_level("INFO", logger="batchml"):
        night = run_job(champion_project.project, "vuln_risk", as_of=day(61), notify=False)

    assert night.status == "succeeded" and night.rows_scored > 0
    assert f"scored {night.rows_scored} rows with v1 (compiled)" in caplog.text
    registered = dict(champion_project.query("SELECT kind, file FROM batchml.compiled_libraries WHERE job = 'vuln_risk' AND version = 1"))
    assert set(registered) == {"scores", "leaves"}  # with the run's commit
    # the stored scores are LightGBM's, within the tolerance every library is verified to
    folder = Path(champion_project.scalar("SELECT artifact_path FROM batchml.models WHERE version = 1"))
    booster = lgb.Booster(model_file=str(folder / "model.txt"))
    features = json.loads((folder / "model.json").read_text())["features"]
    stored = champion_project.query(f"SELECT s.score, {', '.join('f.' + c for c in features)} FROM scores.vuln_risk s "
                                    f"JOIN raw.vuln_findings f USING (finding_id) WHERE s.run_id = ? ORDER BY s.finding_id", [night.run_id])
    table = pa.Table.from_pylist([dict(zip(features, row[1:])) for row in stored])
    matrix = to_matrix(table, FeatureSpec.from_dict(json.loads((folder / "model.json").read_text())))
    assert np.max(np.abs(booster.predict(matrix) - np.array([row[0] for row in stored]))) <= 1e-9

    # the next night, at the default estimate and with a small batch: loads what is registered, compiles nothing
    monkeypatch.undo()
    monkeypatch.setattr(compiled, "_build", lambda *args: pytest.fail("the next night compiled again"))
    caplog.clear()
    with caplog.at_level("INFO", logger="batchml"):
        next_night = run_job(champion_project.project, "vuln_risk", as_of=day(62), notify=False)
    assert next_night.status == "succeeded" and f"scored {next_night.rows_scored} rows with v1 (compiled)" in caplog.text


NIGHT_WITHOUT_PANDAS = """
import logging, sys
from datetime import datetime
from batchml.models import compiled
from batchml.pipeline.nightly import run_job
from batchml.project import Project
load = compiled._load
compiled._load = lambda model, kind, library, code: (print("loaded", kind.name, "library"), load(model, kind, library, code))[1]
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
night = run_job(Project.open(sys.argv[1]), "vuln_risk", as_of=datetime.fromisoformat(sys.argv[2]), notify=False)
print(night.status, "imported pandas:", "pandas" in sys.modules)
"""


def test_a_night_that_loads_compiled_libraries_never_imports_pandas(champion_project, lleaves, monkeypatch):
    """pyarrow and lleaves import pandas (0.3-0.5 s) when asked to convert or to load; a night needs
    neither (batchml.data.arrays, models.library.Library). In a fresh process, as cron starts one."""
    from batchml.pipeline.nightly import run_job

    monkeypatch.setattr(compiled, "SAVED_SECONDS_PER_TREE_ROW", 1.0)  # this night compiles both libraries
    assert run_job(champion_project.project, "vuln_risk", as_of=day(61), notify=False).status == "succeeded"

    night = subprocess.run([sys.executable, "-c", NIGHT_WITHOUT_PANDAS, str(champion_project.root), day(62).isoformat()],
                           capture_output=True, text=True, timeout=300)

    assert night.returncode == 0, night.stderr[-3000:]
    assert "loaded scores library" in night.stdout and "loaded leaves library" in night.stdout
    assert "with v1 (compiled)" in night.stdout
    assert night.stdout.strip().endswith("succeeded imported pandas: False"), night.stdout[-2000:]


def test_auto_without_lleaves_scores_a_big_batch_with_lightgbm(model, without_lleaves):
    config = JobConfig.model_validate(job_config())
    lightgbm = make_predictor(model, "auto")
    assert score.for_batch(lightgbm, model, config, rows=100_000_000) is lightgbm
    assert not (model.path / "compiled").exists()


# -- compiled trees --------------------------------------------------------------------------------


def test_a_small_model_compiles_matches_lightgbm_and_reuses_its_cache(model, lleaves, monkeypatch):
    warnings: list[str] = []
    predictor = make_predictor(model, "compiled", warn=warnings.append)
    matrix = scoring_rows(model)
    assert np.isnan(matrix[:, model.spec.categorical_indices]).any() and np.isnan(matrix[:, 0]).any()
    assert predictor.name == "compiled" and warnings == []
    assert np.max(np.abs(predictor.predict(matrix) - model.booster.predict(matrix, num_threads=1))) <= 1e-9
    paths = compiled.CachePaths.of(model)
    record = compiled._read_record(paths.record)
    assert record["status"] == "verified" and record["rows"] == verification.VERIFY_ROWS and record["max_difference"] <= 1e-9
    mtime = paths.library.stat().st_mtime_ns

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again although the cache holds a verified library")

    monkeypatch.setattr(compiled, "_build", no_compile)
    again = make_predictor(reload(model), "compiled", warn=warnings.append)
    assert again.name == "compiled" and warnings == [] and paths.library.stat().st_mtime_ns == mtime
    assert np.array_equal(again.predict(matrix), predictor.predict(matrix))


def test_a_changed_library_is_verified_again(model, models, any_size, lleaves):
    library = compiled.precompile(model, force=True)
    assert library is not None and library.exists()
    assert make_predictor(reload(model), "auto").name == "compiled"
    shutil.copy(compiled.precompile(reload(models[1]), force=True), library)  # same name, other bytes
    warnings: list[str] = []

    assert make_predictor(reload(model), "auto", warn=warnings.append).name == "lightgbm"
    assert "is not the library registered for this model" in warnings[0]


def test_a_swapped_library_with_a_record_forged_to_match_is_refused(model, models, any_size, lleaves):
    """The record beside a library is not proof: only the sha256 registered in the warehouse is."""
    library = compiled.precompile(model, force=True)
    paths = compiled.CachePaths.of(model)
    shutil.copy(compiled.precompile(reload(models[1]), force=True), library)
    record = compiled._read_record(paths.record)
    record["library_sha256"] = compiled.sha256_file(library)  # forged: vouches for the swapped file
    paths.record.write_text(json.dumps(record))
    warnings: list[str] = []

    predictor = make_predictor(reload(model), "auto", warn=warnings.append)

    assert_lightgbm_scores(predictor, model)
    assert len(warnings) == 1 and "is not the library registered for this model" in warnings[0]
    assert not library.exists() and library.with_name(library.name + ".rejected").exists()


def test_a_registered_library_that_does_not_reproduce_the_golden_rows_is_refused(model, models, any_size, lleaves):
    """Registered is not proof against every mistake (a registry row pointing at another model's
    library): every load still re-checks the golden rows."""
    library = compiled.precompile(model, force=True)
    shutil.copy(compiled.precompile(reload(models[1]), force=True), library)
    model.libraries[library.name] = compiled.sha256_file(library)  # as if the warehouse vouched for it
    warnings: list[str] = []

    predictor = make_predictor(reload(model), "auto", warn=warnings.append)

    assert_lightgbm_scores(predictor, model)
    assert len(warnings) == 1 and "golden rows although it is registered" in warnings[0]
    assert not library.exists() and library.with_name(library.name + ".rejected").exists()


def test_the_verification_rows_cover_thresholds_categories_and_missing_values(model):
    matrix = compiled.verification_matrix(model)

    assert matrix.shape == (verification.VERIFY_ROWS, len(model.spec.features)) and matrix.flags.c_contiguous
    golden = to_matrix(pq.read_table(str(model.path / "golden.parquet")), model.spec)
    assert np.array_equal(matrix[: len(golden)], golden, equal_nan=True)
    for j in model.spec.categorical_indices:
        levels = len(model.spec.categories[model.spec.features[j]])
        assert set(np.unique(matrix[:, j][~np.isnan(matrix[:, j])])) == set(range(levels))
        assert np.isnan(matrix[:, j]).any()
    thresholds = verification._numeric_thresholds(model)
    cvss = model.spec.features.index("cvss_base")
    assert len(thresholds[cvss]) and np.isin(thresholds[cvss], matrix[:, cvss]).any()


def test_tiny_values_are_read_as_zero_like_lightgbm_does(tmp_path, lleaves):
    """LightGBM reads |x| <= 1e-35 as 0.0 (lleaves alone does not): splits on -1e-35 must agree."""
    rng = np.random.default_rng(3)
    signed = rng.choice([-1.0, 0.0, 1.0], 3000)
    table = pa.table({"signed": signed, "other": rng.normal(size=3000)})
    spec = fit_spec(table, ["signed", "other"], [])
    labels = ((signed < 0) ^ (rng.random(3000) < 0.1)).astype(float)
    booster = lgb.train({"objective": "binary", "num_leaves": 4, "verbosity": -1, "num_threads": 1},
                        lgb.Dataset(to_matrix(table, spec), labels), num_boost_round=5)
    assert "-1.0000000180025095e-35" in booster.model_to_string()  # the zero split this is about
    folder = tmp_path / "tiny" / "v1"
    folder.mkdir(parents=True)
    sha, _ = write_artifact(folder, booster, spec.to_dict())
    model = LoadedModel("tiny", 1, booster, spec, {}, folder, sha)
    zero = compiled.ZERO_THRESHOLD
    matrix = np.array([[v, 0.5] for v in (-zero, -zero / 2, -0.0, 0.0, zero, np.nextafter(-zero, -1), -1.0, 1.0, np.nan)])

    predictor = make_predictor(model, "compiled")

    assert np.array_equal(compiled.as_lightgbm_reads(matrix)[:5, 0], np.zeros(5))
    assert predictor.name == "compiled"
    assert np.max(np.abs(predictor.predict(matrix) - booster.predict(matrix, num_threads=1))) <= 1e-12


# -- the leaves library (reason codes) ---------------------------------------------------------------


def reasons_config(engine: str) -> JobConfig:
    return JobConfig.model_validate(job_config(**{"scoring.engine": engine, "scoring.reason_bands": None}))


def test_precompile_builds_a_leaves_library_that_gives_exactly_pred_leaf(model, any_size, lleaves, monkeypatch):
    library = compiled.precompile(model, force=True)
    paths = compiled.CachePaths.of(model, compiled.LEAVES)
    record = compiled._read_record(paths.record)
    assert library.exists() and paths.library.exists() and library != paths.library
    assert record["status"] == "verified" and record["kind"] == "leaves" and record["max_difference"] == 0.0
    monkeypatch.setattr(compiled, "_build", lambda *args: pytest.fail("compiled again although a verified library is cached"))
    leaves = compiled.compiled_leaves(reload(model), required=False)
    matrix = scoring_rows(model)
    assert np.isnan(matrix[:, model.spec.categorical_indices]).any() and np.isnan(matrix[:, 0]).any()
    for rows in (compiled.verification_matrix(model), matrix):
        assert np.array_equal(leaves.predict(rows), model.booster.predict(rows, pred_leaf=True, num_threads=1))


@pytest.mark.parametrize("trees, bits", [(1, 1), (23, 4), (300, 6), (7, 12), (1000, 8)])
def test_leaf_packing_round_trips_and_stays_exact_in_a_double(trees, bits):
    packing = compiled.LeafPacking(trees, bits)
    leaves = np.random.default_rng(trees).integers(0, 2**bits, size=(500, trees)).astype(np.int32)
    leaves[0] = 2**bits - 1  # every field at its largest at once

    packed = packing.pack(leaves)

    assert packed.shape == (500, packing.classes) and packing.classes * packing.fields >= trees
    assert packed.max() < 2**53 and np.array_equal(packed, np.round(packed))  # integers a double holds exactly
    assert np.array_equal(packing.unpack(packed), leaves)


def test_trees_that_do_not_fill_the_last_class_are_padded_and_leaves_stay_exact(tmp_path, lleaves):
    model = train_model(tmp_path / "odd" / "v1", seed=4, trees=23)  # 15 leaves: 4 bits, 13 a class -> 2 classes of 12
    text = compiled.leaf_model_text((model.path / "model.txt").read_text())
    assert text.count("\nTree=") == 24 and "\nnum_class=2\n" in text and "Tree=23\n" in text

    leaves = compiled.compiled_leaves(model, required=True)

    matrix = scoring_rows(model)
    assert np.array_equal(leaves.predict(matrix), model.booster.predict(matrix, pred_leaf=True, num_threads=1))


def test_a_random_forest_gives_its_leaves_too(tmp_path, lleaves):
    """``average_output`` would divide the leaf indices by the number of trees: the rewrite drops it."""
    table = demo_data.generate_rows(2000, seed=3, start=START)
    spec = fit_spec(table, demo_data.NUMERIC, demo_data.CATEGORICAL)
    params = {"objective": "binary", "boosting": "rf", "bagging_freq": 1, "bagging_fraction": 0.7, "num_leaves": 7,
              "verbosity": -1, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(to_matrix(table, spec), table.column(demo_data.LABEL).to_numpy().astype(float)), 5)
    assert "average_output" in booster.model_to_string()
    folder = tmp_path / "rf" / "v1"
    folder.mkdir(parents=True)
    sha, _ = write_artifact(folder, booster, spec.to_dict())
    model = LoadedModel("rf", 1, booster, spec, {}, folder, sha)

    leaves = compiled.compiled_leaves(model, required=True)

    matrix = scoring_rows(model)
    assert np.array_equal(leaves.predict(matrix), booster.predict(matrix, pred_leaf=True, num_threads=1))


def test_reason_codes_read_compiled_leaves_and_match_lightgbm(model, lleaves, monkeypatch):
    matrix = scoring_rows(model, 500)
    wanted = np.ones(len(matrix), bool)
    expected = reason_codes(model, matrix, wanted, reasons_config("lightgbm"))
    # the leaves come from the library, not from pred_leaf
    monkeypatch.setattr(score, "leaf_indices", lambda *args: pytest.fail("LightGBM's pred_leaf was used"))

    got = reason_codes(reload(model), matrix, wanted, reasons_config("compiled"))

    assert got.equals(expected) and got.null_count == 0


@pytest.mark.parametrize("damage", ["corrupt", "another model's"])
def test_a_damaged_leaves_library_is_refused_and_reasons_use_pred_leaf(model, models, any_size, lleaves, damage, caplog):
    matrix = scoring_rows(model, 500)
    wanted = np.ones(len(matrix), bool)
    expected = reason_codes(model, matrix, wanted, reasons_config("lightgbm"))
    library = compiled.CachePaths.of(model, compiled.LEAVES).library
    compiled.precompile(model, force=True)
    if damage == "corrupt":
        library.write_bytes(os.urandom(4096))
    else:
        other = reload(models[1])
        compiled.precompile(other, force=True)
        shutil.copy(compiled.CachePaths.of(other, compiled.LEAVES).library, library)

    got = reason_codes(reload(model), matrix, wanted, reasons_config("auto"))

    assert got.equals(expected)
    warning = next(r.getMessage() for r in caplog.records if "leaf indices not used" in r.getMessage())
    assert "toy v1" in warning and "pred_leaf" in warning
    assert "is not the library registered for this model" in warning
    assert not library.exists() and library.with_name(library.name + ".rejected").exists()


# --- reason-code tables: from the verified model.txt, no cache --------------------------------------


def test_reason_tables_come_from_the_verified_model_txt_and_nothing_beside_it(model):
    config = reasons_config(engine="lightgbm")
    rows = scoring_rows(model, 400)
    wanted = np.ones(len(rows), bool)

    reasons = reason_codes(model, rows, wanted, config).to_pylist()

    assert all(len(r) == config.scoring.reasons for r in reasons)
    assert sorted(p.name for p in model.path.iterdir() if p.is_dir()) in ([], ["compiled"])  # no tables cached to tamper with
    explainer = score.path_explainer(model)
    assert explainer.explains(model.booster, rows)  # bias + contributions == LightGBM's raw scores, row by row
    assert len(explainer.offsets) == model.booster.num_trees() == 20
