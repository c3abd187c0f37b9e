"""Synthetic vulnerability findings in development environments, for the demo, tests and benchmarks.

Each row is one finding a dependency scanner raised in a dev environment. The label
``exploited_30d`` says whether the vulnerability was exploited within 30 days; it is drawn from a
logistic model of the features plus a hidden "exploitability" that EPSS only sees through noise,
so a model can learn it well but not perfectly (LightGBM reaches ROC AUC ~0.85).

Two entry points:

- :func:`generate_findings` — day by day, with weekday rhythm, ingestion delays and a *shift*
  (scanner upgrade + new ecosystem mix + changed concept) for drift and retraining demos.
- :func:`generate_rows` — n rows over 30 days in one vectorised pass, for benchmarks.

:func:`inject_bad_rows` corrupts a fraction of rows the way a data contract should catch.

Example::

    >>> import datetime as dt
    >>> table = generate_findings(dt.date(2024, 1, 1), days=60, seed=7)
    >>> table.column_names[:3]
    ['finding_id', 'found_at', 'ingested_at']
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "CATEGORICAL",
    "CATEGORY_LEVELS",
    "LABEL",
    "NUMERIC",
    "SCHEMA",
    "generate_findings",
    "generate_rows",
    "inject_bad_rows",
]

NUMERIC = [
    "cvss_base",
    "epss",
    "days_since_published",
    "dependency_depth",
    "downloads_log",
    "n_references",
    "internet_exposed",
]
CATEGORICAL = ["ecosystem", "severity", "attack_vector", "asset_criticality"]
LABEL = "exploited_30d"

ECOSYSTEMS = ("npm", "pypi", "maven", "go", "cargo", "nuget", "rubygems")
SEVERITIES = ("low", "medium", "high", "critical")
ATTACK_VECTORS = ("network", "adjacent", "local", "physical")
ASSET_CRITICALITIES = ("low", "medium", "high", "crown_jewel")
CATEGORY_LEVELS = {
    "ecosystem": list(ECOSYSTEMS),
    "severity": list(SEVERITIES),
    "attack_vector": list(ATTACK_VECTORS),
    "asset_criticality": list(ASSET_CRITICALITIES),
}

SCHEMA = pa.schema(
    [
        ("finding_id", pa.int64()),
        ("found_at", pa.timestamp("us")),
        ("ingested_at", pa.timestamp("us")),
        ("cvss_base", pa.float64()),
        ("epss", pa.float64()),
        ("days_since_published", pa.float64()),
        ("dependency_depth", pa.int32()),
        ("downloads_log", pa.float64()),
        ("n_references", pa.int32()),
        ("ecosystem", pa.string()),
        ("severity", pa.string()),
        ("attack_vector", pa.string()),
        ("internet_exposed", pa.int32()),
        ("asset_criticality", pa.string()),
        ("exploited_30d", pa.int32()),
        ("label_at", pa.timestamp("us")),
    ]
)

# --- how the world looks (pre-shift) -------------------------------------------------------------

# npm and PyPI dominate dev-environment scans; after the shift, teams adopt Go and Rust services.
_ECOSYSTEM_MIX = np.array([0.36, 0.24, 0.16, 0.07, 0.03, 0.08, 0.06])
_ECOSYSTEM_MIX_SHIFTED = np.array([0.18, 0.14, 0.10, 0.30, 0.18, 0.06, 0.04])
# log10 weekly downloads: npm packages are downloaded far more than crates or gems.
_DOWNLOADS_MEAN = np.array([4.4, 3.9, 3.6, 3.2, 3.0, 3.4, 3.3])
# npm trees are deep; Go and Cargo dependency graphs are flatter.
_DEPTH_P = np.array([0.26, 0.36, 0.34, 0.50, 0.45, 0.40, 0.38])
_ATTACK_VECTOR_MIX = np.array([0.70, 0.06, 0.19, 0.05])
# Network-reachable bugs score higher in CVSS; physical ones lower (vector is part of the score).
_CVSS_OFFSET_BY_VECTOR = np.array([0.4, -0.2, -0.9, -1.6])
_CRITICALITY_MIX = np.array([0.35, 0.35, 0.22, 0.08])
_EXPOSED_RATE = 0.3
_EPSS_NULL_RATE = 0.03

# --- the scanner upgrade at the shift: measurement changes, real risk does not ------------------
_CVSS_RESCORE = 0.8
_REFERENCES_FACTOR = 1.6

_LABEL_DELAY = np.timedelta64(30, "D")
_US_PER_DAY = 86_400_000_000
_MAX_INGEST_DELAY_US = (5 * 3600 + 50 * 60) * 1_000_000  # found late at night still lands < 06:00
_WEEKEND_WEIGHT = 0.5  # fewer commits, fewer scans


@dataclass(frozen=True)
class _Concept:
    """Coefficients of the logistic model that draws ``exploited_30d`` (on centred features)."""

    intercept: float
    exploitability: float  # hidden attacker interest; EPSS is a noisy reading of it
    cvss: float  # more severe bugs make better targets
    network: float  # reachable over the network: no foothold needed
    exposed: float  # internet-facing assets are scanned by attackers all day
    exposed_network: float  # and the two together are worse than the sum
    criticality: float  # attackers aim at valuable assets (0 low .. 3 crown_jewel)
    depth: float  # negative: deep transitive deps are rarely reachable from app code
    downloads: float  # popular packages are worth weaponising
    recency: float  # negative: exploitation clusters in the weeks after disclosure


_CONCEPT = _Concept(
    intercept=-3.9,  # puts the base rate near 10%
    exploitability=1.5,
    cvss=0.35,
    network=0.7,
    exposed=0.8,
    exposed_network=0.5,
    criticality=0.35,
    depth=-0.25,
    downloads=0.3,
    recency=-0.45,
)
# After the shift attackers go for internet-facing apps through their direct dependencies: exposure
# and depth matter much more, the CVSS vector less (an exposed asset is reachable anyway). A model
# trained before the shift then ranks ~0.02-0.03 AUC worse than a retrained one.
_CONCEPT_SHIFTED = replace(_CONCEPT, intercept=-3.7, exposed=2.0, depth=-0.8, network=0.3)


# --- public API -----------------------------------------------------------------------------------


def generate_findings(
    start: dt.date,
    days: int,
    seed: int = 7,
    rows_per_day: int = 400,
    shift_day: int | None = None,
) -> pa.Table:
    """Findings for ``days`` days from ``start``, ``rows_per_day`` on average, sorted by ``found_at``.

    Days from ``shift_day`` on (default ``days * 2 // 3``; negative disables it) come from an
    upgraded scanner (cvss_base +0.8, n_references x1.6), a go/cargo-heavy ecosystem mix and a
    changed concept. Each day draws from its own stream keyed by ``(seed, date)``: the same
    arguments always give the same table. ``finding_id`` is ``YYYYMMDD * 1_000_000 + n``.
    Labels land 30 days after ``found_at``, so post-shift labels exist from ``shift_day + 30`` on.

    >>> generate_findings(dt.date(2024, 1, 1), days=2).num_rows > 0
    True
    """
    if days < 0 or rows_per_day < 0:
        raise ValueError(f"days ({days}) and rows_per_day ({rows_per_day}) must be >= 0")
    if rows_per_day > 400_000:
        raise ValueError(f"rows_per_day={rows_per_day} would overflow the per-day finding_id range")
    shift_day = days * 2 // 3 if shift_day is None else shift_day
    if isinstance(start, dt.datetime):  # a datetime would move every day's clock
        start = start.date()
    parts = []
    for offset in range(days):
        day = start + dt.timedelta(days=offset)
        shifted = 0 <= shift_day <= offset
        parts.append(_one_day(day, seed, rows_per_day, shifted))
    if not parts:
        return SCHEMA.empty_table()
    return _to_table({name: np.concatenate([part[name] for part in parts]) for name in parts[0]})


def generate_rows(n: int, seed: int, start: dt.datetime) -> pa.Table:
    """``n`` pre-shift findings spread uniformly over 30 days from ``start``, in one vectorised pass.

    Meant for benchmarks (2 million rows take about a second); ids are ``1..n``.
    """
    if start.tzinfo is not None:
        start = start.astimezone(dt.timezone.utc).replace(tzinfo=None)
    rng = np.random.default_rng(seed)
    offsets = np.sort(rng.integers(0, 30 * _US_PER_DAY, size=n))
    found_at = np.datetime64(start, "us") + offsets.astype("timedelta64[us]")
    columns = _simulate(rng, n, shifted=False)
    columns.update(_times(rng, found_at))
    columns["finding_id"] = np.arange(1, n + 1, dtype=np.int64)
    return _to_table(columns)


def inject_bad_rows(table: pa.Table, fraction: float, seed: int) -> pa.Table:
    """A copy of ``table`` with ``round(fraction * rows)`` rows broken the way a data contract catches.

    Kinds cycle over the corrupted rows: cvss_base 11.5, cvss_base -1, epss +inf, null finding_id,
    null found_at — one kind per row. Types are unchanged (the broken columns become nullable).
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    bad = rng.permutation(table.num_rows)[: round(fraction * table.num_rows)]
    kinds = [bad[k::5] for k in range(5)]
    table = _overwrite(table, "cvss_base", kinds[0], 11.5)
    table = _overwrite(table, "cvss_base", kinds[1], -1.0)
    table = _overwrite(table, "epss", kinds[2], np.inf)
    table = _nullify(table, "finding_id", kinds[3])
    return _nullify(table, "found_at", kinds[4])


# --- one day --------------------------------------------------------------------------------------


def _one_day(day: dt.date, seed: int, rows_per_day: int, shifted: bool) -> dict[str, np.ndarray]:
    """All columns of one day's findings, drawn from the day's own random stream."""
    rng = np.random.default_rng([seed, day.toordinal()])
    n = _day_count(rng, day, rows_per_day)
    columns = _simulate(rng, n, shifted)
    found_at = np.datetime64(day, "us") + np.sort(_time_of_day(rng, n))
    columns.update(_times(rng, found_at))
    day_key = day.year * 10_000 + day.month * 100 + day.day
    columns["finding_id"] = day_key * 1_000_000 + np.arange(1, n + 1, dtype=np.int64)
    return columns


def _day_count(rng: np.random.Generator, day: dt.date, rows_per_day: int) -> int:
    """Rows found on ``day``: weekdays busier than weekends, averaging ``rows_per_day`` over a week."""
    weekend = day.weekday() >= 5
    weight = (_WEEKEND_WEIGHT if weekend else 1.0) * 7 / (5 + 2 * _WEEKEND_WEIGHT)
    busyness = np.clip(rng.normal(1.0, 0.08), 0.8, 1.2)  # release weeks, holidays, big merges
    return int(rng.poisson(rows_per_day * weight * busyness))


def _time_of_day(rng: np.random.Generator, n: int) -> np.ndarray:
    """Offsets into the day (timedelta64[us]): most scans run in CI during working hours."""
    in_ci = rng.random(n) < 0.7
    hours = np.where(in_ci, rng.normal(14.0, 3.0, n) % 24.0, rng.uniform(0.0, 24.0, n))
    return (hours * 3600e6).astype(np.int64).astype("timedelta64[us]")


def _times(rng: np.random.Generator, found_at: np.ndarray) -> dict[str, np.ndarray]:
    """found_at, ingested_at (minutes to hours later: the loader runs in batches) and label_at."""
    delay = np.exp(rng.normal(np.log(20 * 60e6), 1.1, found_at.size))  # median 20 minutes
    delay = np.clip(delay, 60e6, _MAX_INGEST_DELAY_US).astype(np.int64).astype("timedelta64[us]")
    return {"found_at": found_at, "ingested_at": found_at + delay, "label_at": found_at + _LABEL_DELAY}


# --- features and label ---------------------------------------------------------------------------


def _simulate(rng: np.random.Generator, n: int, shifted: bool) -> dict[str, np.ndarray]:
    """Features as the scanner reports them, and the label drawn from the *true* values."""
    ctx = _context(rng, n, shifted)
    exploitability = rng.standard_normal(n)
    cvss_true = _cvss(rng, ctx["attack_vector"])
    network = (ctx["attack_vector"] == 0).astype(np.float64)
    refs = rng.poisson(np.exp(1.3 + 0.12 * (cvss_true - 6.5) + 0.35 * exploitability))
    concept = _CONCEPT_SHIFTED if shifted else _CONCEPT
    label = _label(rng, ctx, exploitability, cvss_true, network, concept)
    cvss = np.clip(np.round(cvss_true + _CVSS_RESCORE, 1), 0.0, 10.0) if shifted else cvss_true
    return {
        **ctx,
        "cvss_base": cvss,
        # Severity comes from the reported score, as the scanner's own banding does.
        "severity": np.digitize(cvss, [4.0, 7.0, 9.0]).astype(np.int8),
        "epss": _epss(rng, exploitability, cvss_true, network),
        "n_references": np.round(refs * (_REFERENCES_FACTOR if shifted else 1.0)).astype(np.int32),
        LABEL: label,
    }


def _context(rng: np.random.Generator, n: int, shifted: bool) -> dict[str, np.ndarray]:
    """Where the finding lives: package, dependency graph, asset and exposure."""
    ecosystem = rng.choice(len(ECOSYSTEMS), n, p=_ECOSYSTEM_MIX_SHIFTED if shifted else _ECOSYSTEM_MIX)
    downloads = np.clip(rng.normal(_DOWNLOADS_MEAN[ecosystem], 1.2), 0.0, 8.5)
    depth = np.minimum(rng.geometric(_DEPTH_P[ecosystem]) - 1, 10)
    # Most findings concern advisories from the last months; a long tail are years old.
    published = np.minimum(np.exp(rng.normal(np.log(45.0), 1.4, n)), 3650.0)
    return {
        "ecosystem": ecosystem.astype(np.int8),
        "attack_vector": rng.choice(len(ATTACK_VECTORS), n, p=_ATTACK_VECTOR_MIX).astype(np.int8),
        "asset_criticality": rng.choice(len(ASSET_CRITICALITIES), n, p=_CRITICALITY_MIX).astype(np.int8),
        "internet_exposed": (rng.random(n) < _EXPOSED_RATE).astype(np.int32),
        "dependency_depth": depth.astype(np.int32),
        "downloads_log": np.round(downloads, 3),
        "days_since_published": np.round(published, 2),
    }


def _cvss(rng: np.random.Generator, attack_vector: np.ndarray) -> np.ndarray:
    """True CVSS base scores: the real distribution clusters around 5.5, 7.5 and 9.8."""
    n = attack_vector.size
    component = rng.choice(3, n, p=[0.45, 0.38, 0.17])
    score = rng.normal(np.array([5.6, 7.5, 9.4])[component], np.array([1.1, 0.5, 0.4])[component])
    return np.clip(np.round(score + _CVSS_OFFSET_BY_VECTOR[attack_vector], 1), 0.0, 10.0)


def _epss(rng: np.random.Generator, exploitability: np.ndarray, cvss: np.ndarray,
          network: np.ndarray) -> np.ndarray:
    """EPSS-like exploit probability: a noisy, heavy-tailed view of the hidden exploitability."""
    n = exploitability.size
    logit = -5.2 + 1.7 * exploitability + 0.25 * (cvss - 6.5) + 0.4 * network + rng.normal(0, 0.8, n)
    epss = np.round(1.0 / (1.0 + np.exp(-logit)), 5)
    # Fresh CVEs have no EPSS score yet.
    return np.where(rng.random(n) < _EPSS_NULL_RATE, np.nan, epss)


def _label(rng: np.random.Generator, ctx: dict[str, np.ndarray], exploitability: np.ndarray,
           cvss: np.ndarray, network: np.ndarray, c: _Concept) -> np.ndarray:
    """Draw exploited_30d from the logistic model ``c`` of the true features."""
    exposed = ctx["internet_exposed"]
    logit = (
        c.intercept
        + c.exploitability * exploitability
        + c.cvss * (cvss - 6.5)
        + c.network * network
        + c.exposed * exposed
        + c.exposed_network * exposed * network
        + c.criticality * ctx["asset_criticality"]
        + c.depth * ctx["dependency_depth"]
        + c.downloads * (ctx["downloads_log"] - 3.5)
        + c.recency * np.log1p(ctx["days_since_published"] / 30.0)
    )
    return (rng.random(exploitability.size) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int32)


# --- arrow ----------------------------------------------------------------------------------------


def _to_table(columns: dict[str, np.ndarray]) -> pa.Table:
    """Build the table in SCHEMA order; categoricals arrive as codes into CATEGORY_LEVELS."""
    arrays = []
    for field in SCHEMA:
        values = columns[field.name]
        if field.name in CATEGORY_LEVELS:
            arrays.append(pa.array(CATEGORY_LEVELS[field.name], pa.string()).take(values))
        else:
            arrays.append(pa.array(values, field.type, from_pandas=True))  # from_pandas: NaN -> null
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _overwrite(table: pa.Table, name: str, rows: np.ndarray, value: float) -> pa.Table:
    """Copy of ``table`` with ``value`` written into column ``name`` at ``rows``."""
    column = table.column(name).combine_chunks()
    data = column.to_numpy(zero_copy_only=False).copy()
    nulls = column.is_null().to_numpy(zero_copy_only=False).copy()
    data[rows] = value
    nulls[rows] = False
    return _set(table, name, pa.array(data, column.type, mask=nulls))


def _nullify(table: pa.Table, name: str, rows: np.ndarray) -> pa.Table:
    """Copy of ``table`` with column ``name`` null at ``rows``."""
    column = table.column(name).combine_chunks()
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[rows] = True
    return _set(table, name, pc.if_else(pa.array(mask), pa.scalar(None, column.type), column))


def _set(table: pa.Table, name: str, column: pa.Array) -> pa.Table:
    """Replace column ``name`` in place of the old one."""
    return table.set_column(table.schema.get_field_index(name), table.schema.field(name), column)
