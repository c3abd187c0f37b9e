"""Run reports: subject lines, escaping, charts, the self-contained HTML file and its atomic write."""

from __future__ import annotations

import base64
import io
import math
import os
import re
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from matplotlib import image as mpimg

from batchml.reports import run_report as report_module
from batchml.reports.charts import MAX_BARS, OTHER_LABEL, cap_bars, distribution_chart, trend_chart
from batchml.errors import BatchMLError
from batchml.reports.run_report import (
    Report, ReportData, build_report, should_notify, sorted_drift, subject_line, write_report,
)

SCRIPT = "<script>alert(1)</script>"
AS_OF = datetime(2026, 11, 28, tzinfo=timezone.utc)
CATEGORIES = ["npm", "pypi", "maven", "go", "cargo", SCRIPT]
BINS = [f"[{i / 10:.1f}, {(i + 1) / 10:.1f})" for i in range(10)]


def decoded(png: bytes) -> np.ndarray:
    """The picture a PNG holds (rows x columns x RGBA), checked to be a chart and not a blank image."""
    pixels = mpimg.imread(io.BytesIO(png), format="png")
    assert pixels.ndim == 3 and pixels.shape[0] >= 100 and pixels.shape[1] >= 200, pixels.shape
    colours = np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)
    assert len(colours) > 20, "a blank or nearly blank image"  # axes, text and bars anti-aliased: hundreds
    return pixels


def _shares(n: int, tilt: float) -> list[float]:
    raw = [1 + tilt * i for i in range(n)]
    return [v / sum(raw) for v in raw]


def drift_row(feature: str, drifted: bool, statistic: float, *, method: str = "psi", kind: str = "feature",
              labels: list[str] | None = None, p_value: float | None = None, threshold: float = 0.2) -> dict:
    """One row as the pipeline reads it from batchml.drift, with a histogram."""
    labels = labels or BINS
    return {
        "feature": feature, "method": method, "kind": kind, "statistic": statistic, "p_value": p_value,
        "threshold": threshold, "drifted": drifted, "n_reference": 50_000, "n_current": 1_234, "error": None,
        "histogram": {"labels": labels, "reference": _shares(len(labels), 0.0),
                      "current": _shares(len(labels), 0.5 if drifted else 0.02)},
    }


def drift_run(**changes) -> ReportData:
    """A typical nightly run: 5 of 12 features drifted, score drift, challenger v4 promoted."""
    features = [drift_row(f"num_{i}", i < 4, 0.25 + 0.05 * i if i < 4 else 0.01 * i) for i in range(10)]
    features.append(drift_row("ecosystem", True, 900.0, method="chi2", labels=CATEGORIES, p_value=1e-9, threshold=0.01))
    features.append(drift_row("severity", False, 2.0, method="chi2", labels=["low", "high"], p_value=0.4, threshold=0.01))
    score = drift_row("__score__", True, 0.31, kind="prediction")
    data = ReportData(
        job="vuln_risk", run_id="20261128T020000-vuln_risk", kind="nightly", status="succeeded", as_of=AS_OF,
        started_at=AS_OF + timedelta(hours=2), finished_at=AS_OF + timedelta(hours=2, seconds=41),
        rows_extracted=1_300, rows_quarantined=66, rows_scored=1_234,
        quarantine_reasons={"out_of_range:cvss_base": 60, "null_entity_id": 6},
        timings={"extract": 0.8, "validate": 0.3, "drift": 1.2, "train": 25.0, "evaluate": 9.1, "score": 2.4},
        champion_version=3, challenger_version=4, promoted=True,
        drift=[*features, score], dataset_drift=True,
        gate={"outcome": "promoted", "reason": "roc_auc +0.012, interval above 0",
              "metrics_champion": {"roc_auc": 0.81, "log_loss": 0.41, "brier": 0.12},
              "metrics_challenger": {"roc_auc": 0.822, "log_loss": 0.40, "brier": 0.118},
              "bootstrap": {"diff": 0.012, "low": 0.004, "high": 0.02, "resamples": 1000}, "latency_ratio": 1.1},
        performance=[{"run_id": f"r{d}", "as_of": AS_OF - timedelta(days=d), "metric": "roc_auc", "value": 0.8 - d / 500, "n": 400}
                     for d in range(1, 8)],
        band_counts={"high": 80, "medium": 300, "low": 854},
        triggers=["drift", "age: champion is 9 days old"],
    )
    return replace(data, **changes)


