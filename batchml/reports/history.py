"""A job's history on one page: every night's rows, drift, model decisions, scores and timings.

:mod:`batchml.reports.deliver` reads the job's rows from the warehouse into a :class:`HistoryData` (the
runs, their drift rows, performance, model events and per-night score summaries: never the source
data); :func:`build_history` draws the charts and renders ``templates/history.html``, which shares
its layout with the run report. The result is a :class:`~batchml.reports.run_report.Report`, so the same code
writes it to ``reports/<job>/history.html`` (charts as ``data:`` URIs) and mails it (as ``cid:``
parts).

    page = build_history(data)
    write_page(page.html_file(), Path("warehouse/reports/vuln_risk/history.html"))

Legibility over a long history: the drift heat map shows the ``TOP_FEATURES`` features that drifted
most and one summary row for the rest; every chart is one fixed-size image whatever the number of
nights, so a year of runs costs no more to mail than two weeks.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

from batchml.reports.charts import bands_chart, drift_heatmap, durations_chart, performance_chart, rows_chart, score_chart
from batchml.reports.run_report import HISTORY_FILE, STATUS_TONES, Report, severity
from batchml.reports.html import _float, _fmt, _one_line, _percent, _utc, _version
from batchml.reports.templating import Cell, Charts, render

__all__ = ["HistoryData", "build_history", "NIGHT_KINDS", "TOP_FEATURES", "STEPS"]

NIGHT_KINDS = ("nightly", "replay")  # runs of the nightly logic; backfills and drift checks are listed, not charted
TOP_FEATURES = 20
RECENT_WEEKS = 13
PAGE_WIDTH = 1000
STEPS = ("extract", "validate", "drift", "train", "evaluate", "score", "commit")
CHAMPION_CHANGES = {"promoted": "promotion", "manual_promote": "manual", "rollback": "rollback"}
GATE_TONES = {"promoted": "good", "rejected": "warn"}
MAX_ERROR = 160


@dataclass
class HistoryData:
    """A job's runs and what they recorded, as :mod:`batchml.reports.deliver` reads them back (oldest first)."""

    job: str
    metric: str  # the promotion metric: the one the performance chart follows
    since: datetime | None = None
    runs: list[dict] = field(default_factory=list)  # batchml.runs rows; ``timings`` parsed to a dict
    drift: list[dict] = field(default_factory=list)  # feature drift rows of the nights
    realised: list[dict] = field(default_factory=list)  # event_day, value, n: labels that arrived
    estimated: list[dict] = field(default_factory=list)  # event_day, value, n: before labels arrive
    events: list[dict] = field(default_factory=list)  # batchml.model_events with ``metrics`` parsed, and the run's as_of
    scores: list[dict] = field(default_factory=list)  # run_id, n, p10, p25, p50, p75, p90
    bands: list[dict] = field(default_factory=list)  # run_id, risk_band, n
    band_order: list[str] = field(default_factory=list)  # highest band first
    reports: set[str] = field(default_factory=set)  # run ids whose report file is beside the page
    generated_at: datetime | None = None

    @property
    def nights(self) -> list[dict]:
        """The succeeded runs of the nightly logic: one per night, what the charts plot."""
        return [r for r in self.runs if r["kind"] in NIGHT_KINDS and r["status"] == "succeeded"]


# --------------------------------------------------------------------------- sections


def _when(run: dict) -> datetime:
    return _utc(run["as_of"])


def _link(run_id: str | None, text: object, data: HistoryData, links: bool) -> object:
    """A link to a run's report beside the page (not in a mail, where a relative link leads nowhere)."""
    return Cell(text, href=f"{run_id}.html") if links and run_id in data.reports else text


def _summary_rows(data: HistoryData, links: bool) -> list[tuple]:
    nights, statuses = data.nights, Counter(r["status"] for r in data.runs)
    first, last = (f"{_when(nights[i]):%Y-%m-%d}" for i in (0, -1)) if nights else ("—", "—")
    champion = next((r["champion_version"] for r in reversed(data.runs) if r["champion_version"]), None)
    latest = data.runs[-1] if data.runs else None
    rows = [
        ("Nights", f"{len(nights):,} succeeded, {first} to {last}"),
        ("Runs", ", ".join(f"{n:,} {status}" for status, n in statuses.most_common()) or "—"),
        ("Rows extracted", sum(r["rows_extracted"] or 0 for r in nights)),
        ("Rows quarantined", sum(r["rows_quarantined"] or 0 for r in nights)),
        ("Rows scored", sum(r["rows_scored"] or 0 for r in nights)),
        ("Nights with dataset drift", sum(1 for r in nights if r["dataset_drift"])),
        ("Champion now", _version(champion)),
        ("Champion changes", sum(1 for e in data.events if e["event"] in CHAMPION_CHANGES)),
    ]
    if latest is not None:
        rows.append(("Latest run", _link(latest["run_id"], f"{latest['run_id']} ({latest['status']})", data, links)))
    return rows


