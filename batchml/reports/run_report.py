"""Run reports: a subject line, a plain-text summary and an HTML page with PNG charts.

The pipeline fills a :class:`ReportData` from the warehouse; :func:`build_report` turns it into a
:class:`Report`, which :mod:`batchml.reports.mail` mails (charts as inline ``cid:`` images) and
:func:`write_report` stores as one self-contained HTML file (charts as ``data:`` URIs).

    data = ReportData(job="vuln_risk", run_id="r1", kind="nightly", status="succeeded",
                      as_of=datetime(2026, 11, 28), started_at=datetime(2026, 11, 28, 2))
    report = build_report(data)
    write_report(report, Path("warehouse/reports/vuln_risk"))

The HTML comes from the Jinja2 template ``run.html`` (:mod:`batchml.reports.templating`), which
shares its layout with the history page and escapes every value from data. There is no JavaScript.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from batchml.reports.charts import distribution_chart, trend_chart
from batchml.errors import BatchMLError
from batchml.reports.html import _as_datetime, _diff, _float, _fmt, _one_line, _pairs, _percent, _seconds, _utc, _version
from batchml.reports import HISTORY_FILE
from batchml.reports.templating import Cell, Chart, Charts, render

__all__ = [
    "ReportData", "Report", "build_report", "write_report", "should_notify", "subject_line", "severity", "sorted_drift",
    "MAX_FEATURE_CHARTS", "HISTORY_FILE", "write_page",
]

MAX_FEATURE_CHARTS = 12
SCORE_FEATURE = "__score__"
P_VALUE_METHODS = {"ks", "chi2"}
PAGE_WIDTH = 780
STATUS_TONES = {"succeeded": "good", "failed": "bad", "rejected": "warn", "running": "info"}
GATE_TONES = {"promoted": "good", "rejected": "warn"}
_SAFE_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,199}$")


@dataclass
class ReportData:
    """What one run did, as the pipeline read it back from the warehouse."""

    job: str
    run_id: str
    kind: str  # nightly | backfill | replay | drift
    status: str  # succeeded | failed | rejected
    as_of: datetime
    started_at: datetime
    finished_at: datetime | None = None
    rows_extracted: int = 0
    rows_quarantined: int = 0
    rows_scored: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    champion_version: int | None = None
    challenger_version: int | None = None
    promoted: bool | None = None
    drift: list[dict] = field(default_factory=list)
    dataset_drift: bool | None = None
    gate: dict | None = None
    performance: list[dict] = field(default_factory=list)
    band_counts: dict[str, int] = field(default_factory=dict)
    triggers: list[str] = field(default_factory=list)
    # a rejected batch: some of its quarantined rows ({entity_id, rule, reason, record}), to see what was wrong
    quarantine_sample: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A failed run read back from the warehouse has NULLs everywhere; treat them as "nothing".
        for name in ("rows_extracted", "rows_quarantined", "rows_scored"):
            setattr(self, name, getattr(self, name) or 0)
        for name in ("quarantine_reasons", "timings", "band_counts"):
            setattr(self, name, dict(getattr(self, name) or {}))
        for name in ("drift", "performance", "triggers", "quarantine_sample"):
            setattr(self, name, list(getattr(self, name) or []))


@dataclass(frozen=True)
class Report:
    """A rendered report. ``html_email`` references charts as ``cid:<name>``, keys of ``images``;
    ``page`` is the same report with every chart embedded, for the file."""

    run_id: str
    subject: str
    text: str
    html_email: str
    images: dict[str, bytes] = field(repr=False)
    page: str = field(default="", repr=False)

    def html_file(self) -> str:
        """The page with every chart embedded as a ``data:`` URI, so it opens offline."""
        return self.page


# --------------------------------------------------------------------------- drift ordering


def severity(row: dict) -> float:
    """How far a drift row is past its threshold; above 1 means drifted.

    Distance methods (psi, wasserstein, jensen_shannon) compare ``statistic / threshold``. For
    p-value methods (ks, chi2) the threshold is a p-value limit, so the comparable ratio is
    ``threshold / p_value``; dividing a chi2 statistic by 0.01 would rank every chi2 row first.
    Rows that could not be computed rank last.
    """
    threshold = _float(row.get("threshold"))
    p_value = _float(row.get("p_value"))
    statistic = _float(row.get("statistic"))
    if row.get("method") in P_VALUE_METHODS and p_value is not None and threshold:
        return threshold / max(p_value, 1e-300)
    if statistic is not None and threshold:
        return statistic / threshold
    return -math.inf


def sorted_drift(rows: Iterable[dict]) -> list[dict]:
    """Drifted rows first, then by :func:`severity` descending, then by name."""
    return sorted(rows, key=lambda r: (not r.get("drifted"), -severity(r), str(r.get("feature"))))


def _feature_rows(data: ReportData) -> list[dict]:
    return [row for row in data.drift if row.get("kind", "feature") == "feature"]


def _score_row(data: ReportData) -> dict | None:
    return next((r for r in data.drift if r.get("feature") == SCORE_FEATURE and r.get("kind") == "prediction"), None)


def _name(row: dict) -> str:
    """A drift row's display name: the model's own output is shown as ``score``."""
    return "score (model output)" if row.get("feature") == SCORE_FEATURE else str(row.get("feature"))


def _drift_count(data: ReportData) -> tuple[int, int]:
    features = _feature_rows(data)
    return sum(1 for r in features if r.get("drifted")), len(features)


def _histogram(row: dict) -> dict | None:
    """The row's histogram if it has equally long labels/reference/current lists, else None."""
    hist = row.get("histogram")
    if not isinstance(hist, dict):
        return None
    labels, ref, cur = (hist.get(k) or [] for k in ("labels", "reference", "current"))
    return hist if labels and len(labels) == len(ref) == len(cur) else None