@pytest.fixture(scope="module")
def typical() -> Report:
    return build_report(drift_run())


def failed_run(**changes) -> ReportData:
    base = ReportData(job="vuln_risk", run_id="r-failed", kind="nightly", status="failed", as_of=AS_OF, started_at=AS_OF)
    return replace(base, **changes)


# --------------------------------------------------------------------------- subjects and events


def test_subject_drift_and_promotion(typical: Report) -> None:
    assert typical.subject == "[batchml] vuln_risk 2026-11-28: drift in 5/12 features, challenger v4 promoted"


def test_subject_failure_carries_first_80_characters_of_the_error() -> None:
    error = "WarehouseError: cannot open warehouse/warehouse.duckdb\n  (another process holds the lock; " + "x" * 100
    subject = subject_line(failed_run(error=error))
    flat = " ".join(error.split())
    assert subject.startswith(f"[batchml] vuln_risk 2026-11-28: run FAILED — {flat[:80]}")
    assert "\n" not in subject and flat[:81] not in subject


def test_subject_rejection_states_the_quarantined_share() -> None:
    data = failed_run(status="rejected", rows_extracted=1_000, rows_quarantined=72)
    assert subject_line(data) == "[batchml] vuln_risk 2026-11-28: batch REJECTED (7.2% quarantined)"


def test_subject_quiet_night() -> None:
    quiet = [drift_row(f"num_{i}", False, 0.01) for i in range(3)]
    data = drift_run(drift=quiet, dataset_drift=False, promoted=None, challenger_version=None, gate=None)
    assert subject_line(data) == "[batchml] vuln_risk 2026-11-28: 1,234 rows scored, no drift"


def test_subject_names_non_nightly_kind_and_a_kept_out_challenger() -> None:
    data = drift_run(kind="backfill", drift=[], dataset_drift=None, promoted=False)
    expected = "[batchml] vuln_risk 2026-11-28 (backfill): 1,234 rows scored, challenger v4 not promoted"
    assert subject_line(data) == expected


@pytest.mark.parametrize(
    ("changes", "on", "fired"),
    [
        ({}, ["drift", "promotion", "failure"], ["drift", "promotion"]),
        ({"dataset_drift": False, "promoted": False}, ["drift", "promotion"], []),
        ({"status": "rejected"}, ["rejection", "failure"], ["rejection"]),
        ({"status": "failed", "dataset_drift": None, "promoted": None}, ["drift", "failure", "always"], ["failure", "always"]),
    ],
)
def test_should_notify(changes: dict, on: list[str], fired: list[str]) -> None:
    assert should_notify(drift_run(**changes), on) == fired


def test_should_notify_refuses_unknown_events() -> None:
    with pytest.raises(ValueError, match="unknown notify event"):
        should_notify(drift_run(), ["drift", "sometimes"])


# --------------------------------------------------------------------------- content


def test_report_has_every_section(typical: Report) -> None:
    page = typical.html_email
    for heading in ("Run summary", "Quarantined rows by reason", "Drift", "Champion vs challenger", "Realised performance",
                    "Risk bands", "Retrain triggers", "Step timings"):
        assert heading in page
    assert "[0.004, 0.02]" in page and "1000 resamples" in page.replace(",", "")
    assert "out_of_range:cvss_base" in page and "age: champion is 9 days old" in page
    assert "<script" not in page and "javascript" not in page.lower()


def test_charts_one_per_drifted_feature_plus_score_and_trend(typical: Report) -> None:
    assert set(typical.images) == {"score", "performance", *(f"drift-{i}" for i in range(1, 6))}
    for png in typical.images.values():
        decoded(png)
    referenced = set(re.findall(r'src="cid:([^"]+)"', typical.html_email))
    assert referenced == set(typical.images)


def test_plain_text_summary(typical: Report) -> None:
    assert typical.text.startswith(typical.subject)
    for fact in ("1,300 extracted, 66 quarantined, 1,234 scored", "5/12 features drifted", "promoted", "high 80"):
        assert fact in typical.text
    assert "<" not in typical.text.replace(SCRIPT, "")  # no markup, only data


