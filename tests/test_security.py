"""Hardening (issue #15): a job reaches only its own data, runs only registered code, and fails in words.

Each test makes the attempt a semi-trusted job author (YAML and feature SQL) or a shared warehouse
folder could make, on real DuckDB files, real LightGBM and the real CLI, and checks it is refused.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchml.config import JobConfig, load_job
from batchml.errors import BatchMLError, ConfigError, DataError
from batchml.pipeline.nightly import run_job
from conftest import day, job_config, load_source


def one_line_error(result) -> str:
    """The CLI's error: exactly one error line on stderr (after the run's log lines), no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# -- 3. training.params ------------------------------------------------------------------------


def test_network_training_params_are_refused_in_one_line(demo_project):
    params = {"num_leaves": 15, "tree_learner": "data", "num_machines": 2,
              "machines": "127.0.0.1:12400,10.255.255.1:12401", "num_boost_round": 20}
    demo_project.write_config(job_config(training={"params": params}))
    result = demo_project.cli("run", "vuln_risk", "--as-of", day(60).date().isoformat(), "--no-notify", timeout=60)
    assert result.returncode == 2
    line = one_line_error(result)
    assert "training.params" in line and "machines, num_machines, tree_learner" in line
    # nothing ran: no run row, no model
    assert not demo_project.scalar("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'batchml'")


@pytest.mark.parametrize("name", ["output_model", "num_threads", "objective", "local_listen_port", "device_type"])
def test_only_tree_growing_params_are_allowed(name):
    base = job_config()
    with pytest.raises(ValueError, match=name):
        JobConfig.model_validate({**base, "training": {"params": {"num_leaves": 7, name: 1}}})
    allowed = {"num_leaves": 7, "min_data_in_leaf": 5, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0}
    assert JobConfig.model_validate({**base, "training": {"params": allowed}}).training.params == allowed


# -- 4. scoring.table --------------------------------------------------------------------------


def test_run_refuses_another_jobs_scores_table_the_batchml_schema_and_a_source(demo_project):
    demo_project.write_config(job_config(job="toy", scoring={"table": "scores.toy"}), job="toy")
    cases = {
        "scores.toy": "both write scores to scores.toy",
        "Scores.TOY_latest": "both write scores to",
        "batchml.evil": "batchml schema",
        "BatchML.runs": "batchml schema",
        "raw.vuln_findings": "source table of job",
    }
    for table, expected in cases.items():
        demo_project.write_config(job_config(job="evil", scoring={"table": table}), job="evil")
        with pytest.raises(ConfigError, match=expected):
            load_job(demo_project.root, "evil")
    result = demo_project.cli("run", "evil", "--as-of", day(60).date().isoformat(), "--no-notify", timeout=60)
    assert result.returncode == 2 and "source table of job" in one_line_error(result)
    # nothing was written into toy's table or the source
    assert demo_project.scalar("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'scores'") == 0


# -- 6. names ----------------------------------------------------------------------------------


def test_a_mixed_case_scores_table_is_published_and_reported(demo_project):
    demo_project.write_config(job_config(scoring={"table": "Scores.Toy_Mixed"}))
    run = run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)
    assert run.status == "succeeded" and run.rows_scored > 0
    published = list((demo_project.warehouse.parent / "published" / "scores" / "vuln_risk").glob("*.parquet"))
    assert len(published) == 1
    report = (demo_project.warehouse.parent / "reports" / "vuln_risk" / f"{run.run_id}.html").read_text()
    assert "Risk bands of the rows scored" in report


def test_drift_thresholds_must_name_features():
    with pytest.raises(ValueError, match=r"drift.thresholds names \['cvss_bse'\]"):
        JobConfig.model_validate(job_config(drift={"thresholds": {"cvss_bse": 0.3}}))
    assert JobConfig.model_validate(job_config(drift={"thresholds": {"cvss_base": 0.3, "__score__": 0.5}}))


@pytest.mark.parametrize("address", ["a@x.com, evil@y.com", "a@x.com evil@y.com", "Team <a@x.com>", "a@x.com\nBcc: e@y.com", "nobody"])
def test_notify_email_takes_single_addresses(address):
    with pytest.raises(ValueError, match="not one mail address"):
        JobConfig.model_validate(job_config(notify={"email": [address]}))
    assert JobConfig.model_validate(job_config(notify={"email": ["a@x.com", "sec-ops+risk@y.example.org"]}))


