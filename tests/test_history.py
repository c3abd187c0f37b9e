"""The job's history page, built from a replayed project and read back with an HTML parser.

Every chart must be present and non-empty, the numbers in its tables must equal the warehouse's
(queried here, not copied from the page), values from data must be escaped, and the run reports
and the history page must link each other.
"""

from __future__ import annotations

import base64
import email
import json
import re
from datetime import datetime, timedelta
from email.policy import default as default_policy
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import pytest
from test_notify import smtp_server  # noqa: F401 - the real SMTP server fixture
from test_run_report import smtp_env

from batchml import api
from batchml.errors import BatchMLError
from batchml.reports.history import TOP_FEATURES, HistoryData, build_history
from batchml.reports.deliver import week_start
from conftest import DemoProject, day, job_config, load_source

PNG = b"\x89PNG\r\n\x1a\n"
SCRIPT = "<script>alert(1)</script>"
CHARTS = {"rows", "drift", "performance", "scores", "bands", "durations"}
FIRST, LAST = 96, 103  # replayed days: after the scanner upgrade on day 90, so features drift


class Page(HTMLParser):
    """The parts of a page the tests read: tables (rows of cell texts), images, links, headings."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[str]]] = []
        self.images: list[dict] = []
        self.links: list[str] = []
        self.headings: list[str] = []
        self.tags: set[str] = set()
        self._cell: list[str] | None = None
        self._heading: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "a":
            self.links.append(attrs.get("href", ""))
        elif tag == "h2":
            self._heading = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "h2" and self._heading is not None:
            self.headings.append("".join(self._heading))
            self._heading = None

    def handle_data(self, data):
        for part in (self._cell, self._heading):
            if part is not None:
                part.append(data)

    def table(self, first_header: str) -> list[list[str]]:
        """The rows (header left out) of the table whose first column is headed ``first_header``."""
        for table in self.tables:
            if table and table[0] and table[0][0] == first_header:
                return table[1:]
        raise AssertionError(f"no table headed {first_header!r}; tables start with {[t[0][0] for t in self.tables if t and t[0]]}")


def number(text: str) -> float:
    return float(text.replace(",", "").rstrip("%"))


@pytest.fixture(scope="module")
def replayed(tmp_path_factory, findings) -> DemoProject:
    """Eight replayed nights after the upgrade, then a nightly run that fails on a missing column
    (in-process through ``batchml.api``, what `batchml backfill --replay` and `batchml run` call)."""
    project = DemoProject(tmp_path_factory.mktemp("history") / "project", findings)
    project.write_config(job_config())
    load_source(project.warehouse, findings)
    api.replay("vuln_risk", day(FIRST).date(), day(LAST).date(), project=project.root)
    broken = job_config(features={"numeric": ["cvss_base", "gone_column"], "categorical": []}, validation={"ranges": {}})
    project.write_config(broken)
    with pytest.raises(BatchMLError) as failed:
        api.run("vuln_risk", project=project.root, as_of=day(LAST + 1) + timedelta(hours=6))
    assert failed.value.exit_code == 1  # a failed run, recorded as such
    project.write_config(job_config())
    return project


@pytest.fixture(scope="module")
def history(replayed) -> tuple[Path, Page]:
    result = replayed.cli("report", "vuln_risk", "--history", check=True)
    path = Path(result.stdout.strip().removeprefix("history: "))
    assert path == replayed.root / "warehouse" / "reports" / "vuln_risk" / "history.html"
    return path, Page(path.read_text(encoding="utf-8"))


def test_every_chart_is_inline_and_not_empty(history) -> None:
    _, page = history
    assert len(page.images) == len(CHARTS)
    for image in page.images:
        assert image["src"].startswith("data:image/png;base64,"), image["src"][:40]
        png = base64.b64decode(image["src"].removeprefix("data:image/png;base64,"))
        assert png.startswith(PNG) and len(png) > 3_000 and image["alt"]
    # self-contained: no script, no stylesheet or frame to fetch, links only to reports beside the page
    assert not page.tags & {"script", "link", "iframe", "object"}
    assert all(re.fullmatch(r"[A-Za-z0-9._:+-]+\.html", href) for href in page.links), page.links


def test_sections_are_all_there(history) -> None:
    _, page = history
    assert page.headings == ["Summary", "Rows per night", "Drift", "Champion's performance", "Gate decisions", "Scores",
                             "Run time by step", "Failed and rejected runs"]


NIGHTS = "kind IN ('nightly', 'replay') AND status = 'succeeded'"


def test_weekly_rows_equal_the_warehouse(history, replayed) -> None:
    _, page = history
    expected = replayed.query(
        f"SELECT strftime(date_trunc('week', as_of), '%Y-%m-%d'), count(*), sum(rows_extracted), sum(rows_quarantined), "
        f"sum(rows_scored), count(*) FILTER (WHERE dataset_drift), count(*) FILTER (WHERE promoted) "
        f"FROM batchml.runs WHERE {NIGHTS} GROUP BY 1 ORDER BY 1 DESC")
    shown = [(row[0], *(int(number(v)) for v in row[1:7])) for row in page.table("week of")]
    assert shown == [tuple(r) for r in expected]
    failed = replayed.query("SELECT strftime(date_trunc('week', as_of), '%Y-%m-%d') FROM batchml.runs WHERE status = 'failed'")
    assert [(row[0], int(row[8])) for row in page.table("week of") if int(row[8])] == [(failed[0][0], 1)]


def test_summary_totals_equal_the_warehouse(history, replayed) -> None:
    _, page = history
    summary = {row[0]: row[1] for row in page.tables[0]}
    extracted, quarantined, scored, drift = replayed.query(
        f"SELECT sum(rows_extracted), sum(rows_quarantined), sum(rows_scored), count(*) FILTER (WHERE dataset_drift) "
        f"FROM batchml.runs WHERE {NIGHTS}")[0]
    assert number(summary["Rows extracted"]) == extracted and number(summary["Rows quarantined"]) == quarantined
    assert number(summary["Rows scored"]) == scored and number(summary["Nights with dataset drift"]) == drift
    assert summary["Nights"].startswith(f"{LAST - FIRST + 1} succeeded")


def test_drift_table_equals_the_warehouse(history, replayed) -> None:
    _, page = history
    expected = dict(replayed.query(
        f"SELECT feature, count(*) FILTER (WHERE drifted) FROM batchml.drift WHERE kind = 'feature' "
        f"AND run_id IN (SELECT run_id FROM batchml.runs WHERE {NIGHTS}) GROUP BY 1"))
    rows = page.table("feature")
    assert {row[0]: int(row[2]) for row in rows} == expected
    drifted = [int(row[2]) for row in rows]
    assert drifted == sorted(drifted, reverse=True) and drifted[0] > 0  # most drifted first, and the upgrade shows


def test_gate_decisions_equal_the_warehouse(history, replayed) -> None:
    _, page = history
    events = replayed.query("SELECT version, previous_champion, event, metrics FROM batchml.model_events "
                            "WHERE metrics LIKE '%\"outcome\"%' ORDER BY recorded_at DESC")
    rows = page.table("night")
    assert events and len(rows) == len(events)
    for row, (version, previous, event, metrics) in zip(rows, events):
        gate = json.loads(metrics)
        assert row[1:4] == [f"v{version}", f"v{previous}", event.replace("_", " ")]
        assert number(row[4]) == pytest.approx(gate["bootstrap"]["diff"], rel=1e-3)
        low, high = (number(v) for v in row[5].strip("[]").split(", "))
        assert (low, high) == (pytest.approx(gate["bootstrap"]["low"], rel=1e-3), pytest.approx(gate["bootstrap"]["high"], rel=1e-3))
        failing = [name for name, passed in gate["checks"].items() if not passed]
        assert row[6] == (", ".join(failing) or "—")


def test_failed_run_is_listed_with_its_error(history, replayed) -> None:
    _, page = history
    (error,) = replayed.query("SELECT error FROM batchml.runs WHERE status = 'failed'")[0]
    rows = page.table("as of")
    assert len(rows) == 1 and rows[0][1:3] == ["nightly", "failed"]
    assert rows[0][3] == " ".join(error.split())[:160] and "gone_column" in rows[0][3]


def report_path(stdout: str) -> Path:
    """The report's path from `batchml report`'s output (a line naming the run comes first)."""
    return Path(next(line for line in stdout.splitlines() if line.startswith("report: ")).removeprefix("report: "))


def test_run_reports_and_the_history_page_link_each_other(history, replayed) -> None:
    path, page = history
    reports = {p.name for p in path.parent.glob("*.html")} - {"history.html"}
    # links lead to run reports beside the page, the failed run's among them
    failed = {f"{r[0]}.html" for r in replayed.query("SELECT run_id FROM batchml.runs WHERE status = 'failed'")}
    assert failed and set(page.links) <= reports and failed <= set(page.links)
    for report in reports:
        assert "history.html" in Page((path.parent / report).read_text(encoding="utf-8")).links


def test_since_keeps_the_later_nights(replayed, tmp_path) -> None:
    since = day(LAST - 2)
    replayed.cli("report", "vuln_risk", "--history", "--since", f"{since:%Y-%m-%d}", check=True)
    page = Page((replayed.root / "warehouse" / "reports" / "vuln_risk" / "history.html").read_text(encoding="utf-8"))
    (nights,) = replayed.query(f"SELECT count(*) FROM batchml.runs WHERE {NIGHTS} AND as_of >= ?", [since])[0]
    assert {row[0]: row[1] for row in page.tables[0]}["Nights"].startswith(f"{nights} succeeded") and 0 < nights < LAST - FIRST + 1


def test_a_team_template_folder_restyles_both_pages(replayed, tmp_path) -> None:
    folder = tmp_path / "our_templates"
    folder.mkdir()
    theme = (Path(__file__).parents[1] / "batchml" / "reports" / "templates" / "theme.html").read_text()
    folder.joinpath("theme.html").write_text(theme.replace('set logo = ""', 'set logo = "data:image/png;base64,AAAA"')
                                             .replace("#f2f4f7", "#123456"))
    env = {"BATCHML_REPORT_TEMPLATES": str(folder)}
    replayed.cli("report", "vuln_risk", "--history", check=True, env=env)
    run_report = report_path(replayed.cli("report", "vuln_risk", check=True, env=env).stdout)
    for path in (replayed.root / "warehouse" / "reports" / "vuln_risk" / "history.html", run_report):
        text = path.read_text(encoding="utf-8")
        assert "background:#123456" in text and 'src="data:image/png;base64,AAAA"' in text
    folder.joinpath("theme.html").write_text("{% set logo = %}")
    result = replayed.cli("report", "vuln_risk", "--history", env=env)
    assert result.returncode == 2 and "theme.html: line 1" in result.stderr and "Traceback" not in result.stderr


def test_history_usage_mistakes_are_one_line(replayed, demo_project) -> None:
    for args, message in [(("vuln_risk", "some-run", "--history"), "give it no RUN_ID"),
                          (("vuln_risk", "--since", "2026-01-01"), "add --history"),
                          (("vuln_risk", "--history", "--since", "yesterday"), "--since 'yesterday' is not a date")]:
        result = replayed.cli("report", *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    result = demo_project.cli("report", "vuln_risk", "--history")
    assert result.returncode == 2 and "no runs of job vuln_risk yet" in result.stderr
    assert not (demo_project.root / "warehouse" / "reports").exists()


# --------------------------------------------------------------------------- escaping, without a warehouse


def hostile_history() -> HistoryData:
    as_of = datetime(2026, 11, 2)
    runs = [{"run_id": f"r{i}", "kind": "nightly", "status": "succeeded", "as_of": as_of + timedelta(days=i),
             "started_at": as_of + timedelta(days=i, hours=2), "finished_at": None, "rows_extracted": 10, "rows_quarantined": 1,
             "rows_scored": 9, "champion_version": 1, "challenger_version": None, "promoted": False, "dataset_drift": i == 1,
             "error": None, "note": None, "timings": {"extract": 0.5, SCRIPT: 0.1}} for i in range(3)]
    runs.append({**runs[-1], "run_id": "bad", "status": "failed", "error": f"ValueError: {SCRIPT}\nsecond line"})
    features = [SCRIPT, *(f"f{i}" for i in range(TOP_FEATURES + 5))]
    drift = [{"run_id": r["run_id"], "feature": f, "method": "psi", "statistic": 0.5 if f == SCRIPT else 0.01, "p_value": None,
              "threshold": 0.2, "drifted": f == SCRIPT} for r in runs[:3] for f in features]
    events = [{"version": 2, "event": "rejected", "previous_champion": 1, "reason": SCRIPT, "run_id": "r1", "actor": SCRIPT,
               "recorded_at": as_of, "as_of": as_of, "metrics": {"outcome": "rejected", "reason": SCRIPT, "checks": {SCRIPT: False}}},
              {"version": 1, "event": "rollback", "previous_champion": 2, "reason": SCRIPT, "run_id": None, "actor": "ops",
               "recorded_at": as_of + timedelta(days=1), "as_of": None, "metrics": {}}]
    return HistoryData(job="vuln_risk", metric="roc_auc", runs=runs, drift=drift, events=events,
                       realised=[{"event_day": as_of.date(), "value": 0.8, "n": 10}], estimated=[],
                       scores=[{"run_id": r["run_id"], "n": 9, "p10": 0.1, "p25": 0.2, "p50": 0.3, "p75": 0.4, "p90": 0.5} for r in runs[:3]],
                       bands=[{"run_id": r["run_id"], "risk_band": SCRIPT, "n": 9} for r in runs[:3]], band_order=["high", "medium", "low"],
                       reports={"r1", "bad"}, generated_at=as_of)


def test_values_from_data_are_escaped_in_the_mail_and_the_file() -> None:
    page = build_history(hostile_history(), path="/srv/reports/<b>history.html")
    for html in (page.html_email, page.html_file()):
        assert SCRIPT not in html and "<script" not in html and "<b>history" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    parsed = Page(page.html_file())
    assert parsed.table("feature")[0][0] == SCRIPT  # the one drifting feature leads, shown as text
    assert parsed.table("feature")[-1][0] == "6 other features"  # beyond the top ones, one row
    assert parsed.table("as of")[0][3] == f"ValueError: {SCRIPT} second line"
    assert set(parsed.links) == {"r1.html", "bad.html"}  # only reports that exist beside the page
    assert not Page(page.html_email).links and "cid:" in page.html_email  # a mail has no relative links


def test_an_empty_history_renders_without_charts() -> None:
    data = HistoryData(job="vuln_risk", metric="roc_auc", runs=[{**hostile_history().runs[-1]}], generated_at=datetime(2026, 11, 2))
    page = build_history(data)
    assert page.images == {} and "no night succeeded yet" in page.subject
    assert "No drift measured yet." in page.html_file()


# --------------------------------------------------------------------------- the weekly mail


def test_week_start_is_monday_midnight_in_the_job_s_time_zone() -> None:
    assert week_start(datetime(2026, 11, 25, 12), "UTC") == datetime(2026, 11, 23)
    # Monday 00:30 in Tokyo is Sunday 15:30 UTC: that night already belongs to the new week there
    assert week_start(datetime(2026, 11, 22, 15, 30), "Asia/Tokyo") == datetime(2026, 11, 22, 15)
    assert week_start(datetime(2026, 11, 22, 15, 30), "UTC") == datetime(2026, 11, 16)


def test_weekly_mails_the_history_page_on_the_first_night_of_the_week(demo_project, smtp_server) -> None:  # noqa: F811
    controller, handler = smtp_server
    demo_project.write_config(job_config(notify={"email": ["secops@example.com"], "on": ["weekly"]}))
    env = smtp_env(controller.port)
    assert day(60).weekday() == 0  # a Monday
    for n in (60, 61):  # Monday: the week's first night mails the page; Tuesday: nothing
        demo_project.cli("run", "vuln_risk", "--as-of", f"{day(n):%Y-%m-%d}", check=True, env=env)
    assert [e.rcpt_tos for e in handler.envelopes] == [["secops@example.com"]]
    message = email.message_from_bytes(handler.envelopes[0].content, policy=default_policy)
    assert message["Subject"].startswith("[batchml] vuln_risk history: 1 night 2026-03-02 to 2026-03-02")
    assert {part["Content-ID"] for part in message.walk() if part.get_content_type() == "image/png"} >= {"<rows>", "<scores>"}
    assert demo_project.query("SELECT report, status FROM batchml.notifications") == [("history", "sent")]

    result = demo_project.cli("report", "vuln_risk", "--history", "--send", env=env)
    assert result.returncode == 0, result.stderr
    message = email.message_from_bytes(handler.envelopes[1].content, policy=default_policy)
    assert len(handler.envelopes) == 2 and message["Subject"].startswith("[batchml] vuln_risk history: 2 nights")
    result = demo_project.cli("report", "vuln_risk", "--history", "--send", env={"BATCHML_SMTP_HOST": ""})
    assert result.returncode == 2 and "history page written to" in result.stderr and "BATCHML_SMTP_HOST" in result.stderr


# -- the per-night score summaries (batchml.score_summaries) ---------------------------------------


def _history_scores(warehouse: Path, root: Path) -> tuple[dict, dict]:
    """(run id -> quantiles, run id -> {band: rows}) as the history page reads them."""
    from batchml.config import load_job
    from batchml.reports.deliver import load_history_data

    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        data = load_history_data(con, load_job(root, "vuln_risk"))
    finally:
        con.close()
    bands: dict = {}
    for row in data.bands:
        bands.setdefault(row["run_id"], {})[row["risk_band"]] = row["n"]
    return {s["run_id"]: [s[q] for q in ("p10", "p25", "p50", "p75", "p90")] for s in data.scores}, bands


def _scores_table_figures(replayed) -> tuple[dict, dict]:
    """The same figures computed by DuckDB from the scores table itself."""
    quantiles = dict(replayed.query(
        "SELECT run_id, quantile_cont(score, [0.1, 0.25, 0.5, 0.75, 0.9]) FROM scores.vuln_risk "
        f"WHERE run_id IN (SELECT run_id FROM batchml.runs WHERE {NIGHTS}) GROUP BY 1"))
    bands: dict = {}
    for run_id, band, n in replayed.query(f"SELECT run_id, risk_band, count(*) FROM scores.vuln_risk "
                                          f"WHERE run_id IN (SELECT run_id FROM batchml.runs WHERE {NIGHTS}) GROUP BY ALL"):
        bands.setdefault(run_id, {})[band] = n
    return quantiles, bands


def test_each_night_stores_a_score_summary_equal_to_its_scores(replayed) -> None:
    nights = {run_id for (run_id,) in replayed.query(f"SELECT run_id FROM batchml.runs WHERE {NIGHTS}")}
    stored = replayed.query("SELECT run_id, n FROM batchml.score_summaries WHERE job = 'vuln_risk'")
    assert {run_id for run_id, _ in stored} == nights and len(stored) == len(nights) == LAST - FIRST + 1
    assert dict(stored) == dict(replayed.query("SELECT run_id, count(*) FROM scores.vuln_risk GROUP BY 1"))
    quantiles, bands = _history_scores(replayed.warehouse, replayed.root)
    expected_quantiles, expected_bands = _scores_table_figures(replayed)
    assert set(quantiles) == nights
    assert all(quantiles[r] == pytest.approx(expected_quantiles[r], abs=1e-12) for r in nights)
    assert bands == expected_bands and len({b for counts in bands.values() for b in counts}) > 1


def test_nights_committed_before_the_summaries_are_summarised_from_the_scores(replayed, tmp_path) -> None:
    """An upgraded warehouse: the page summarises the nights without a summary from the scores table,
    and the next nightly commit stores their summaries once."""
    import shutil

    from batchml.storage import score_summaries

    copy = tmp_path / "warehouse.duckdb"
    shutil.copy(replayed.warehouse, copy)
    con = duckdb.connect(str(copy))
    stored_before = con.execute("SELECT * EXCLUDE (computed_at) FROM batchml.score_summaries ORDER BY run_id").fetchall()
    con.execute("DELETE FROM batchml.score_summaries")
    con.close()
    quantiles, bands = _history_scores(copy, replayed.root)
    expected_quantiles, expected_bands = _scores_table_figures(replayed)
    assert set(quantiles) == set(expected_quantiles) and bands == expected_bands
    assert all(quantiles[r] == pytest.approx(expected_quantiles[r], abs=1e-12) for r in quantiles)
    con = duckdb.connect(str(copy))
    try:
        assert score_summaries.fill_missing(con, "vuln_risk", "scores.vuln_risk") == LAST - FIRST + 1
        assert score_summaries.fill_missing(con, "vuln_risk", "scores.vuln_risk") == 0  # once
        refilled = con.execute("SELECT * EXCLUDE (computed_at) FROM batchml.score_summaries ORDER BY run_id").fetchall()
    finally:
        con.close()
    assert [row[:3] for row in refilled] == [row[:3] for row in stored_before]
    for old, new in zip(stored_before, refilled):
        assert new[3:8] == pytest.approx(old[3:8], abs=1e-12) and json.loads(new[8]) == json.loads(old[8])
