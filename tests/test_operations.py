"""Operations: job locks, crash safety (kill -9 at each step), analysts beside a run, backfill,
replay and drift-only runs — real CLI processes on real DuckDB files, no mocks.

A run announces ``batchml: paused at <step> (pid N)`` on stderr when ``BATCHML_PAUSE_AT=<step>``
and sleeps there, so a test can ``kill -9`` it at a known point (see ``pipeline.checkpoint``).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import DemoProject, day, job_config
from test_pipeline import valid_landed

from batchml import api
from batchml.models import manage
from batchml.models import registry
from batchml.pipeline.nightly import run_job

AS_OF = "2026-03-01"  # day(59): the first run trains v1 on labels known before then
LATER = "2026-03-03"  # day(61)
LABEL_DELAY = timedelta(days=30)  # labels of the test data arrive 30 days after the finding

# An analyst's session: holds a DuckDB file open read-only and counts a table every 0.2 s until told to stop.
READER = """
import os, sys, time, duckdb
path, table, stop = sys.argv[1:4]
con = duckdb.connect(path, read_only=True)
deadline = time.monotonic() + 600  # a bound for a forgotten session, not a test of speed
while time.monotonic() < deadline and not os.path.exists(stop):
    try:
        print(f"{time.time():.3f} {con.execute(f'SELECT count(*) FROM {table}').fetchone()[0]}", flush=True)
    except Exception as exc:
        print(f"{time.time():.3f} ERROR {type(exc).__name__}: {exc}", flush=True)
    time.sleep(0.2)
con.close()
"""


class Child:
    """A process in the background whose output (stdout and stderr, merged) a thread collects line by line."""

    def __init__(self, argv: list[str], env: dict | None = None):
        full_env = {**os.environ, "BATCHML_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
        self.output: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._collect, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _collect(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, text: str, timeout: float = 90) -> str:
        """The next output line containing ``text``; fails if the process ends or the time runs out first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {text!r} within {timeout} s:\n{''.join(self.output)}") from None
            if line is None:
                raise AssertionError(f"exited {self.proc.wait()} before {text!r}:\n{''.join(self.output)}")
            if text in line:
                return line

    def kill(self) -> None:
        """kill -9, and reap it."""
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def children():
    """Background processes of a test, killed (by pid) if still alive when it ends."""
    started: list[Child] = []
    yield started
    for child in started:
        if child.proc.poll() is None:
            child.kill()


def batchml(p: DemoProject, children: list, *args: str, env: dict | None = None) -> Child:
    child = Child([sys.executable, "-m", "batchml.cli", "--project", str(p.root), *args], env=env)
    children.append(child)
    return child


def paused(p: DemoProject, children: list, step: str, *args: str, seconds: float = 300) -> Child:
    """A run of the CLI command ``args`` (default: the first nightly run) waiting at ``step``."""
    child = batchml(p, children, *(args or ("run", "vuln_risk", "--as-of", AS_OF, "--no-notify")),
                    env={"BATCHML_PAUSE_AT": step, "BATCHML_PAUSE_SECONDS": str(seconds)})
    line = child.wait_for(f"paused at {step}")
    assert f"(pid {child.pid})" in line
    return child


def reader(p: DemoProject, children: list, database: Path, table: str) -> tuple[Child, Path]:
    """An analyst holding ``database`` open read-only; touch the returned path to end the session."""
    stop = p.root / f"stop-{database.stem}"
    child = Child([sys.executable, "-c", READER, str(database), table, str(stop)])
    children.append(child)
    child.wait_for(" ")  # the first count: the file is open
    return child, stop


def counts(child: Child) -> list[tuple[float, int]]:
    rows = [line.split() for line in child.output]
    errors = [" ".join(row) for row in rows if row[1] == "ERROR"]
    assert not errors, errors
    return [(float(at), int(n)) for at, n in rows]


