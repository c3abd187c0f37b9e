"""PNG charts for run reports, drawn on matplotlib's Agg canvas.

Charts are small on purpose (6 x 2.8 in at 90 dpi, about 540 x 250 px, 5-8 KB each as palette PNGs) so a report
carrying a dozen of them stays at a few hundred KB, inline in an email or base64 in a file.

The module never imports pyplot: every chart is its own ``Figure`` on a ``FigureCanvasAgg``, so no
global figure registry grows in a long-running scheduler. Drawing is serialised by a lock because
matplotlib's rcParams are process-global and not thread-safe.

Labels come from data (feature names, category levels), so mathtext is switched off: a level
such as ``$5-$10`` is drawn as written instead of being parsed as a formula (or failing to parse).

Each chart is drawn once: margins are fixed (the rotated tick labels of a bar chart measured first)
rather than found by constrained layout, titles are placed at ``y=1.0`` rather than moved clear of
the axes' decorations (a tight bounding box per draw), and the canvas' pixels go to PIL directly.
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
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, PercentFormatter
from PIL import Image  # installed with matplotlib, which uses it for image IO

__all__ = ["distribution_chart", "trend_chart", "MAX_BARS", "rows_chart", "drift_heatmap", "performance_chart",
           "score_chart", "bands_chart", "durations_chart", "WIDE"]

SIZE = (6.0, 2.8)
WIDE = (10.5, 3.0)  # the history page's charts: 945 px wide, one column per night
DPI = 90
MAX_BARS = 30  # beyond this a bar chart is unreadable at 540 px; the rest are lumped together
MAX_LABEL = 18
MAX_TITLE = 56
PALETTE_COLORS = 64
REFERENCE_COLOR = "#9aa5b1"
CURRENT_COLOR = "#2f6fdf"
OTHER_LABEL = "(other)"
GOOD_COLOR = "#067647"
NIGHT_BAR = 0.8  # days: a bar a little narrower than its night, so a year of nights still reads as bars
BAD_COLOR = "#b42318"

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


def _figure(size: tuple[float, float] = SIZE) -> tuple[Figure, object]:
    """A run report chart; its margins are set by :func:`_frame` once its texts are known (constrained
    layout found them by drawing the figure over again: a third of the chart's time)."""
    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _frame(fig: Figure, *, left: float = 0.6, bottom: float = 0.4, top: float = 0.3, right: float = 0.1) -> None:
    """Fixed margins in inches: room for the y ticks and label, the x ticks, and the title and legend above."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height)


def _rotated_extent(fig: Figure, ax) -> tuple[float, float]:
    """(height, width) in inches of the tallest and widest rotated x tick label: their sizes do not
    depend on where they land, so they are measured before the one drawing."""
    renderer = fig.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in ax.get_xticklabels()]
    return (max((b.height for b in boxes), default=0.0) / DPI, max((b.width for b in boxes), default=0.0) / DPI)


def _png(fig: Figure) -> bytes:
    """The figure as a 64-colour palette PNG: a third of the RGBA size and indistinguishable here.
    Drawn once; the canvas' pixels go straight to PIL (no PNG encoded by matplotlib and decoded again).
    The palette by maximum coverage: half the time of median cut (4.5 against 10.1 ms a chart), the
    same size, no pixel more than 12/255 off (median cut: up to 71). zlib level 8, not ``optimize``
    (level 9): 1 % larger files (4.90 against 4.85 KB on average) in 2.4 ms instead of 5.6."""
    fig.canvas.draw()
    rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    image = rgb.quantize(PALETTE_COLORS, method=Image.Quantize.MAXCOVERAGE)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=8)
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
    _bars(ax, [p - width / 2 for p in positions], ref, width, label="reference", color=REFERENCE_COLOR)
    _bars(ax, [p + width / 2 for p in positions], cur, width, label="current", color=CURRENT_COLOR)
    crowded = len(names) > 6 or any(len(n) > 8 for n in names)
    ax.set_xticks(list(positions), [_short(n) for n in names], rotation=35 if crowded else 0, ha="right" if crowded else "center")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_ylabel("share of rows")
    ax.set_title(_short_title(title), loc="left", y=1.0)
    _legend_above(ax)
    if crowded:  # labels hang below, right-aligned under their bar: the first ones reach left of the axes
        tall, wide = _rotated_extent(fig, ax)
        _frame(fig, bottom=0.16 + tall, left=max(0.6, 0.12 + wide - _first_tick_inset(fig, len(names))))
    else:
        _frame(fig, bottom=0.3)
    return _png(fig)


def _first_tick_inset(fig: Figure, bars: int) -> float:
    """Inches from the axes' left edge to the first bar's tick (bars at 0..n-1, 0.4 either side, 5 % margins)."""
    span = bars - 1 + 0.8
    return (0.4 + 0.05 * span) / (1.1 * span) * (fig.get_size_inches()[0] - 0.72)


def _legend_above(ax) -> None:
    """Legend to the right above the plot, level with the left-aligned title, so it hides no bar.
    Bars come after the other entries, in the order drawn (where ``Axes.bar`` put them)."""
    entries = sorted(zip(*ax.get_legend_handles_labels()), key=lambda entry: isinstance(entry[0], _Bars))
    ax.legend(*zip(*entries) if entries else ([], []), frameon=False, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=4,
              borderaxespad=0.2)


class _Bars(PolyCollection):
    """A bar series as one polygon collection."""


def _bars(ax, x: Sequence[float], heights: Sequence[float], width: float, bottom: Sequence[float] | None = None, *,
          color: str, label: str | None = None) -> None:
    """Bars of ``width`` centred on ``x``, as ``Axes.bar`` draws them (filled, no edge, the y axis
    held at their base), as one artist: ``Axes.bar`` makes a patch per bar, and adding, sizing and
    drawing those patches was a third of a bar chart's time; the pixels are the same."""
    bottom = [0.0] * len(x) if bottom is None else bottom
    half = width / 2
    bars = _Bars([[(c - half, b), (c - half, b + h), (c + half, b + h), (c + half, b)] for c, b, h in zip(x, bottom, heights)],
                 facecolors=color, edgecolors="none", linewidths=0, label=label)
    bars.sticky_edges.y.extend(bottom)
    ax.add_collection(bars, autolim=True)
    ax.autoscale_view()


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
    ax.set_title(_short_title(title), loc="left", y=1.0)
    if len(series) > 1:
        _legend_above(ax)
    elif series:
        ax.set_ylabel(str(next(iter(series))))
    # room for 5-digit ticks (and the y label when one series), and for a "1e6" offset above
    _frame(fig, left=0.72 if len(series) == 1 else 0.45, top=0.36)
    return _png(fig)


# --------------------------------------------------------------------------- history charts (one point per night)


def _dates(ax) -> None:
    locator = mdates.AutoDateLocator(minticks=3, maxticks=12)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))