def _week(moment: datetime) -> date:
    return moment.date() - timedelta(days=moment.weekday())


def _weekly_rows(data: HistoryData) -> list[tuple]:
    """Per week (Monday first): nights, rows, drift nights, promotions and failed runs of the nightly logic."""
    weeks: dict[date, Counter] = defaultdict(Counter)
    for run in data.runs:
        if run["kind"] not in NIGHT_KINDS:
            continue
        week = weeks[_week(_when(run))]
        if run["status"] == "succeeded":
            week.update(nights=1, extracted=run["rows_extracted"] or 0, quarantined=run["rows_quarantined"] or 0,
                        scored=run["rows_scored"] or 0, drift=int(bool(run["dataset_drift"])), promoted=int(bool(run["promoted"])))
        else:
            week.update(failed=int(run["status"] in ("failed", "crashed")), rejected=int(run["status"] == "rejected"))
    keys = ("nights", "extracted", "quarantined", "scored", "drift", "promoted", "rejected", "failed")
    starts = sorted(weeks, reverse=True)
    rows = [(f"{start:%Y-%m-%d}", *(weeks[start][k] for k in keys)) for start in starts[:RECENT_WEEKS]]
    older = sum((weeks[start] for start in starts[RECENT_WEEKS:]), Counter())
    if len(starts) > RECENT_WEEKS:  # a year stays one screen: the last quarter week by week, the rest in one row
        rows.append((Cell(f"{len(starts) - RECENT_WEEKS} weeks before", bold=True), *(older[k] for k in keys)))
    return rows


def _rows_chart(data: HistoryData, charts: Charts):
    nights = data.nights
    if not nights:
        return None
    rejected = [_when(r) for r in data.runs if r["kind"] in NIGHT_KINDS and r["status"] == "rejected"]
    png = rows_chart([_when(r) for r in nights], [r["rows_scored"] or 0 for r in nights],
                     [r["rows_quarantined"] or 0 for r in nights], rejected)
    return charts.add("rows", png, "rows scored and quarantined per night", width=945)


def _feature_ranking(data: HistoryData) -> list[dict]:
    """Per feature: nights measured and drifted, worst and mean statistic / threshold; most drifted first."""
    when = {r["run_id"]: _when(r) for r in data.nights}
    stats: dict[str, dict] = {}
    for row in data.drift:
        if row["run_id"] not in when:
            continue
        s = stats.setdefault(row["feature"], {"feature": row["feature"], "measured": 0, "drifted": 0, "ratios": [], "last": None})
        ratio = severity(row)
        s["measured"] += 1
        if ratio != float("-inf"):
            s["ratios"].append(ratio)
        if row["drifted"]:
            s["drifted"] += 1
            s["last"] = max(s["last"] or when[row["run_id"]].date(), when[row["run_id"]].date())
    for s in stats.values():
        s["worst"] = max(s["ratios"], default=None)
        s["mean"] = sum(s["ratios"]) / len(s["ratios"]) if s["ratios"] else 0.0
    return sorted(stats.values(), key=lambda s: (-s["drifted"], -s["mean"], s["feature"]))


def _drift_rows(ranking: list[dict]) -> tuple[list[tuple], list[str]]:
    """The table: the top features one by one, the rest in one row; also the names summarised."""
    rows = [(s["feature"], s["measured"], s["drifted"], _percent(s["drifted"], s["measured"]), s["worst"], s["last"])
            for s in ranking[:TOP_FEATURES]]
    rest = ranking[TOP_FEATURES:]
    if rest:
        drifted = sum(s["drifted"] for s in rest)
        measured = sum(s["measured"] for s in rest)
        worst = max((s["worst"] for s in rest if s["worst"] is not None), default=None)
        last = max((s["last"] for s in rest if s["last"] is not None), default=None)
        rows.append((Cell(f"{len(rest)} other features", bold=True), measured, drifted, _percent(drifted, measured), worst, last))
    return rows, [s["feature"] for s in rest]