def runs(p: DemoProject, kind: str | None = None) -> list[dict]:
    where = "WHERE kind = ?" if kind else ""
    names = ("run_id", "kind", "status", "as_of", "rows_scored", "watermark_from", "note", "error")
    rows = p.query(f"SELECT {', '.join(names)} FROM batchml.runs {where} ORDER BY started_at", [kind] if kind else [])
    return [dict(zip(names, row)) for row in rows]


def watermark(p: DemoProject) -> list[tuple]:
    return p.query("SELECT job, value, run_id FROM batchml.watermarks ORDER BY job")


def nightly_scores(p: DemoProject) -> tuple[int, int]:
    """(score rows, distinct findings) written by nightly runs."""
    return p.query(
        "SELECT count(*), count(DISTINCT finding_id) FROM scores.vuln_risk s JOIN batchml.runs r USING (run_id) WHERE r.kind = 'nightly'"
    )[0]


# -- 1. locks ----------------------------------------------------------------------------------------


def test_one_run_per_job_at_a_time_and_the_lock_dies_with_its_holder(demo_project, children):
    p = demo_project
    first = paused(p, children, "extract")

    # the first run sleeps at its pause for 300 s holding the lock: a second run that waited for it
    # would run into this (generous) timeout; one that gives up at once exits 75 long before
    second = p.cli("run", "vuln_risk", "--as-of", AS_OF, "--no-notify", timeout=120)

    assert second.returncode == 75, second.stderr
    assert first.proc.poll() is None, "the first run ended: the lock was free by then"
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "vuln_risk" in lines[0] and f"pid {first.pid}" in lines[0], second.stderr

    first.kill()
    third = paused(p, children, "train")  # kill -9 freed the lock: the next run got it
    assert [r["status"] for r in runs(p)] == ["crashed", "running"]

    # another job may run meanwhile: the paused run holds its job lock, not the warehouse file
    p.write_config(job_config(**{"job": "other", "scoring.table": "scores.other"}), job="other")
    other = p.cli("run", "other", "--as-of", AS_OF, "--no-notify", timeout=180)

    assert other.returncode == 0, other.stderr
    assert third.proc.poll() is None, "the paused vuln_risk run ended while job other ran"
    assert p.scalar("SELECT count(*) FROM scores.other") == valid_landed(p, day(-1), day(59))
    statuses = {r["run_id"].split("-")[0]: r["status"] for r in runs(p)[1:]}
    assert statuses == {"vuln_risk": "running", "other": "succeeded"}  # other's run left vuln_risk's run alone
    third.kill()


# -- 2. crash safety -----------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["extract", "train", "score", "commit"])
def test_a_run_killed_at_any_point_is_done_once_by_the_next_run(demo_project, children, point):
    p = demo_project
    tmp, v1 = p.warehouse.parent / "tmp", p.warehouse.parent / "models" / "vuln_risk" / "v1"
    paused(p, children, point).kill()

    [killed] = runs(p)
    assert killed["status"] == "running" and (tmp / killed["run_id"]).is_dir()
    # nothing of the killed run was committed (at `commit`: the open transaction was rolled back)
    assert p.scalar("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'scores'") == 0
    assert p.query("SELECT count(*) FROM batchml.models UNION ALL SELECT count(*) FROM batchml.watermarks") == [(0,), (0,)]
    if point == "train":  # the crash left an unregistered v1 folder behind: make it half written
        assert (v1 / "model.txt").exists()
        (v1 / "model.txt").write_text("tree\nversion=v4\n")
        (v1 / "model.json").unlink()

    p.cli("run", "vuln_risk", "--as-of", AS_OF, "--no-notify", check=True)

    crashed, rerun = runs(p)
    assert crashed["run_id"] == killed["run_id"] and crashed["status"] == "crashed" and "process ended" in crashed["error"]
    assert rerun["status"] == "succeeded" and rerun["rows_scored"] == valid_landed(p, day(-1), day(59))
    assert watermark(p) == [("vuln_risk", day(59), rerun["run_id"])]
    models = p.query("SELECT version, status, run_id FROM batchml.models")
    assert models == [(1, "champion", rerun["run_id"])]
    artifact = ("job", "version", "artifact_path", "sha256", "manifest_sha256")
    registry.verify(dict(zip(artifact, p.query(f"SELECT {', '.join(artifact)} FROM batchml.models")[0])))  # files match hashes
    assert p.scalar("SELECT count(*) FROM batchml.model_events") == 1
    assert p.scalar("SELECT count(*) FROM scores.vuln_risk WHERE run_id = ?", [killed["run_id"]]) == 0

    later = run_job(p.project, "vuln_risk", as_of=day(61), notify=False)

    assert later.status == "succeeded" and later.champion_version == 1
    scored, distinct = nightly_scores(p)
    assert scored == distinct == valid_landed(p, day(-1), day(61))
    assert watermark(p) == [("vuln_risk", day(61), later.run_id)]
    # the next run under the lock clears what the dead one left; otherwise every crash leaks a batch in tmp/
    assert not any(tmp.iterdir()), f"the crashed run's scratch files were left: {[str(f.relative_to(tmp)) for f in sorted(tmp.rglob('*'))]}"