def _wide(height: float = WIDE[1], left: float = 0.75, right: float = 0.15, rows: int = 1, **grid) -> tuple[Figure, object]:
    """A history chart with fixed margins (in inches): constrained layout would take half its drawing
    time, and these charts all have the same frame (title and legend above, dates below)."""
    fig = Figure(figsize=(WIDE[0], height), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=left / WIDE[0], right=1 - right / WIDE[0], top=1 - 0.42 / height, bottom=0.38 / height, hspace=0.12)
    axes = fig.subplots(rows, 1, sharex=True, **grid) if rows > 1 else fig.add_subplot()
    return fig, axes


MAX_NIGHT_BARS = 62  # beyond two months a bar per night costs more to draw (a patch each) than it shows: steps instead


def _night_bars(ax, nights: Sequence[datetime], values: Sequence[float], bottom: Sequence[float] | None = None, **style) -> None:
    """One bar per night, or for a long history the same as a stepped area (one polygon, drawn ~10x faster)."""
    bottom = list(bottom) if bottom is not None else [0.0] * len(nights)
    if len(nights) <= MAX_NIGHT_BARS:
        _bars(ax, mdates.date2num(list(nights)), values, NIGHT_BAR, bottom, **style)
    else:
        ax.fill_between(nights, bottom, [b + v for b, v in zip(bottom, values)], step="mid", linewidth=0, **style)