# -- 2. feature SQL reaches only the job's source ---------------------------------------------


def feature_job(demo_project, select: str, **overrides) -> None:
    """vuln_risk with ``select`` as its feature SQL (the source's own columns plus whatever it adds)."""
    sql = demo_project.root / "jobs" / "vuln_risk" / "features.sql"
    sql.parent.mkdir(parents=True, exist_ok=True)
    sql.write_text(select)
    config = job_config(**overrides)
    config["features"]["sql"] = "jobs/vuln_risk/features.sql"
    demo_project.write_config(config)


OFF = "file system operations are disabled by configuration"
NOT_YOURS = "a job's SQL may not read batchml's own tables or scores tables"
READS = {  # what the SQL tries -> (the SQL, what the one-line error says)
    "machine file": ("SELECT s.*, (SELECT content FROM read_text('/etc/hostname')) AS leak FROM source s", OFF),
    "process environment": ("SELECT s.*, (SELECT content FROM read_text('/proc/self/environ')) AS leak FROM source s", OFF),
    "download": ("SELECT s.*, (SELECT count(*) FROM read_csv('https://example.com/a.csv')) AS leak FROM source s", OFF),
    "batchml.runs": ("SELECT s.*, (SELECT count(*) FROM batchml.runs) AS leak FROM source s", NOT_YOURS),
    "catalog-qualified batchml": ("SELECT s.*, (SELECT count(*) FROM warehouse.BatchML.runs) AS leak FROM source s", NOT_YOURS),
    "another job's scores": ("SELECT s.*, (SELECT count(*) FROM scores.toy) AS leak FROM source s", NOT_YOURS),
    "query as text": ("SELECT s.*, (SELECT count(*) FROM query('SELECT * FROM batchml.runs')) AS leak FROM source s",
                      "a query given as text cannot be checked"),
}


@pytest.mark.parametrize("what", list(READS))
def test_feature_sql_cannot_read_the_machine_nor_batchml_nor_other_scores(demo_project, what, monkeypatch):
    monkeypatch.setenv("BATCHML_SMTP_PASSWORD", "s3cret-in-env")
    load_source(demo_project.warehouse, pa.table({"finding_id": ["x"], "score": [0.5]}), "scores.toy")
    sql, expected = READS[what]
    feature_job(demo_project, sql)
    with pytest.raises(BatchMLError, match=expected) as caught:
        run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)
    assert "s3cret" not in str(caught.value)
    assert demo_project.scalar("SELECT count(*) FROM batchml.quarantine") == 0
    assert demo_project.scalar("SELECT count(*) FROM batchml.quarantine WHERE record LIKE '%s3cret%'") == 0
    assert demo_project.scalar("SELECT status FROM batchml.runs") == "failed"


def test_feature_sql_still_reads_its_parquet_source_and_other_source_tables(demo_project, tmp_path):
    """What a job may do: its Parquet files through `source`, and a lookup table of the warehouse."""
    landing = demo_project.root / "landing"
    landing.mkdir()
    pq.write_table(demo_project.findings, landing / "part-0.parquet")
    load_source(demo_project.warehouse, pa.table({"ecosystem": ["npm", "pypi"], "weight": [1.0, 2.0]}), "raw.weights")
    select = ("SELECT s.*, coalesce(w.weight, 0) AS eco_weight FROM source s LEFT JOIN raw.weights w USING (ecosystem)")
    config = job_config(source={**job_config()["source"], "table": None, "parquet": "landing/*.parquet"})
    del config["source"]["table"]
    config["features"]["numeric"] = [*config["features"]["numeric"], "eco_weight"]
    demo_project.write_config(config)
    feature_job(demo_project, select, source=config["source"], features=config["features"])
    run = run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)
    assert run.status == "succeeded" and run.rows_scored > 0


@pytest.mark.parametrize("path, expected", [("../../etc/passwd", "is outside the project"), ("/etc/passwd", "is outside the project"),
                                            ("jobs/link.sql", "is outside the project"), ("jobs/zero.sql", "is outside the project"),
                                            ("jobs/fifo.sql", "is not a regular file"),
                                            ("jobs/huge.sql", "larger than 1024 KiB")])