# --------------------------------------------------------------------------- subject and events


def subject_line(data: ReportData) -> str:
    """One line saying what happened, e.g. ``[batchml] vuln_risk 2026-11-28: drift in 3/12 features``."""
    kind = "" if data.kind == "nightly" else f" ({data.kind})"
    head = f"[batchml] {data.job} {_utc(data.as_of):%Y-%m-%d}{kind}"
    return _one_line(f"{head}: {_what_happened(data)}")


def _what_happened(data: ReportData) -> str:
    if data.status == "failed":
        error = _one_line(data.error or "")
        return "run FAILED" + (f" — {error[:80]}{'…' if len(error) > 80 else ''}" if error else "")
    if data.status == "rejected":
        return f"batch REJECTED ({_percent(data.rows_quarantined, data.rows_extracted)} quarantined)"
    drifted, total = _drift_count(data)
    notable = []
    if drifted:
        notable.append(f"drift in {drifted}/{total} features")
    elif data.dataset_drift:
        notable.append("dataset drift")
    if data.promoted:
        notable.append(f"challenger v{data.challenger_version} promoted")
    return ", ".join(notable or _quiet(data, total))


def _quiet(data: ReportData, features: int) -> list[str]:
    parts = [] if data.kind == "drift" else [f"{data.rows_scored:,} rows scored"]
    if features:
        parts.append("no drift")
    if data.challenger_version is not None and data.promoted is False:
        parts.append(f"challenger v{data.challenger_version} not promoted")
    return parts or [data.status]


_EVENT_TESTS = {
    "drift": lambda d: bool(d.dataset_drift),
    "promotion": lambda d: bool(d.promoted),
    "rejection": lambda d: d.status == "rejected",
    "failure": lambda d: d.status == "failed",
    "always": lambda d: True,
    "weekly": lambda d: False,  # mails the history page, not the run's report (batchml.reports.deliver.weekly_due)
}


def should_notify(data: ReportData, on: Sequence[str]) -> list[str]:
    """The configured events (``notify.on``) that this run fired, in configured order.

    >>> should_notify(data, ["drift", "failure"])   # a failed run
    ['failure']
    """
    unknown = [event for event in on if event not in _EVENT_TESTS]
    if unknown:
        raise ValueError(f"unknown notify event(s) {unknown}; choose from {list(_EVENT_TESTS)}")
    return [event for event in dict.fromkeys(on) if _EVENT_TESTS[event](data)]


# --------------------------------------------------------------------------- sections
# Each returns what its part of templates/run.html shows, or nothing when the run has nothing for it.


