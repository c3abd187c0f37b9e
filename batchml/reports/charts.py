"""PNG charts for run reports, drawn on matplotlib's Agg canvas.

Charts are small on purpose (6 x 2.8 in at 90 dpi, about 540 x 250 px, 5-8 KB each as palette PNGs) so a report
carrying a dozen of them stays at a few hundred KB, inline in an email or base64 in a file.

The module never imports pyplot: every chart is its own ``Figure`` on a ``FigureCanvasAgg``, so no
global figure registry grows in a long-running scheduler. Drawing is serialised by a lock because
matplotlib's rcParams are process-global and not thread-safe.

Labels come from data (feature names, category levels), so mathtext is switched off: a level
such as ``$5-$10`` is drawn as written instead of being parsed as a formula (or failing to parse).
"""

from __future__ import annotations

import functools
import io
import math
import threading
from collections.abc import Callable, Sequence
from datetime import datetime

import matplotlib
import matplotlib.dates as mdates
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter
from PIL import Image  # installed with matplotlib, which uses it for image IO

__all__ = ["distribution_chart", "trend_chart", "MAX_BARS"]

SIZE = (6.0, 2.8)
DPI = 90
MAX_BARS = 30  # beyond this a bar chart is unreadable at 540 px; the rest are lumped together
MAX_LABEL = 18
MAX_TITLE = 56
PALETTE_COLORS = 64
REFERENCE_COLOR = "#9aa5b1"
CURRENT_COLOR = "#2f6fdf"
OTHER_LABEL = "(other)"

# Fixed look, independent of a user's matplotlibrc; parse_math/usetex off so data labels are literal.
_RC = {
    "text.parse_math": False,
    "text.usetex": False,
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.grid.axis": "y",
    "grid.color": "#e5e7eb",
    "axes.axisbelow": True,
}
_LOCK = threading.Lock()


def _drawing(func: Callable[..., bytes]) -> Callable[..., bytes]:
    """Run a chart function under the lock and the fixed rc settings (texts read rc when created)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> bytes:
        with _LOCK, matplotlib.rc_context(_RC):
            return func(*args, **kwargs)

    return wrapper


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig: Figure) -> bytes:
    """The figure as a 64-colour palette PNG: a third of the RGBA size and indistinguishable here."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").quantize(PALETTE_COLORS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _finite(values: Sequence[object]) -> list[float]:
    """Proportions as floats; a missing or non-finite one is drawn as an empty bar."""
    out = []
    for value in values:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = 0.0
        out.append(number if math.isfinite(number) else 0.0)
    return out


def _short(label: str) -> str:
    return label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 1] + "…"


def cap_bars(labels: list[str], reference: list[float], current: list[float]) -> tuple[list[str], list[float], list[float]]:
    """Keep the ``MAX_BARS - 1`` heaviest bars in their original order and sum the rest into one.

    Order is kept because numeric bins are ordered; weight is the larger of the two shares.
    """
    if len(labels) <= MAX_BARS:
        return labels, reference, current
    weight = [max(r, c) for r, c in zip(reference, current)]
    keep = set(sorted(range(len(labels)), key=lambda i: -weight[i])[: MAX_BARS - 1])
    rest = [i for i in range(len(labels)) if i not in keep]
    order = sorted(keep)
    return (
        [labels[i] for i in order] + [OTHER_LABEL],
        [reference[i] for i in order] + [sum(reference[i] for i in rest)],
        [current[i] for i in order] + [sum(current[i] for i in rest)],
    )


@_drawing
def distribution_chart(title: str, labels: Sequence[object], reference: Sequence[object], current: Sequence[object]) -> bytes:
    """Grouped bars of reference vs current shares over the same bins or levels; returns PNG bytes.

    >>> png = distribution_chart("epss", ["[0, 0.1)", "[0.1, 1]"], [0.9, 0.1], [0.6, 0.4])
    """
    if not (len(labels) == len(reference) == len(current)):
        counts = f"{len(labels)} labels, {len(reference)} reference and {len(current)} current shares"
        raise ValueError(f"histogram of {title!r}: {counts}")
    names, ref, cur = cap_bars([str(label) for label in labels], _finite(reference), _finite(current))
    fig, ax = _figure()
    width = 0.4
    positions = range(len(names))
    ax.bar([p - width / 2 for p in positions], ref, width, label="reference", color=REFERENCE_COLOR)
    ax.bar([p + width / 2 for p in positions], cur, width, label="current", color=CURRENT_COLOR)
    crowded = len(names) > 6 or any(len(n) > 8 for n in names)
    ax.set_xticks(list(positions), [_short(n) for n in names], rotation=35 if crowded else 0, ha="right" if crowded else "center")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_ylabel("share of rows")
    ax.set_title(_short_title(title), loc="left")
    _legend_above(ax)
    return _png(fig)


def _legend_above(ax) -> None:
    """Legend to the right above the plot, level with the left-aligned title, so it hides no bar."""
    ax.legend(frameon=False, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=4, borderaxespad=0.2)


def _short_title(title: str) -> str:
    # Longer titles would run into the legend on the right.
    return title if len(title) <= MAX_TITLE else title[: MAX_TITLE - 1] + "…"


@_drawing
def trend_chart(title: str, series: dict[str, Sequence[tuple[datetime, float]]]) -> bytes:
    """One line per metric over time (points are ``(as_of, value)``); returns PNG bytes."""
    fig, ax = _figure()
    for name, points in series.items():
        ordered = sorted(points)
        ax.plot([p[0] for p in ordered], [p[1] for p in ordered], marker="o", markersize=3, linewidth=1.4, label=str(name))
    # minticks=1: a few nightly points span days, where the default (3 ticks) finds no interval and warns
    locator = mdates.AutoDateLocator(minticks=1, maxticks=8)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.set_title(_short_title(title), loc="left")
    if len(series) > 1:
        _legend_above(ax)
    elif series:
        ax.set_ylabel(str(next(iter(series))))
    return _png(fig)