def test_features_sql_is_a_bounded_regular_file_inside_the_project(demo_project, path, expected):
    jobs = demo_project.root / "jobs"
    jobs.mkdir(exist_ok=True)
    (jobs / "link.sql").symlink_to("/etc/passwd")
    (jobs / "zero.sql").symlink_to("/dev/zero")
    os.mkfifo(jobs / "fifo.sql")  # reading it would wait for a writer for ever
    (jobs / "huge.sql").write_text("SELECT * FROM source -- " + "x" * (1 << 20))
    config = job_config()
    config["features"]["sql"] = path
    demo_project.write_config(config)
    result = demo_project.cli("check", "vuln_risk", timeout=60)
    assert result.returncode != 0
    assert expected in result.stdout
    assert "root:" not in result.stdout + result.stderr  # nothing of /etc/passwd echoed
    with pytest.raises(ConfigError, match=expected):
        run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)
    assert "root:" not in demo_project.scalar("SELECT coalesce(max(error), '') FROM batchml.runs")


# -- 5. event times after the cut-off ----------------------------------------------------------


def test_a_far_future_event_time_is_quarantined_and_never_trained_on(demo_project):
    findings = demo_project.findings
    found = findings.column("found_at").to_pylist()
    found[10] = datetime(9999, 12, 31)  # landed and labeled on day 0, a typo in its event time
    load_source(demo_project.warehouse, findings.set_column(1, "found_at", pa.array(found, pa.timestamp("us"))))
    future_id = findings.column("finding_id")[10].as_py()

    first = run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)
    assert first.status == "succeeded" and first.promoted
    assert demo_project.query("SELECT entity_id, rule FROM batchml.quarantine WHERE rule = 'future_event_time'") == [
        (str(future_id), "future_event_time")]
    assert first.rows_extracted == first.rows_scored + first.rows_quarantined
    # the training window ends at the cut-off: the model was trained up to then, not up to 9999
    assert demo_project.scalar("SELECT max(train_end) FROM batchml.models") <= day(60)

    again = run_job(demo_project.project, "vuln_risk", as_of=day(100), force_retrain=True, notify=False)
    assert again.status == "succeeded"
    holdout = demo_project.scalar("SELECT holdout_rows FROM batchml.models WHERE version = 2")
    assert holdout >= 200  # 14 days of labeled rows, not the one row at 9999-12-31
    assert demo_project.scalar("SELECT count(*) FROM batchml.model_events WHERE event = 'no_decision'") == 0


# -- 7. failures in one line with a fix --------------------------------------------------------


@contextmanager
def immutable(path: Path):
    """``path`` unchangeable even for root (the tests run as root, for whom chmod changes nothing)."""
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_locks_folder_is_one_line_with_the_fix(demo_project):
    locks = demo_project.warehouse.parent / "locks"
    locks.mkdir()
    with immutable(locks):
        result = demo_project.cli("run", "vuln_risk", "--as-of", day(60).date().isoformat(), "--no-notify", timeout=120)
    assert result.returncode == 1
    line = one_line_error(result)
    assert f"cannot create the lock file {locks / 'vuln_risk.lock'}: Operation not permitted" in line
    assert "let the user running batchml write there" in line and "PermissionError" not in line


def test_a_full_disk_is_named_with_the_file_and_the_fix(tmp_path):
    from batchml.errors import file_error

    with pytest.raises(OSError) as caught, open("/dev/full", "wb", buffering=0) as full:
        full.write(b"x")  # the kernel's own ENOSPC
    assert caught.value.errno == errno.ENOSPC
    caught.value.filename = str(tmp_path / "reports" / "r.html")
    message = str(file_error(caught.value))
    assert message == (f"cannot write {tmp_path / 'reports' / 'r.html'}: No space left on device; free space on that disk "
                       f"(or move the warehouse to one with room: --warehouse / BATCHML_WAREHOUSE), then rerun")
    # pyarrow's OSErrors carry the errno in their text only
    assert "No space left on device; free space" in str(file_error(OSError("[Errno 28] No space left on device")))