def _summary_rows(data: ReportData) -> list[tuple]:
    finished = data.finished_at
    duration = _seconds((finished - data.started_at).total_seconds()) if finished else "—"
    quarantined = f"{_fmt(data.rows_quarantined)} ({_percent(data.rows_quarantined, data.rows_extracted)})"
    return [
        ("Run", f"{data.run_id} ({data.kind})"),
        ("Status", Cell(data.status, tone=STATUS_TONES.get(data.status, "neutral"), badge=True)),
        ("Cut-off (as of)", data.as_of),
        ("Started / finished", f"{_fmt(data.started_at)} / {_fmt(finished)} ({duration})"),
        ("Rows extracted", data.rows_extracted),
        ("Rows quarantined", quarantined),
        ("Rows scored", data.rows_scored),
        ("Champion / challenger", f"{_version(data.champion_version)} / {_version(data.challenger_version)}"),
    ]


def _count_rows(counts: dict[str, int]) -> list[tuple]:
    """A name -> count table with shares; used for quarantine reasons and risk bands."""
    whole = sum(v or 0 for v in counts.values())
    return [(name, count, _percent(count or 0, whole)) for name, count in counts.items()]


def _timing_rows(data: ReportData) -> list[tuple]:
    if not data.timings:
        return []
    total = sum(_float(v) or 0.0 for v in data.timings.values())
    return [*((step, _seconds(seconds)) for step, seconds in data.timings.items()), (Cell("total", bold=True), _seconds(total))]


def _drift_line(r: dict) -> tuple:
    drifted = Cell("drifted", tone="bad") if r.get("drifted") else "ok"
    error = Cell(r["error"], tone="bad") if r.get("error") else ""
    return (_name(r), r.get("kind"), r.get("method"), _float(r.get("statistic")), _float(r.get("p_value")),
            _float(r.get("threshold")), drifted, r.get("n_reference"), r.get("n_current"), error)


def _largest_shifts(hist: dict, top: int = 3) -> str:
    """The levels whose share moved most, e.g. ``npm 12.0% → 30.5%`` (says in words what the chart shows)."""
    ref = [_float(v) or 0.0 for v in hist["reference"]]
    cur = [_float(v) or 0.0 for v in hist["current"]]
    order = sorted(range(len(ref)), key=lambda i: -abs(cur[i] - ref[i]))[:top]
    return "; ".join(f"{hist['labels'][i]} {100 * ref[i]:.1f}% → {100 * cur[i]:.1f}%" for i in order)


def _distribution(charts: Charts, name: str, title: str, hist: dict) -> tuple[Chart, str]:
    png = distribution_chart(title, hist["labels"], hist["reference"], hist["current"])
    shifts = _largest_shifts(hist)
    return charts.add(name, png, f"{title}: {shifts}"), shifts


def _drift_charts(data: ReportData, charts: Charts) -> tuple[list[tuple[Chart, str]], int]:
    """The score's chart, then one per drifted feature (the most severe first, at most MAX_FEATURE_CHARTS)."""
    drawn = []
    row = _score_row(data)
    hist = _histogram(row) if row else None
    if hist is not None:
        title = f"Score distribution: reference vs current ({'drifted' if row.get('drifted') else 'no drift'})"
        drawn.append(_distribution(charts, "score", title, hist))
    drifted = [(r, _histogram(r)) for r in sorted_drift(_feature_rows(data)) if r.get("drifted")]
    drifted = [(r, hist) for r, hist in drifted if hist]
    for i, (r, hist) in enumerate(drifted[:MAX_FEATURE_CHARTS], start=1):
        drawn.append(_distribution(charts, f"drift-{i}", f"{_name(r)} ({r.get('method')}): reference vs current", hist))
    return drawn, len(drifted) - MAX_FEATURE_CHARTS


def _drift_section(data: ReportData, charts: Charts) -> dict | None:
    if not data.drift:
        return None
    drifted, total = _drift_count(data)
    verdicts = {True: Cell("dataset drift", tone="bad"), False: "no dataset drift"}
    drawn, omitted = _drift_charts(data, charts)
    headers = ("feature", "kind", "method", "statistic", "p-value", "threshold", "drift", "n ref", "n current", "error")
    return {"drifted": drifted, "total": total, "verdict": verdicts.get(data.dataset_drift, "dataset drift not assessed"),
            "headers": headers, "rows": [_drift_line(r) for r in sorted_drift(data.drift)], "charts": drawn,
            "omitted": omitted, "max_charts": MAX_FEATURE_CHARTS}


