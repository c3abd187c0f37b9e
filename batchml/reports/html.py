"""Value formatting for the report pages: numbers, times, shares, versions as short human strings.

The HTML itself comes from the Jinja2 templates in ``batchml/reports/templates`` (autoescaped);
these helpers only turn values into text, and are the templates' filters (``fmt``, ``seconds``, ...).
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

# --------------------------------------------------------------------------- formatting helpers

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
