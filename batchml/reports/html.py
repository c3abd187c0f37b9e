"""HTML building blocks for run reports: escaping, value formatting, tables, sections, badges, charts.

Nothing here reads a run's data; :mod:`batchml.reports.run_report` assembles these blocks into a report.
Everything that comes from data is HTML-escaped by :func:`_h`; only :class:`Markup`, the HTML these
blocks build themselves, goes in raw. Styles are inline because several mail clients drop
``<style>`` blocks.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

from batchml.reports.charts import distribution_chart

# --------------------------------------------------------------------------- formatting helpers


class Markup(str):
    """HTML that batchml wrote itself (these blocks, :mod:`batchml.reports.run_report`); everything else is escaped by :func:`_h`."""


def _h(value: object) -> str:
    return value if isinstance(value, Markup) else html.escape(_fmt(value))


def _fmt(value: object) -> str:
    """A value as a short human string: thousands separators, 4 significant digits, UTC times."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    if isinstance(value, datetime):
        return _utc(value).strftime("%Y-%m-%d %H:%M UTC")
    return str(value)


def _utc(moment: datetime) -> datetime:
    """Naive UTC (the warehouse stores UTC; naive values are taken as UTC already)."""
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


def _as_datetime(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return _utc(value)
    try:
        return _utc(datetime.fromisoformat(str(value)))
    except ValueError:
        return None


def _float(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0%"


def _seconds(value: object) -> str:
    number = _float(value)
    if number is None:
        return "—"
    return f"{number:.2f} s" if number < 60 else f"{number / 60:.1f} min"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _version(version: int | None) -> str:
    return "—" if version is None else f"v{version}"


def _diff(champion: object, challenger: object) -> str:
    """Challenger minus champion with its sign, so "+0.012" reads as the challenger's gain."""
    a, b = _float(champion), _float(challenger)
    return "—" if a is None or b is None else f"{b - a:+.4g}"


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {_fmt(count)}" for name, count in counts.items())


# --------------------------------------------------------------------------- HTML building blocks

FONT = "font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif"
TABLE = "border-collapse:collapse;font-size:13px;margin:4px 0 12px 0"
TH = "text-align:left;padding:4px 10px;border-bottom:2px solid #d0d5dd;color:#475467;font-weight:600"
TD = "padding:4px 10px;border-bottom:1px solid #eaecf0;vertical-align:top"
H2 = "font-size:16px;margin:22px 0 6px 0;color:#101828;border-bottom:1px solid #eaecf0;padding-bottom:4px"
NOTE = "color:#667085;font-size:12px;margin:2px 0 10px 0"
STATUS_COLORS = {"succeeded": "#067647", "failed": "#b42318", "rejected": "#b54708", "running": "#175cd3"}
DRIFT_RED = "#b42318"


def _table(headers: Sequence[str] | None, rows: Iterable[Sequence[object]], numeric: Sequence[int] = ()) -> Markup:
    """A plain table (no header row if ``headers`` is None); ``numeric`` columns are right-aligned.

    Cells are escaped unless they are :class:`Markup`.
    """
    def cell(tag: str, style: str, index: int, value: object) -> str:
        align = ";text-align:right" if index in numeric else ""
        return f'<{tag} style="{style}{align}">{_h(value)}</{tag}>'

    head = "<tr>" + "".join(cell("th", TH, i, h) for i, h in enumerate(headers)) + "</tr>" if headers else ""
    body = "".join("<tr>" + "".join(cell("td", TD, i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return Markup(f'<table style="{TABLE}">{head}{body}</table>')


def _section(title: str, *parts: str) -> Markup:
    return Markup(f'<h2 style="{H2}">{_h(title)}</h2>' + "".join(parts))


def _note(text: object) -> Markup:
    return Markup(f'<p style="{NOTE}">{_h(text)}</p>')


def _badge(text: str, color: str) -> Markup:
    style = f"background:{color};color:#fff;border-radius:3px;padding:1px 7px;font-size:12px"
    return Markup(f'<span style="{style}">{_h(text)}</span>')


def _colored(text: object, color: str) -> Markup:
    return Markup(f'<span style="color:{color};font-weight:600">{_h(text)}</span>')


class _Charts:
    """Collects chart PNGs while sections render; each becomes an inline ``cid:`` image."""

    def __init__(self) -> None:
        self.images: dict[str, bytes] = {}

    def img(self, name: str, png: bytes, alt: str) -> Markup:
        self.images[name] = png
        style = "display:block;max-width:100%;height:auto;margin:6px 0"
        return Markup(f'<img src="cid:{name}" alt="{_h(alt)}" width="540" style="{style}">')


def _counts_section(title: str, counts: dict[str, int]) -> Markup:
    """A name -> count table with shares; used for quarantine reasons and risk bands."""
    if not counts:
        return Markup("")
    whole = sum(v or 0 for v in counts.values())
    rows = [(name, count, _percent(count or 0, whole)) for name, count in counts.items()]
    return _section(title, _table(("", "rows", "share"), rows, numeric=(1, 2)))


def _largest_shifts(hist: dict, top: int = 3) -> str:
    """The levels whose share moved most, e.g. ``npm 12.0% → 30.5%`` (says in words what the chart shows)."""
    ref = [_float(v) or 0.0 for v in hist["reference"]]
    cur = [_float(v) or 0.0 for v in hist["current"]]
    order = sorted(range(len(ref)), key=lambda i: -abs(cur[i] - ref[i]))[:top]
    return "; ".join(f"{hist['labels'][i]} {100 * ref[i]:.1f}% → {100 * cur[i]:.1f}%" for i in order)


def _distribution(charts: _Charts, name: str, title: str, hist: dict) -> Markup:
    png = distribution_chart(title, hist["labels"], hist["reference"], hist["current"])
    shifts = _largest_shifts(hist)
    return Markup(charts.img(name, png, f"{title}: {shifts}") + _note(f"Largest changes: {shifts}"))


def _page(title: str, body: Iterable[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_h(title)}</title></head>\n"
        f'<body style="margin:0;padding:16px;background:#f2f4f7;color:#101828;{FONT}">'
        f'<div style="max-width:780px;margin:0 auto;background:#ffffff;padding:18px 24px;border:1px solid #eaecf0">'
        + "\n".join(part for part in body if part)
        + f'<p style="{NOTE}">Generated by batchml.</p></div></body></html>\n'
    )