def _gate_section(data: ReportData) -> dict | None:
    gate = data.gate
    if not gate:
        return None
    champion, challenger = gate.get("metrics_champion") or {}, gate.get("metrics_challenger") or {}
    rows = [(m, _float(champion.get(m)), _float(challenger.get(m)), _diff(champion.get(m), challenger.get(m)))
            for m in dict.fromkeys([*champion, *challenger])]
    headers = ("metric", f"champion {_version(data.champion_version)}",
               f"challenger {_version(data.challenger_version)}", "difference")
    outcome = str(gate.get("outcome") or "no_decision")
    decision = Cell(outcome.replace("_", " "), tone=GATE_TONES.get(outcome, "neutral"), badge=True)
    return {"decision": decision, "reason": gate.get("reason") or "", "headers": headers, "rows": rows, "notes": _gate_notes(gate)}


def _gate_notes(gate: dict) -> list[str]:
    notes = []
    boot = gate.get("bootstrap")
    if boot:
        notes.append(f"Paired bootstrap of the difference: {_fmt(_float(boot.get('diff')))}, "
                     f"interval [{_fmt(_float(boot.get('low')))}, {_fmt(_float(boot.get('high')))}] "
                     f"over {_fmt(boot.get('resamples'))} resamples.")
    if _float(gate.get("latency_ratio")) is not None:
        notes.append(f"Scoring time, challenger / champion: {_float(gate['latency_ratio']):.2f}×.")
    return notes


def _performance_series(data: ReportData) -> dict[str, list[tuple[datetime, float]]]:
    series: dict[str, list[tuple[datetime, float]]] = {}
    for point in data.performance:
        when, value = _as_datetime(point.get("as_of")), _float(point.get("value"))
        if when is not None and value is not None:
            series.setdefault(str(point.get("metric") or "metric"), []).append((when, value))
    return series


def _performance_section(data: ReportData, charts: Charts) -> dict | None:
    series = _performance_series(data)
    if not series:
        return None
    chart = None
    if max(len(points) for points in series.values()) >= 2:
        png = trend_chart("Realised performance on labels that arrived", series)
        chart = charts.add("performance", png, "realised performance trend")
    latest = [p for p in data.performance if _float(p.get("value")) is not None]
    latest.sort(key=lambda p: _as_datetime(p.get("as_of")) or datetime.min, reverse=True)
    rows = [(_as_datetime(p.get("as_of")) or p.get("as_of"), p.get("metric"), _float(p.get("value")), p.get("n"), p.get("run_id"))
            for p in latest[:10]]
    return {"chart": chart, "rows": rows}


def _page_context(data: ReportData, subject: str, charts: Charts) -> dict:
    """What templates/run.html shows; the charts are drawn here, once for the mail and the file."""
    return {
        "title": subject, "width": PAGE_WIDTH, "job": data.job, "kind": data.kind,
        "headline": subject.removeprefix("[batchml] "),
        "summary": _summary_rows(data), "error": data.error or None,
        "quarantine": _count_rows(data.quarantine_reasons), "quarantine_sample": _quarantine_sample(data),
        "drift": _drift_section(data, charts),
        "gate": _gate_section(data), "performance": _performance_section(data, charts),
        "bands": _count_rows(data.band_counts), "triggers": data.triggers, "timings": _timing_rows(data),
    }


RECORD_CHARS = 300  # of a quarantined row's JSON in the report: enough to see the bad value


def _quarantine_sample(data: ReportData) -> dict | None:
    """A rejected batch's sample of quarantined rows: entity, rule, reason and the row, clipped."""
    if not data.quarantine_sample:
        return None
    rows = [(r["entity_id"], r["rule"], r["reason"], _clipped(r["record"])) for r in data.quarantine_sample]
    return {"title": f"Sample of quarantined rows ({len(rows)} of {data.rows_quarantined:,})", "rows": rows}


def _clipped(text: str | None) -> str:
    text = text or ""
    return text if len(text) <= RECORD_CHARS else text[:RECORD_CHARS] + "…"