def test_drift_rows_sorted_by_severity() -> None:
    rows = [
        {"feature": "calm", "method": "psi", "statistic": 0.05, "threshold": 0.2, "drifted": False},
        {"feature": "broken", "method": "psi", "statistic": None, "threshold": 0.2, "drifted": False, "error": "empty"},
        {"feature": "mild", "method": "psi", "statistic": 0.3, "threshold": 0.2, "drifted": True},
        {"feature": "chi", "method": "chi2", "statistic": 5000.0, "p_value": 0.001, "threshold": 0.01, "drifted": True},
        {"feature": "strong", "method": "psi", "statistic": 0.9, "threshold": 0.2, "drifted": True},
    ]
    assert [r["feature"] for r in sorted_drift(rows)] == ["chi", "strong", "mild", "calm", "broken"]


def test_drift_table_in_page_lists_drifted_first(typical: Report) -> None:
    table = typical.html_email[typical.html_email.index("n current"):]
    positions = {name: table.index(f">{name}<") for name in ("ecosystem", "num_3", "num_0", "num_9")}
    assert positions["ecosystem"] < positions["num_3"] < positions["num_0"] < positions["num_9"]


def test_feature_charts_are_capped_and_the_rest_counted(monkeypatch) -> None:
    monkeypatch.setattr(report_module, "MAX_FEATURE_CHARTS", 2)  # same logic, fewer charts to draw
    rows = [drift_row(f"f{i}", True, 1.0 + i, labels=["a", "b"]) for i in range(5)]
    report = build_report(drift_run(drift=rows, performance=[]))
    assert sorted(report.images) == ["drift-1", "drift-2"]
    assert "f4 (psi)" in report.html_email and "f2 (psi)" not in report.html_email  # the most severe are drawn
    assert "3 more drifted feature(s) omitted (at most 2 are drawn)" in report.html_email


def test_performance_chart_needs_two_points() -> None:
    data = drift_run(drift=[], performance=drift_run().performance[:1])
    report = build_report(data)
    assert "performance" not in report.images and "Realised performance" in report.html_email


# --------------------------------------------------------------------------- escaping


def test_data_is_escaped_in_email_and_file() -> None:
    hostile = drift_row(SCRIPT, True, 0.9, labels=["ok", SCRIPT, "$5-$10", "a & b"])
    data = drift_run(drift=[hostile], error=f"ValueError: bad level {SCRIPT}", triggers=[SCRIPT],
                     quarantine_reasons={SCRIPT: 3}, gate={"outcome": "rejected", "reason": SCRIPT})
    report = build_report(data)
    for page in (report.html_email, report.html_file()):
        assert SCRIPT not in page and "<script" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "a &amp; b" in page


def test_mathtext_is_not_interpreted_in_chart_labels() -> None:
    # "$\\undefined$" would raise while drawing if matplotlib parsed it as a formula.
    png = distribution_chart(r"cost $\undefined$", [r"$\undefined$", "$5-$10"], [0.5, 0.5], [0.2, 0.8])
    plain = distribution_chart("cost undefined", ["undefined", "5-10"], [0.5, 0.5], [0.2, 0.8])
    # the dollars are drawn as characters: the same bars as without them, other labels
    assert decoded(png).shape == decoded(plain).shape and not np.array_equal(decoded(png), decoded(plain))


def test_many_levels_are_capped_with_the_rest_lumped() -> None:
    labels = [f"level{i}" for i in range(MAX_BARS + 10)]
    shares = _shares(len(labels), 0.1)
    names, ref, cur = cap_bars(labels, shares, shares)
    assert len(names) == MAX_BARS and names[-1] == OTHER_LABEL
    assert math.isclose(sum(ref), 1.0) and math.isclose(sum(cur), 1.0)
    assert names[:-1] == sorted(names[:-1], key=labels.index)  # bins keep their order


def test_trend_chart_handles_several_metrics() -> None:
    days = [AS_OF + timedelta(days=d) for d in range(3)]
    auc = list(zip(days, [0.8, 0.81, 0.79]))
    both = decoded(trend_chart("trend", {"roc_auc": auc, "brier": list(zip(days, [0.1, 0.1, 0.2]))}))
    one = decoded(trend_chart("trend", {"roc_auc": auc}))
    assert both.shape == one.shape and not np.array_equal(both, one)  # the second metric is drawn too


# --------------------------------------------------------------------------- sparse runs


def test_failed_run_with_almost_nothing_renders() -> None:
    report = build_report(failed_run(finished_at=None, error=None))
    assert report.images == {}
    assert "run FAILED" in report.subject and "Run summary" in report.html_email
    assert "data:image" not in report.html_file()