@_drawing
def rows_chart(nights: Sequence[datetime], scored: Sequence[int], quarantined: Sequence[int],
               rejected: Sequence[datetime] = ()) -> bytes:
    """Rows scored per night (log scale when one night dwarfs the others) above rows quarantined; rejected nights marked."""
    fig, (top, bottom) = _wide(3.4, rows=2, height_ratios=[2, 1])
    _night_bars(top, nights, scored, color=CURRENT_COLOR, label="scored")
    positive = sorted(v for v in scored if v > 0)
    if positive and positive[-1] > 20 * positive[len(positive) // 2]:  # a first night or a backlog dwarfs the rest
        top.set_yscale("log")
        top.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))  # mathtext is off: no 10^4
    top.set_ylabel("rows scored")
    top.set_title("Rows scored and quarantined per night", loc="left", y=1.0)
    _night_bars(bottom, nights, quarantined, color=BAD_COLOR, label="quarantined")
    if rejected:
        bottom.plot(list(rejected), [0] * len(rejected), "x", color="#000000", markersize=7, label="batch rejected")
        _legend_above(bottom)
    bottom.set_ylabel("quarantined")
    _dates(bottom)
    return _png(fig)


@_drawing
def drift_heatmap(features: Sequence[str], nights: Sequence[datetime], severity: Sequence[Sequence[float]],
                  drifted: Sequence[Sequence[bool]]) -> bytes:
    """Feature x night cells coloured by statistic / threshold on a log scale (white at the threshold,
    red beyond, blue below, grey where nothing was measured); drifted cells carry a dot."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    ratio = np.array(severity, dtype=float).reshape(len(features), len(nights))
    with np.errstate(divide="ignore", invalid="ignore"):
        logged = np.log10(np.clip(ratio, 1e-3, 1e3))
    height = 1.1 + 0.19 * len(features)
    fig, ax = _wide(height, left=1.35, right=0.75)  # room for the colour bar's labels
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#e5e7eb")
    numbers = mdates.date2num(list(nights))
    step = float(np.median(np.diff(numbers))) if len(numbers) > 1 else 1.0
    extent = (numbers[0] - step / 2, numbers[-1] + step / 2, len(features) - 0.5, -0.5) if len(numbers) else None
    image = ax.imshow(np.ma.masked_invalid(logged), aspect="auto", cmap=cmap, interpolation="nearest", extent=extent,
                      norm=TwoSlopeNorm(vcenter=0.0, vmin=-2.0, vmax=1.0))
    rows, cols = np.nonzero(np.array(drifted, dtype=bool).reshape(len(features), len(nights)))
    if len(rows):
        ax.scatter(numbers[cols], rows, s=max(1.5, min(12.0, 700 / max(len(nights), 1))), color="#000000", marker="o", linewidths=0)
    ax.set_yticks(range(len(features)), [_short(str(f)) for f in features])
    ax.grid(False)
    _dates(ax)
    bar = fig.colorbar(image, ax=ax, pad=0.01, fraction=0.03, ticks=[-2, -1, 0, 1])
    bar.ax.set_yticklabels(["1/100", "1/10", "threshold", "10x"])
    ax.set_title("Drift by feature and night: statistic / threshold (dot: drifted)", loc="left", y=1.0)
    return _png(fig)


@_drawing
def performance_chart(metric: str, realised: Sequence[tuple[datetime, float]], estimated: Sequence[tuple[datetime, float]],
                      changes: Sequence[tuple[datetime, str, str]] = ()) -> bytes:
    """The champion's realised metric by event day beside the estimated one; champion changes as vertical lines.

    ``changes`` are ``(when, label, kind)`` with kind ``promotion``, ``rollback`` or ``manual``."""
    fig, ax = _wide()
    if realised:
        ax.plot(*zip(*sorted(realised)), marker="o", markersize=3, linewidth=1.4, color=CURRENT_COLOR, label=f"realised {metric}")
    if estimated:
        ax.plot(*zip(*sorted(estimated)), marker="o", markersize=3, linewidth=1.2, linestyle="--", color=REFERENCE_COLOR,
                label=f"estimated {metric} (before labels)")
    colors = {"promotion": GOOD_COLOR, "rollback": BAD_COLOR, "manual": "#7a5af8"}
    for when, label, kind in changes:
        ax.axvline(when, color=colors.get(kind, "#475467"), linewidth=1, linestyle=":")
        ax.annotate(_short(label), (mdates.date2num(when), 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top",
                    ha="right", fontsize=7, color=colors.get(kind, "#475467"))
    ax.set_ylabel(metric)
    ax.set_title("Champion's performance by event day (dotted: champion changes)", loc="left", y=1.0)
    _dates(ax)
    _legend_above(ax)
    return _png(fig)


@_drawing
def score_chart(nights: Sequence[datetime], quantiles: Sequence[Sequence[float]]) -> bytes:
    """Score distribution per night: median line, 25-75 % and 10-90 % bands (``quantiles`` rows: p10, p25, p50, p75, p90)."""
    fig, ax = _wide()
    p10, p25, p50, p75, p90 = (list(column) for column in zip(*quantiles))
    ax.fill_between(nights, p10, p90, color=CURRENT_COLOR, alpha=0.15, linewidth=0, label="10-90 %")
    ax.fill_between(nights, p25, p75, color=CURRENT_COLOR, alpha=0.3, linewidth=0, label="25-75 %")
    ax.plot(nights, p50, color=CURRENT_COLOR, linewidth=1.4, marker="o", markersize=2.5, label="median")
    ax.set_ylabel("score")
    ax.set_title("Scores of each night's rows", loc="left", y=1.0)
    _dates(ax)
    _legend_above(ax)
    return _png(fig)


BAND_COLORS = ["#b42318", "#f79009", "#2f6fdf", "#9aa5b1", "#7a5af8", "#067647"]


@_drawing
def bands_chart(nights: Sequence[datetime], shares: dict[str, Sequence[float]]) -> bytes:
    """Share of each risk band per night, stacked (bands in the order given: highest first)."""
    fig, ax = _wide()
    names = list(shares)
    ax.stackplot(nights, *[shares[n] for n in names], labels=names, colors=BAND_COLORS[: len(names)], step="mid")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of rows scored")
    ax.set_title("Risk bands per night", loc="left", y=1.0)
    _dates(ax)
    _legend_above(ax)
    return _png(fig)


STEP_COLORS = ["#2f6fdf", "#9aa5b1", "#f79009", "#7a5af8", "#067647", "#b42318", "#475467", "#e478fa", "#15b79e"]


@_drawing
def durations_chart(nights: Sequence[datetime], steps: dict[str, Sequence[float]]) -> bytes:
    """Seconds per step per night, stacked bars in step order."""
    fig, ax = _wide()
    bottom = [0.0] * len(nights)
    for i, (step, seconds) in enumerate(steps.items()):
        _night_bars(ax, nights, seconds, bottom, label=step, color=STEP_COLORS[i % len(STEP_COLORS)])
        bottom = [b + s for b, s in zip(bottom, seconds)]
    ax.set_ylabel("seconds")
    ax.set_title("Run time by step", loc="left", y=1.0)
    _dates(ax)
    _legend_above(ax)
    return _png(fig)
