"""What analysts open: the published catalog, readable by the DuckDB CLI from PyPI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from batchml.pipeline.nightly import run_job
from conftest import day, job_config
from test_operations import children, paused  # noqa: F401 - real CLI runs paused at a step, killed by pid

DUCKDB_CLI = Path(sys.executable).parent / "duckdb"  # the `duckdb-cli` package of the dev extra


def cli_query(database: Path, sql: str) -> str:
    binary = str(DUCKDB_CLI) if DUCKDB_CLI.exists() else shutil.which("duckdb")
    assert binary, "duckdb-cli is part of the dev extra; run make install"
    result = subprocess.run([binary, "-readonly", "-csv", str(database), "-c", sql], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_pypi_duckdb_cli_opens_the_catalog_and_the_warehouse(champion_project):
    demo_project = champion_project  # after the nightly run at day 60
    run_job(demo_project.project, "vuln_risk", as_of=day(61), notify=False)
    home = demo_project.root / "warehouse"

    latest = cli_query(home / "catalog.duckdb", "SELECT count(*) FROM scores.vuln_risk_latest")
    runs = cli_query(home / "catalog.duckdb", "SELECT count(*) FROM batchml.runs")
    champion = cli_query(home / "catalog.duckdb", "SELECT version FROM batchml.champion_history WHERE champion_until IS NULL")
    direct = cli_query(home / "warehouse.duckdb", "SELECT count(*) FROM scores.vuln_risk")

    assert int(latest.split()[-1]) == demo_project.scalar("SELECT count(*) FROM scores.vuln_risk_latest") > 0
    assert int(runs.split()[-1]) == 2 and champion.split()[-1] == "1"
    assert int(direct.split()[-1]) == demo_project.scalar("SELECT count(*) FROM scores.vuln_risk")


def test_published_files_match_the_warehouse_and_publishing_twice_is_harmless(demo_project):
    from batchml.storage import publish

    run = run_job(demo_project.project, "vuln_risk", as_of=day(60), notify=False)
    files = sorted((demo_project.root / "warehouse" / "published").rglob("*.parquet"))
    assert publish.publish_pending(demo_project.project, demo_project.project.job("vuln_risk")) == 0
    assert sorted((demo_project.root / "warehouse" / "published").rglob("*.parquet")) == files
    import duckdb

    con = duckdb.connect(str(demo_project.root / "warehouse" / "catalog.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM scores.vuln_risk WHERE run_id = ?", [run.run_id]).fetchone()[0] == run.rows_scored
        assert con.execute("SELECT count(*) FROM batchml.quarantine").fetchone()[0] == run.rows_quarantined
    finally:
        con.close()


def test_a_run_that_died_before_publishing_is_published_by_the_next(demo_project, children):
    # a real run, kill -9 once its commit is done and before it publishes
    paused(demo_project, children, "committed", "run", "vuln_risk", "--as-of", f"{day(60):%Y-%m-%d}", "--no-notify").kill()
    [(first_id, first_rows)] = demo_project.query("SELECT run_id, rows_scored FROM batchml.runs WHERE status = 'succeeded'")
    assert first_rows > 0 and not any((demo_project.root / "warehouse" / "published").rglob(f"*{first_id}*"))

    second = run_job(demo_project.project, "vuln_risk", as_of=day(61), notify=False)

    catalog = duckdb.connect(str(demo_project.root / "warehouse" / "catalog.duckdb"), read_only=True)
    try:
        published = dict(catalog.execute("SELECT run_id, count(*) FROM scores.vuln_risk GROUP BY run_id").fetchall())
    finally:
        catalog.close()
    assert published == {first_id: first_rows, second.run_id: second.rows_scored}


def test_a_copied_project_s_catalog_reads_its_own_files(champion_project, tmp_path):
    demo_project = champion_project  # after the nightly run at day 60
    copy = tmp_path / "copy"
    shutil.copytree(demo_project.root, copy)
    from batchml.project import Project

    run_job(Project.open(copy), "vuln_risk", as_of=day(61), notify=False)

    catalog = duckdb.connect(str(copy / "warehouse" / "catalog.duckdb"), read_only=True)
    try:
        definitions = [sql for (sql,) in catalog.execute("SELECT sql FROM duckdb_views() WHERE NOT internal AND sql LIKE '%read_parquet%'").fetchall()]
        runs = catalog.execute("SELECT count(DISTINCT run_id) FROM scores.vuln_risk").fetchone()[0]
    finally:
        catalog.close()
    assert definitions and all(str(copy) in sql for sql in definitions)
    assert runs == 2  # the copy's own two runs, not the original's one


def catalog_rows(p, sql: str) -> list[tuple]:
    catalog = duckdb.connect(str(p.root / "warehouse" / "catalog.duckdb"), read_only=True)
    try:
        return catalog.execute(sql).fetchall()
    finally:
        catalog.close()


def test_a_promotion_or_rollback_by_hand_reaches_the_catalog_at_once(champion_copy):
    from batchml.models import manage

    p = champion_copy(day(59))  # after the nightly run at day 59
    run_job(p.project, "vuln_risk", as_of=day(66), force_retrain=True, notify=False)  # v2: promoted or not
    champion = p.scalar("SELECT version FROM batchml.models WHERE status = 'champion'")
    other = 3 - champion
    now = "SELECT version FROM batchml.champion_history WHERE job = 'vuln_risk' AND champion_until IS NULL"

    manage.promote(p.project, "vuln_risk", other, "catalog test")
    assert catalog_rows(p, now) == [(other,)]
    assert catalog_rows(p, "SELECT version FROM batchml.models WHERE status = 'champion'") == [(other,)]
    manage.rollback(p.project, "vuln_risk", "catalog test: undo")
    assert catalog_rows(p, now) == [(champion,)]


def test_a_run_s_notification_and_a_report_sent_by_hand_reach_the_catalog(demo_project, monkeypatch):
    from batchml.errors import ConfigError
    from batchml.reports.deliver import report_and_notify

    monkeypatch.delenv("BATCHML_SMTP_HOST", raising=False)  # no server: the mail is recorded as skipped
    p = demo_project
    p.write_config(job_config(notify={"email": ["secops@example.com"], "on": ["always"]}))
    run = run_job(p.project, "vuln_risk", as_of=day(60))
    notifications = "SELECT run_id, status FROM batchml.notifications"
    assert catalog_rows(p, notifications) == p.query(notifications) == [(run.run_id, "skipped")]

    with pytest.raises(ConfigError):  # `batchml report --send` with nothing set up to send it
        report_and_notify(p.project, p.project.job("vuln_risk"), run.run_id, send=True, force_send=True)
    assert catalog_rows(p, notifications) == [(run.run_id, "skipped")] * 2


def test_a_catalog_build_that_fails_midway_leaves_the_old_catalog_as_it_was(champion_project, monkeypatch):
    from batchml.storage import publish

    p = champion_project  # after the nightly run at day 60
    home = p.root / "warehouse"
    before = (home / "catalog.duckdb").read_bytes()
    views = publish.catalog_views
    broken = {"scores.broken": "SELECT * FROM no_such_table"}  # fails after the other views were created
    monkeypatch.setattr(publish, "catalog_views", lambda project, configs: {**views(project, configs), **broken})

    with pytest.raises(duckdb.Error):
        publish.ensure_catalog(p.project, [p.project.job("vuln_risk")])

    assert (home / "catalog.duckdb").read_bytes() == before
    assert sorted(f.name for f in home.iterdir() if "catalog" in f.name) == ["catalog.duckdb"]  # no temp file left
    assert int(cli_query(home / "catalog.duckdb", "SELECT count(*) FROM batchml.runs").split()[-1]) == 1