def test_nulls_from_the_warehouse_render_like_empty_values() -> None:
    data = failed_run(rows_extracted=None, quarantine_reasons=None, timings=None, drift=None, performance=None,
                      band_counts=None, triggers=None, gate={"outcome": None}, error="boom")
    report = build_report(data)
    assert "boom" in report.html_email and "boom" in report.text


def test_drift_rows_with_errors_and_without_histograms_render() -> None:
    rows = [
        {"feature": "epss", "method": "psi", "kind": "feature", "statistic": None, "p_value": None, "threshold": 0.2,
         "drifted": False, "n_reference": 0, "n_current": 10, "error": "no reference values", "histogram": None},
        {"feature": "cvss", "method": "ks", "kind": "feature", "statistic": 0.4, "p_value": float("nan"), "threshold": 0.01,
         "drifted": True, "n_reference": 10, "n_current": 10, "error": None, "histogram": {"labels": ["a"], "reference": [], "current": []}},
    ]
    report = build_report(drift_run(drift=rows, performance=[]))
    assert "no reference values" in report.html_email and report.images == {}


# --------------------------------------------------------------------------- the file


def test_self_contained_file_is_written_atomically(typical: Report, tmp_path) -> None:
    path = write_report(typical, tmp_path / "reports")
    assert path == tmp_path / "reports" / f"{typical.run_id}.html"
    assert os.listdir(path.parent) == [path.name]  # no temp file left behind
    page = path.read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and "cid:" not in page and "<script" not in page
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert sorted(base64.b64decode(u) for u in uris) == sorted(typical.images.values())  # the charts, each once
    write_report(typical, path.parent)  # overwriting an existing report is fine
    assert os.listdir(path.parent) == [path.name]


def test_failed_write_leaves_no_temp_file(typical: Report, tmp_path, monkeypatch) -> None:
    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_module.os, "replace", refuse)
    with pytest.raises(BatchMLError, match="No space left"):
        write_report(typical, tmp_path)
    assert os.listdir(tmp_path) == []


def test_run_id_must_be_a_plain_file_name(tmp_path) -> None:
    report = build_report(failed_run(run_id="../escape"))
    with pytest.raises(ValueError, match="file name"):
        write_report(report, tmp_path)


def test_typical_report_is_small(tmp_path) -> None:
    """Size is behaviour (a mail server refuses large mails); build time is measured in benchmarks/."""
    report = build_report(drift_run())
    size = write_report(report, tmp_path).stat().st_size
    assert len(report.images) == 7 and size < 500_000


@pytest.mark.parametrize("draw", [
    lambda: distribution_chart("severity", ["low", "medium", "high"], [0.5, 0.3, 0.2], [0.4, 0.4, 0.2]),
    lambda: distribution_chart("epss", [f"[{i / 1000:.5f}, {(i + 1) / 1000:.5f})" for i in range(12)], [1 / 12] * 12, [1 / 12] * 12),
    lambda: distribution_chart("vendor", [f"WWWW-Long-Vendor-Name-{i}" for i in range(40)], [1 / 40] * 40, [1 / 40] * 40),
    lambda: trend_chart("roc_auc", {"roc_auc": [(datetime(2026, 1, d), 0.81234 + d / 1000) for d in range(1, 11)]}),
    lambda: trend_chart("rmse", {"rmse": [(datetime(2026, 1, d), 1_234_567.0 * d) for d in range(1, 11)],
                                  "mae": [(datetime(2026, 1, d), 1_000.0 * d) for d in range(1, 11)]}),
], ids=["levels", "rotated bins", "long labels", "trend", "two big trends"])
def test_fixed_margins_clip_no_text(draw, monkeypatch) -> None:
    """Margins are fixed, not found by a layout engine: everything drawn (ticks, labels, title,
    legend) must still lie inside the image."""
    from batchml.reports import charts

    drawn = []
    real_png = charts._png

    def keep_figure(fig):  # the real encoder; the figure kept to measure its texts after the one drawing
        drawn.append(fig)
        return real_png(fig)

    monkeypatch.setattr(charts, "_png", keep_figure)
    png = draw()
    fig = drawn[0]
    renderer = fig.canvas.get_renderer()
    width, height = fig.canvas.get_width_height()
    for ax in fig.axes:  # the box of everything drawn for the axes: ticks in view, labels, title, legend
        box = ax.get_tightbbox(renderer)
        assert box.x0 >= -0.5 and box.y0 >= -0.5 and box.x1 <= width + 0.5 and box.y1 <= height + 0.5, box.bounds
    assert mpimg.imread(io.BytesIO(png)).shape[:2] == (height, width)