def test_a_duckdb_error_while_streaming_a_pull_is_a_source_error(demo_project):
    late = demo_project.scalar("SELECT max(finding_id) FROM raw.vuln_findings WHERE ingested_at < ?", [day(60)])
    feature_job(demo_project, f"SELECT *, CAST(CASE WHEN finding_id = {late} THEN 'x' ELSE '1' END AS INTEGER) AS boom FROM source",
                scoring={**job_config()["scoring"], "batch_size": 1000})
    with pytest.raises(DataError, match="Conversion Error") as caught:
        run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)
    assert "cannot read source raw.vuln_findings through jobs/vuln_risk/features.sql" in str(caught.value)
    assert "a source column no longer fits the SQL in jobs/vuln_risk/features.sql" in str(caught.value)


def test_a_symlinked_model_folder_is_refused_not_followed(demo_project, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not batchml's")
    models = demo_project.warehouse.parent / "models" / "vuln_risk"
    models.mkdir(parents=True)
    (models / "v1").symlink_to(elsewhere)
    result = demo_project.cli("run", "vuln_risk", "--as-of", day(60).date().isoformat(), "--no-notify", timeout=120)
    assert result.returncode == 1
    assert f"{models / 'v1'} is a symbolic link (to {elsewhere}); batchml creates its model folders itself" in one_line_error(result)
    assert (elsewhere / "keep.txt").read_text() == "not batchml's"


def test_check_says_runs_cannot_write_a_read_only_warehouse(demo_project):
    with immutable(demo_project.warehouse):
        result = demo_project.cli("check", "vuln_risk", timeout=120)
    assert result.returncode == 1
    assert f"FAIL vuln_risk: warehouse: runs cannot write: {demo_project.warehouse} read-only" in result.stdout
    assert "ok   vuln_risk: warehouse (runs can write" in demo_project.cli("check", "vuln_risk", timeout=120).stdout


def test_a_failed_run_does_not_claim_to_be_committed_when_publishing_fails(demo_project):
    published = demo_project.warehouse.parent / "published"
    published.mkdir()
    feature_job(demo_project, "SELECT *, CAST('x' AS INTEGER) AS boom FROM source")  # fails every run
    with immutable(published):
        result = demo_project.cli("run", "vuln_risk", "--as-of", day(60).date().isoformat(), "--no-notify", timeout=120)
    assert result.returncode == 1
    assert "publishing for analysts failed (the run is recorded as failed)" in result.stderr
    assert "the run itself is committed" not in result.stderr


# -- 8. files ----------------------------------------------------------------------------------


def cli_with_umask(demo_project, umask: str, *args: str) -> subprocess.CompletedProcess:
    command = " ".join(["umask", umask, ";", "exec", sys.executable, "-m", "batchml.cli", "--project", str(demo_project.root), *args])
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "BATCHML_THREADS": "1"})


def test_files_follow_the_umask(demo_project):
    home = demo_project.warehouse.parent
    before = set(home.rglob("*"))
    run = cli_with_umask(demo_project, "027", "run", "vuln_risk", "--as-of", day(60).date().isoformat(), "--no-notify")
    assert run.returncode == 0, run.stderr
    created = [path for path in home.rglob("*") if path.is_file() and path not in before]
    kinds = {path.relative_to(home).parts[0] for path in created}
    assert {"reports", "published", "models", "locks", "catalog.duckdb"} <= kinds
    too_open = {str(path.relative_to(home)): oct(path.stat().st_mode & 0o777) for path in created if path.stat().st_mode & 0o007}
    assert too_open == {}
    report = cli_with_umask(demo_project, "002", "report", "vuln_risk")
    assert report.returncode == 0, report.stderr
    path = Path(report.stdout.strip().splitlines()[-1].split()[-1])
    assert path.suffix == ".html" and path.stat().st_mode & 0o777 == 0o664