def test_an_interrupt_after_the_commit_leaves_the_run_succeeded(demo_project, children):
    """Ctrl-C while the connection closes (DuckDB checkpoints then): everything is committed, so the
    run must not be relabelled failed with its scores and watermark in place."""
    p = demo_project
    child = paused(p, children, "committed")
    child.proc.send_signal(signal.SIGINT)
    code = child.proc.wait(timeout=60)

    [run] = runs(p)
    assert run["status"] == "succeeded" and run["error"] is None
    assert run["rows_scored"] == valid_landed(p, day(-1), day(59)) == p.scalar("SELECT count(*) FROM scores.vuln_risk")
    assert watermark(p) == [("vuln_risk", day(59), run["run_id"])]
    assert code == 130, "".join(child.output)  # interrupted all the same: cron sees it did not finish cleanly
    assert "it stays succeeded" in "".join(child.output)


# -- 3. analysts ------------------------------------------------------------------------------------


def test_analysts_on_the_catalog_never_block_a_run_and_see_its_scores(champion_copy, children):
    p = champion_copy(day(59))  # after the nightly run at day 59
    before = valid_landed(p, day(-1), day(59))
    analyst, stop = reader(p, children, p.warehouse.parent / "catalog.duckdb", "scores.vuln_risk")

    # a night stopped inside its commit (scores written, the transaction open, the job lock held):
    # the analyst's session goes on answering, with what was published before
    night = paused(p, children, "commit", "run", "vuln_risk", "--as-of", LATER, "--no-notify")
    polls = len(counts(analyst))
    wait_until(lambda: len(counts(analyst)) >= polls + 3, "three more answers from the analyst's session while the run waits")
    assert night.proc.poll() is None
    night.kill()

    done = p.cli("run", "vuln_risk", "--as-of", LATER, "--no-notify", timeout=300)
    assert done.returncode == 0, done.stderr
    after = valid_landed(p, day(-1), day(61))
    wait_until(lambda: counts(analyst)[-1][1] == after, "the analyst to see the night's scores")
    stop.touch()
    assert analyst.proc.wait(timeout=60) == 0

    values = [n for _, n in counts(analyst)]
    assert values[0] == before and values[-1] == after
    assert values == sorted(values) and set(values) == {before, after}  # one step: the run's publish