def _heatmap(data: HistoryData, ranking: list[dict], charts: Charts):
    nights = data.nights
    if not ranking or not nights:
        return None
    column = {r["run_id"]: i for i, r in enumerate(nights)}
    top = [s["feature"] for s in ranking[:TOP_FEATURES]]
    row_of = {feature: i for i, feature in enumerate(top)}
    rest = len(ranking) - len(top)
    labels = top + ([f"{rest} others (worst)"] if rest else [])
    ratio = [[float("nan")] * len(nights) for _ in labels]
    drifted = [[False] * len(nights) for _ in labels]
    for row in data.drift:
        j = column.get(row["run_id"])
        if j is None:
            continue
        i = row_of.get(row["feature"], len(top))  # every feature beyond the top ones shares the summary row
        value = severity(row)
        if value != float("-inf") and not value <= ratio[i][j]:  # NaN (nothing yet) or a worse one
            ratio[i][j] = value
        drifted[i][j] = drifted[i][j] or bool(row["drifted"])
    png = drift_heatmap(labels, [_when(r) for r in nights], ratio, drifted)
    return charts.add("drift", png, "drift heat map: feature by night, statistic relative to threshold", width=945)


def _performance(data: HistoryData, charts: Charts):
    def points(rows: list[dict]) -> list[tuple[datetime, float]]:
        return [(datetime.combine(r["event_day"], datetime.min.time()), v) for r in rows if (v := _float(r["value"])) is not None]

    realised, estimated = points(data.realised), points(data.estimated)
    if not realised and not estimated:
        return None
    changes = [(_event_time(e), f"v{e['version']} {e['event'].replace('_', ' ')}", CHAMPION_CHANGES[e["event"]])
               for e in data.events if e["event"] in CHAMPION_CHANGES]
    png = performance_chart(data.metric, realised, estimated, changes)
    return charts.add("performance", png, f"realised and estimated {data.metric} by event day, champion changes marked", width=945)


def _event_time(event: dict) -> datetime:
    return _utc(event.get("as_of") or event["recorded_at"])


def _gate_rows(data: HistoryData, links: bool) -> list[tuple]:
    """Every gate decision: the challenger, the champion it met, the outcome, the primary metric's
    improvement with its bootstrap interval, and the conditions it failed."""
    rows = []
    for e in reversed(data.events):
        gate = e["metrics"]
        if "outcome" not in gate:
            continue
        outcome = str(gate.get("outcome") or "no_decision")
        boot = gate.get("bootstrap") or {}
        low, high = _float(boot.get("low")), _float(boot.get("high"))
        interval = f"[{_fmt(low)}, {_fmt(high)}]" if low is not None and high is not None else "—"
        failed = [name for name, passed in (gate.get("checks") or {}).items() if not passed]
        rows.append((_link(e["run_id"], f"{_event_time(e):%Y-%m-%d}", data, links), _version(e["version"]),
                     _version(e["previous_champion"]), Cell(outcome.replace("_", " "), tone=GATE_TONES.get(outcome, "neutral"), badge=True),
                     _float(boot.get("diff")), interval, ", ".join(failed) or "—", _one_line(str(gate.get("reason") or ""))))
    return rows


def _champion_rows(data: HistoryData) -> list[tuple]:
    return [(_event_time(e), _version(e["version"]), e["event"].replace("_", " "), _version(e["previous_champion"]), e["actor"],
             _one_line(str(e["reason"] or ""))) for e in reversed(data.events) if e["event"] in CHAMPION_CHANGES]


def _score_charts(data: HistoryData, charts: Charts) -> list:
    nights = [r for r in data.nights if r["rows_scored"]]
    summary = {s["run_id"]: s for s in data.scores}
    nights = [r for r in nights if r["run_id"] in summary]
    if not nights:
        return []
    quantiles = [[_float(summary[r["run_id"]][q]) or 0.0 for q in ("p10", "p25", "p50", "p75", "p90")] for r in nights]
    drawn = [charts.add("scores", score_chart([_when(r) for r in nights], quantiles), "score quantiles per night", width=945)]
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for row in data.bands:
        counts[row["run_id"]][str(row["risk_band"])] = row["n"]
    bands = list(dict.fromkeys([*data.band_order, *(b for c in counts.values() for b in c)]))
    totals = [sum(counts[r["run_id"]].values()) or 1 for r in nights]
    shares = {band: [counts[r["run_id"]].get(band, 0) / total for r, total in zip(nights, totals)] for band in bands}
    drawn.append(charts.add("bands", bands_chart([_when(r) for r in nights], shares), "risk band shares per night", width=945))
    return drawn