# --------------------------------------------------------------------------- plain text


def _text(data: ReportData, subject: str) -> str:
    """The plain-text part: the same facts as the HTML, without tables or charts."""
    lines = [subject, "", f"Run {data.run_id} ({data.kind}), status {data.status}, cut-off {_fmt(data.as_of)}",
             f"Rows: {data.rows_extracted:,} extracted, {data.rows_quarantined:,} quarantined, {data.rows_scored:,} scored"]
    if data.quarantine_reasons:
        lines.append("Quarantined by reason: " + _pairs(data.quarantine_reasons))
    if data.quarantine_sample:
        lines.append(f"Sample of quarantined rows ({len(data.quarantine_sample)} of {data.rows_quarantined:,}):")
        lines += [f"  {r['entity_id']}: {r['reason']} ({r['rule']}) {_clipped(r['record'])}" for r in data.quarantine_sample]
    if data.error:
        lines += ["", "Error:", data.error.strip(), ""]
    lines += _drift_text(data) + _gate_text(data)
    if data.band_counts:
        lines.append("Risk bands: " + _pairs(data.band_counts))
    if data.triggers:
        lines.append("Retrain triggers: " + ", ".join(map(str, data.triggers)))
    if data.timings:
        lines.append("Timings: " + ", ".join(f"{k} {_seconds(v)}" for k, v in data.timings.items()))
    lines += ["", "The HTML version of this report has the tables and charts."]
    return "\n".join(lines) + "\n"


def _drift_text(data: ReportData) -> list[str]:
    if not data.drift:
        return []
    drifted, total = _drift_count(data)
    lines = [f"Drift: {drifted}/{total} features drifted" + (", dataset drift" if data.dataset_drift else "")]
    for row in sorted_drift(data.drift):
        if row.get("drifted"):
            statistic, threshold = _fmt(_float(row.get("statistic"))), _fmt(_float(row.get("threshold")))
            lines.append(f"  - {_name(row)} ({row.get('method')}): {statistic}, threshold {threshold}")
    return lines


def _gate_text(data: ReportData) -> list[str]:
    if not data.gate:
        return []
    outcome = str(data.gate.get("outcome") or "no_decision").replace("_", " ")
    return [f"Model gate: challenger {_version(data.challenger_version)} vs champion {_version(data.champion_version)}: "
            f"{outcome} — {data.gate.get('reason') or ''}".rstrip(" —")]


# --------------------------------------------------------------------------- public API


def build_report(data: ReportData, *, templates: Path | None = None, history_link: str | None = HISTORY_FILE,
                 history_path: str | None = None) -> Report:
    """Render a run's report: subject, plain text, email HTML and its PNG charts, and the file page.

    ``templates`` is a team's template folder (``BATCHML_REPORT_TEMPLATES``). The file links to the
    job's history page beside it (``history_link``, None: no link); the mail names it by
    ``history_path`` instead, since a relative link in a mail leads nowhere.
    """
    subject = subject_line(data)
    charts = Charts()
    context = _page_context(data, subject, charts)
    email = render("run.html", templates, **context, inline=False, history_href=None, history_path=history_path)
    page = render("run.html", templates, **context, inline=True, history_href=history_link, history_path=None)
    return Report(run_id=data.run_id, subject=subject, text=_text(data, subject), html_email=email,
                  images=charts.images, page=page)


def write_report(report: Report, directory: Path | str) -> Path:
    """Write ``<directory>/<run_id>.html`` atomically: a reader sees the old file or the whole new one."""
    if not _SAFE_RUN_ID.fullmatch(report.run_id):
        raise ValueError(f"run id {report.run_id!r} cannot be used as a file name")
    return write_page(report.html_file(), Path(directory) / f"{report.run_id}.html")


def write_page(text: str, target: Path) -> Path:
    """Write a report page atomically, creating its folder; a failure is one line naming the file."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(target, text)
    except OSError as exc:
        reason = exc.strerror or exc
        raise BatchMLError(f"cannot write report {target} ({reason}); check the directory's permissions and free space") from exc
    return target


def current_umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it, which
    races with other threads creating files); falls back to setting it back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(target: Path, text: str) -> None:
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(temp, 0o666 & ~current_umask())  # mkstemp makes 0600: give it what any new file gets
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