def wait_until(predicate, what: str, timeout: float = 120) -> None:
    """Poll ``predicate`` until true; the bound is generous (a loaded machine), the wait ends when it is."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)


def test_a_session_holding_the_warehouse_file_delays_a_run_then_fails_it_naming_the_pid(demo_project, children):
    p = demo_project
    analyst, stop = reader(p, children, p.warehouse, "raw.vuln_findings")

    started = time.monotonic()
    blocked = p.cli("run", "vuln_risk", "--as-of", AS_OF, "--no-notify", env={"BATCHML_LOCK_TIMEOUT": "1"}, timeout=120)
    elapsed = time.monotonic() - started

    assert blocked.returncode == 1, blocked.stderr
    assert 1 <= elapsed < 60, f"gave up after {elapsed:.1f} s with a 1 s lock timeout"
    waiting, error = blocked.stderr.strip().splitlines()  # said once while it waits, then the one-line error
    assert f"warehouse.duckdb is held by process {analyst.pid}" in waiting and "waiting up to 1 s" in waiting, blocked.stderr
    assert error.startswith("error: ") and str(p.warehouse) in error and f"process {analyst.pid}" in error, blocked.stderr

    stop.touch()
    assert analyst.proc.wait(timeout=30) == 0 and counts(analyst)  # the analyst's session was never disturbed
    assert p.scalar("SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'batchml'") == 0  # never got in


# -- 4. backfill ------------------------------------------------------------------------------------


def test_backfill_appends_scores_for_the_event_range_and_moves_no_watermark(champion_copy):
    p = champion_copy(day(59))  # after the nightly run at day 59
    run_job(p.project, "vuln_risk", as_of=day(66), force_retrain=True, notify=False)
    if p.scalar("SELECT version FROM batchml.models WHERE status = 'champion'") != 2:
        manage.promote(p.project, "vuln_risk", 2, "backfill test: score with v2")
    mark, nightly = watermark(p), p.scalar("SELECT count(*) FROM scores.vuln_risk")
    in_range = {r[0] for r in p.query(  # event days 2026-02-10 .. 2026-02-12, end day included
        "SELECT finding_id FROM raw.vuln_findings WHERE found_at >= ? AND found_at < ?", [day(40), day(43)])}
    assert len(in_range) > 100

    def backfill(**options) -> dict:
        """A backfill of event days 2026-02-10 .. 2026-02-12 in-process (what `batchml backfill` calls), read back."""
        api.backfill("vuln_risk", "2026-02-10", "2026-02-12", project=p.root, **options)
        run = runs(p, "backfill")[-1]
        assert run["status"] == "succeeded"
        return run

    def scored_by(run: dict) -> tuple[set, set]:
        rows = p.query("SELECT finding_id, model_version FROM scores.vuln_risk WHERE run_id = ?", [run["run_id"]])
        assert len(rows) == len({f for f, _ in rows})
        return {f for f, _ in rows}, {v for _, v in rows}

    first = backfill()
    assert scored_by(first) == (in_range, {2}) and first["rows_scored"] == len(in_range)
    second = backfill()
    assert second["run_id"] != first["run_id"] and scored_by(second) == (in_range, {2})
    assert p.scalar("SELECT count(*) FROM scores.vuln_risk") == nightly + 2 * len(in_range)  # appended, nothing deleted
    latest = dict(p.query("SELECT finding_id, run_id FROM scores.vuln_risk_latest"))
    assert len(latest) == p.scalar("SELECT count(DISTINCT finding_id) FROM scores.vuln_risk")
    assert {latest[f] for f in in_range} == {second["run_id"]}

    with_v1 = backfill(model_version=1)
    assert scored_by(with_v1) == (in_range, {1})
    # v1's own scores, not the champion's under v1's name: what v1 gave the same rows in its nightly runs
    by_v1_nightly = dict(p.query("SELECT finding_id, score FROM scores.vuln_risk WHERE model_version = 1 AND run_id IN "
                                 "(SELECT run_id FROM batchml.runs WHERE kind = 'nightly')"))
    rescored = dict(p.query("SELECT finding_id, score FROM scores.vuln_risk WHERE run_id = ?", [with_v1["run_id"]]))
    both = set(rescored) & set(by_v1_nightly)
    assert len(both) > 100 and max(abs(rescored[f] - by_v1_nightly[f]) for f in both) <= 1e-12
    dry = backfill(dry_run=True)
    assert scored_by(dry) == (set(), set()) and dry["rows_scored"] == 0 and "dry run" in dry["note"]
    assert p.scalar("SELECT count(*) FROM scores.vuln_risk") == nightly + 3 * len(in_range)
    assert watermark(p) == mark


def test_a_backfill_scores_or_quarantines_every_row_it_pulls_in_one_pass(champion_copy):
    """A backfill streams the pulled rows straight into scoring; the rejected ones still reach the
    quarantine, and a batch over the quarantine limit commits nothing."""
    from batchml.pipeline.backfill import backfill
    from batchml.errors import RejectedError
    from batchml.storage.warehouse import open_connection

    p = champion_copy(day(59))  # after the nightly run at day 59
    window = [day(40), day(43)]
    in_range = {r[0] for r in p.query("SELECT finding_id FROM raw.vuln_findings WHERE found_at >= ? AND found_at < ?", window)}
    con = open_connection(p.warehouse)
    try:  # three rows out of range, and an older copy of an existing row (a duplicate id)
        con.execute("INSERT INTO raw.vuln_findings SELECT * REPLACE (finding_id + 10000000 AS finding_id, 99.0 AS cvss_base) "
                    "FROM raw.vuln_findings WHERE found_at >= ? AND found_at < ? ORDER BY finding_id LIMIT 3", window)
        con.execute("INSERT INTO raw.vuln_findings SELECT * REPLACE (ingested_at - INTERVAL 1 HOUR AS ingested_at) "
                    "FROM raw.vuln_findings WHERE found_at >= ? AND found_at < ? ORDER BY finding_id LIMIT 1", window)
    finally:
        con.close()

    run = backfill(p.project, "vuln_risk", day(40).date(), day(42).date())

    assert (run.rows_extracted, run.rows_quarantined, run.rows_scored) == (len(in_range) + 4, 4, len(in_range))
    assert {r[0] for r in p.query("SELECT finding_id FROM scores.vuln_risk WHERE run_id = ?", [run.run_id])} == in_range
    rules = dict(p.query("SELECT rule, count(*) FROM batchml.quarantine WHERE run_id = ? GROUP BY rule", [run.run_id]))
    assert rules == {"out_of_range": 3, "duplicate": 1}

    p.write_config(job_config(**{"validation.max_quarantine_fraction": 0.001}))
    scores_before = p.scalar("SELECT count(*) FROM scores.vuln_risk")
    with pytest.raises(RejectedError, match="max_quarantine_fraction"):
        backfill(p.project, "vuln_risk", day(40).date(), day(42).date())
    status, rejected_id = p.query("SELECT status, run_id FROM batchml.runs WHERE kind = 'backfill' ORDER BY started_at DESC LIMIT 1")[0]
    assert status == "rejected" and p.scalar("SELECT count(*) FROM scores.vuln_risk") == scores_before
    assert p.scalar("SELECT count(*) FROM batchml.quarantine WHERE run_id = ?", [rejected_id]) == 4  # kept for diagnosis


# -- 5. replay --------------------------------------------------------------------------------------


def test_replay_runs_each_night_point_in_time_and_resumes_after_a_crash(demo_project, children):
    p = demo_project
    p.write_config(job_config(**{"training.retrain": {"every_days": 7, "on_drift": True, "min_new_labels": 50}}))  # retrain nightly
    replay = ("backfill", "vuln_risk", "--start", "2026-03-01", "--end")

    first = p.cli(*replay, "2026-03-02", "--replay", check=True, timeout=300)
    assert "replayed 2 night(s)" in first.stdout and "already" not in first.stdout
    # the pause applies to every night: the two done nights are skipped, so it stops in the middle of day 3
    paused(p, children, "score", *replay, "2026-03-04", "--replay").kill()
    resumed = p.cli(*replay, "2026-03-04", "--replay", check=True, timeout=300)

    assert "replayed 2 night(s), 2 already done (" in resumed.stdout
    nights = runs(p, "replay")
    assert [(r["as_of"], r["status"]) for r in nights] == [
        (day(60), "succeeded"), (day(61), "succeeded"), (day(62), "crashed"), (day(62), "succeeded"), (day(63), "succeeded")]
    done = [r for r in nights if r["status"] == "succeeded"]
    scored, distinct = p.query("SELECT count(*), count(DISTINCT finding_id) FROM scores.vuln_risk")[0]
    assert scored == distinct == valid_landed(p, day(-1), day(63)) == sum(r["rows_scored"] for r in done)
    assert watermark(p) == [("vuln_risk", day(63), done[-1]["run_id"])]
    assert p.scalar("SELECT count(*) FROM batchml.models") >= 2
    for run in nights:
        as_of, run_id = run["as_of"], run["run_id"]
        train_end = p.query("SELECT max(train_end), count(*) FROM batchml.models WHERE run_id = ?", [run_id])[0]
        assert train_end[1] == 0 or train_end[0] < as_of - LABEL_DELAY, (run, train_end)
        landed = p.query("SELECT min(f.ingested_at), max(f.ingested_at), count(*) FROM scores.vuln_risk s "
                         "JOIN raw.vuln_findings f USING (finding_id) WHERE s.run_id = ?", [run_id])[0]
        if run["status"] == "crashed":
            assert landed[2] == 0
        else:
            assert landed[2] == run["rows_scored"] > 0 and landed[1] < as_of
            assert run["watermark_from"] is None or landed[0] >= run["watermark_from"]


# -- 6. drift only ----------------------------------------------------------------------------------


def test_drift_only_writes_the_drift_rows_of_a_drift_run_and_nothing_else(champion_copy):
    p = champion_copy(day(59))  # after the nightly run at day 59
    untouched = ("SELECT count(*) FROM scores.vuln_risk", "SELECT * FROM batchml.watermarks", "SELECT * FROM batchml.models",
                 "SELECT count(*) FROM batchml.model_events", "SELECT count(*) FROM batchml.quarantine",
                 "SELECT count(*) FROM batchml.performance", "SELECT count(*) FROM batchml.drift")
    before = [p.query(sql) for sql in untouched]

    result = p.cli("drift", "vuln_risk", "--as-of", "2026-03-08", check=True)

    assert "dataset drift:" in result.stdout
    nightly, measured = runs(p)
    assert nightly["kind"] == "nightly"
    assert (measured["kind"], measured["status"], measured["as_of"], measured["rows_scored"]) == ("drift", "succeeded", day(66), 0)
    features = p.query("SELECT feature, n_current FROM batchml.drift WHERE run_id = ? AND kind = 'feature'", [measured["run_id"]])
    assert len(features) == 11 and max(n for _, n in features) == valid_landed(p, day(59), day(66))
    after = [p.query(sql.replace("batchml.drift", f"batchml.drift WHERE run_id <> '{measured['run_id']}'")) for sql in untouched]
    assert after == before
    assert not list((p.root / "warehouse" / "reports").rglob(f"{measured['run_id']}*"))  # no report written for it


def test_a_new_job_s_views_reach_the_catalog_while_an_analyst_holds_it_open(champion_copy, children):
    from test_analysts import cli_query

    p = champion_copy(day(59))  # after the nightly run at day 59
    catalog = p.warehouse.parent / "catalog.duckdb"
    analyst, stop = reader(p, children, catalog, "scores.vuln_risk")
    p.write_config(job_config(job="vuln_second", scoring={"table": "scores.vuln_second"}), job="vuln_second")

    night = p.cli("run", "vuln_second", "--as-of", AS_OF, "--no-notify", timeout=180)

    assert night.returncode == 0, night.stderr
    assert "in use" not in night.stderr
    second = int(cli_query(catalog, "SELECT count(*) FROM scores.vuln_second_latest").split()[-1])  # the duckdb CLI reads the new file
    assert second == p.scalar("SELECT count(*) FROM scores.vuln_second_latest") > 0
    assert int(cli_query(catalog, "SELECT count(*) FROM scores.vuln_risk").split()[-1]) == p.scalar(
        "SELECT count(*) FROM scores.vuln_risk")  # the first job's views were kept
    stop.touch()
    assert analyst.proc.wait(timeout=30) == 0
    assert len(counts(analyst)) >= 1  # the open session went on reading, without errors
