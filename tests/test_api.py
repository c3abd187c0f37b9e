"""The public Python API: what an orchestrator's task calls, with the cut-offs orchestrators pass."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

import batchml
from conftest import day


def test_the_public_surface_is_the_documented_one():
    assert set(batchml.__all__) >= {"run", "backfill", "replay", "drift", "list_models", "promote", "rollback", "report",
                                    "check", "open_project", "Project", "BatchMLError"}
    for name in batchml.__all__:
        assert getattr(batchml, name) is not None, name


@pytest.mark.parametrize("as_of", [
    day(60),                                                     # naive: UTC
    day(60).replace(tzinfo=timezone.utc),                        # what Airflow passes
    (day(60) + timedelta(hours=2)).replace(tzinfo=timezone(timedelta(hours=2))),  # 02:00+02:00 is 00:00 UTC
    day(60).date(),                                              # a date: 00:00 UTC
    "2026-03-02T00:00:00Z",
])
def test_a_run_takes_naive_aware_date_and_text_cut_offs_alike(demo_project, as_of):
    run = batchml.run("vuln_risk", project=demo_project.root, as_of=as_of, notify=False)
    assert run.status == "succeeded" and run.rows_scored > 0
    assert run.as_of == day(60)  # stored as naive UTC, whatever was passed
    assert demo_project.scalar("SELECT value FROM batchml.watermarks") == day(60)


def test_the_api_runs_the_registry_and_backfills_like_the_cli(champion_project):
    demo_project = champion_project  # after the nightly run at day 60 (batchml.run at day 60: the test above)
    p = demo_project.root
    batchml.run("vuln_risk", project=p, as_of=day(61), force_retrain=True, notify=False)
    versions = {m["version"]: m["status"] for m in batchml.list_models("vuln_risk", project=p)}
    assert versions[1] in ("champion", "archived") and 2 in versions
    champion = next(v for v, s in versions.items() if s == "champion")
    other = 2 if champion == 1 else 1
    assert batchml.promote("vuln_risk", other, reason="api test", project=p) == champion
    assert batchml.rollback("vuln_risk", reason="api test", project=p) == (champion, other)
    assert demo_project.query("SELECT actor IS NOT NULL, reason FROM batchml.model_events WHERE reason = 'api test'") == [(True, "api test")] * 2

    backfilled = batchml.backfill("vuln_risk", "2026-02-01", date(2026, 2, 3), project=p)
    assert backfilled.kind == "backfill" and backfilled.rows_scored == demo_project.scalar(
        "SELECT count(*) FROM scores.vuln_risk WHERE run_id = ?", [backfilled.run_id]) > 0
    assert batchml.drift("vuln_risk", project=p, as_of=day(62)).kind == "drift"
    assert batchml.report("vuln_risk", project=p).is_file()
    assert batchml.check("vuln_risk", project=p, echo=lambda line: None) == []


def test_errors_are_batchml_errors_with_the_command_s_exit_code(demo_project):
    with pytest.raises(batchml.ConfigError) as unknown:
        batchml.run("no_such_job", project=demo_project.root)
    assert unknown.value.exit_code == 2 and "no_such_job" in str(unknown.value)
    with pytest.raises(batchml.ConfigError, match="not a date"):
        batchml.run("vuln_risk", project=demo_project.root, as_of="yesterday")
    with pytest.raises(batchml.ConfigError) as future:
        batchml.run("vuln_risk", project=demo_project.root, as_of=datetime.now(timezone.utc) + timedelta(days=3))
    assert "future" in str(future.value)