def _durations(data: HistoryData, charts: Charts):
    nights = [r for r in data.nights if r["timings"]]
    if not nights:
        return None
    steps = list(dict.fromkeys([*STEPS, *(step for r in nights for step in r["timings"])]))
    series = {step: [_float(r["timings"].get(step)) or 0.0 for r in nights] for step in steps}
    series = {step: values for step, values in series.items() if any(values)}
    png = durations_chart([_when(r) for r in nights], series)
    return charts.add("durations", png, "run time by step per night", width=945)


def _problem_rows(data: HistoryData, links: bool) -> list[tuple]:
    """Failed, rejected and crashed runs, newest first, each with its one-line error."""
    rows = []
    for run in reversed(data.runs):
        if run["status"] in ("succeeded", "running"):
            continue
        error = _one_line(run["error"] or run["note"] or "")
        error = error if len(error) <= MAX_ERROR else error[: MAX_ERROR - 1] + "…"
        rows.append((_link(run["run_id"], f"{_when(run):%Y-%m-%d %H:%M}", data, links), run["kind"],
                     Cell(run["status"], tone=STATUS_TONES.get(run["status"], "bad"), badge=True), error or "—"))
    return rows


# --------------------------------------------------------------------------- the page


def subject_line(data: HistoryData) -> str:
    nights = data.nights
    if not nights:
        return f"[batchml] {data.job} history: no night succeeded yet"
    span = f"{_when(nights[0]):%Y-%m-%d} to {_when(nights[-1]):%Y-%m-%d}"
    problems = sum(1 for r in data.runs if r["status"] not in ("succeeded", "running"))
    changes = sum(1 for e in data.events if e["event"] in CHAMPION_CHANGES)
    drift = sum(1 for r in nights if r["dataset_drift"])
    return (f"[batchml] {data.job} history: {len(nights)} night{'s' * (len(nights) != 1)} {span}, {drift} with dataset drift, "
            f"{changes} champion change{'s' * (changes != 1)}, {problems} failed or rejected run{'s' * (problems != 1)}")


def _text(data: HistoryData, subject: str, path: str | None) -> str:
    lines = [subject, ""]
    lines += [f"{name}: {_fmt(value.value if isinstance(value, Cell) else value)}" for name, value in _summary_rows(data, False)]
    problems = _problem_rows(data, False)
    if problems:
        lines += ["", "Failed and rejected runs:"] + [f"  - {when} {kind} {status.value}: {error}" for when, kind, status, error in problems]
    lines += ["", "The HTML version has the charts" + (f"; the page is {path}" if path else "") + "."]
    return "\n".join(lines) + "\n"


def _context(data: HistoryData, drawn: dict, links: bool) -> dict:
    ranking = drawn["ranking"]
    drift_rows, others = _drift_rows(ranking)
    latest = next((r for r in reversed(data.runs) if r["run_id"] in data.reports), None)
    return {
        "title": drawn["subject"], "width": PAGE_WIDTH, "job": data.job, "headline": drawn["subject"].removeprefix("[batchml] "),
        "since": data.since, "generated_at": data.generated_at, "metric": data.metric, "inline": links,
        "latest": latest["run_id"] + ".html" if links and latest else None,
        "summary": _summary_rows(data, links), "weekly": _weekly_rows(data), "rows_chart": drawn["rows"],
        "heatmap": drawn["heatmap"], "drift_rows": drift_rows, "other_features": others, "top_features": TOP_FEATURES,
        "performance": drawn["performance"], "gate": _gate_rows(data, links), "champions": _champion_rows(data),
        "score_charts": drawn["scores"], "durations": drawn["durations"], "problems": _problem_rows(data, links),
    }


def build_history(data: HistoryData, *, templates: Path | None = None, path: str | None = None) -> Report:
    """The history page as a :class:`Report` (``run_id`` ``history``): the file version links the run
    reports beside it; the mail version names ``path`` instead."""
    charts = Charts()
    ranking = _feature_ranking(data)
    subject = subject_line(data)
    drawn = {"subject": subject, "ranking": ranking, "rows": _rows_chart(data, charts), "heatmap": _heatmap(data, ranking, charts),
             "performance": _performance(data, charts), "scores": _score_charts(data, charts), "durations": _durations(data, charts)}
    email = render("history.html", templates, **_context(data, drawn, links=False), page_path=path)
    page = render("history.html", templates, **_context(data, drawn, links=True), page_path=None)
    return Report(run_id=HISTORY_FILE.removesuffix(".html"), subject=subject, text=_text(data, subject, path),
                  html_email=email, images=charts.images, page=page)