def test_a_huge_category_value_is_stored_cut_in_drift_histograms(demo_project):
    findings = demo_project.findings
    ecosystem = findings.column("ecosystem").to_pylist()
    ingested = findings.column("ingested_at").to_pylist()
    late = max(i for i, at in enumerate(ingested) if at < day(100))
    ecosystem[late] = "x" * 2_000_000  # an unseen level, 2 MB long
    load_source(demo_project.warehouse, findings.set_column(findings.schema.get_field_index("ecosystem"), "ecosystem",
                                                            pa.array(ecosystem)))
    run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)
    run = run_job(demo_project.project, "vuln_risk", as_of=day(100), notify=False)
    assert run.status == "succeeded"
    longest, marked = demo_project.query("SELECT max(length(histogram)), bool_or(histogram LIKE '%(+1999800 chars)%') "
                                         "FROM batchml.drift WHERE feature = 'ecosystem'")[0]
    assert marked and longest < 5_000


# -- 1. compiled libraries ---------------------------------------------------------------------


def test_a_planted_compiled_library_is_never_loaded(demo_project, monkeypatch, tmp_path):
    lleaves = pytest.importorskip("lleaves")
    from batchml.models import compiled
    from batchml.models import registry

    demo_project.write_config(job_config(scoring={**job_config()["scoring"], "engine": "compiled"}))
    first = run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)  # compiles at promotion
    assert first.promoted
    folder = demo_project.warehouse.parent / "models" / "vuln_risk" / "v1" / "compiled"
    registered = dict(demo_project.query("SELECT file, sha256 FROM batchml.compiled_libraries WHERE job = 'vuln_risk' AND version = 1"))
    assert registered == {path.name: registry.sha256_file(path) for path in folder.glob("*.so")} and len(registered) == 2
    library = next(folder / name for name in registered if "-" not in name)  # the scores library

    # the attack: other native code under the library's name, that even scores like the genuine one
    # (here: the same trees compiled with other options, so any check of its output would pass)
    planted = tmp_path / "planted.so"
    genuine = lleaves.Model(model_file=str(library.parent.parent / "model.txt"))
    genuine.compile(cache=str(planted), **{**compiled.COMPILE_OPTIONS, "fblocksize": 3})
    assert registry.sha256_file(planted) != registered[library.name]
    library.write_bytes(planted.read_bytes())

    check = demo_project.cli("check", "vuln_risk", timeout=120)
    assert check.returncode == 1 and f"compiled library {library} (sha256" in check.stdout
    assert "is not the one registered for v1 in batchml.compiled_libraries" in check.stdout

    loaded: list[str] = []  # every library batchml or lleaves is asked to load, in this process or a child
    real_compile, real_load, real_run = lleaves.Model.compile, compiled._load, subprocess.run

    def spy_compile(self, *args, cache=None, **kwargs):
        loaded.append(str(cache))
        return real_compile(self, *args, cache=cache, **kwargs)

    def spy_load(model, kind, library, code):
        loaded.append(str(library))
        return real_load(model, kind, library, code)

    def spy_run(args, *rest, **kwargs):
        loaded.extend(str(arg) for arg in args if str(arg).endswith(".so"))
        return real_run(args, *rest, **kwargs)

    monkeypatch.setattr(lleaves.Model, "compile", spy_compile)
    monkeypatch.setattr(compiled, "_load", spy_load)
    monkeypatch.setattr(subprocess, "run", spy_run)
    warnings: list[str] = []
    monkeypatch.setattr(compiled.log, "warning", lambda message, *args: warnings.append(message % args if args else message))
    # engine auto, as nightly runs use it (a small model counts as large here): use a cached library, never compile
    demo_project.write_config(job_config(scoring={**job_config()["scoring"], "engine": "auto"}))
    monkeypatch.setattr(compiled, "AUTO_MIN_LEAVES", 0)
    second = run_job(demo_project.project, "vuln_risk", as_of=day(61), notify=False)

    assert second.status == "succeeded" and second.rows_scored > 0
    assert str(library) not in loaded and not any(path.endswith(library.name) for path in loaded)
    assert [Path(path).name for path in loaded] == [name for name in registered if name.endswith("-leaves.so")]  # the spy sees loads
    assert not library.exists() and library.with_name(library.name + ".rejected").read_bytes() == planted.read_bytes()
    assert any("is not the library registered for this model" in w and "scoring with LightGBM" in w for w in warnings)
    assert demo_project.scalar("SELECT count(*) FROM batchml.compiled_libraries") == 2  # nothing new vouched for
