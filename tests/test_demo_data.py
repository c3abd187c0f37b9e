"""Tests for the synthetic vulnerability findings (batchml.demo_data)."""

from __future__ import annotations

import datetime as dt

import duckdb
import lightgbm as lgb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from scipy.stats import rankdata

from batchml.demo.data import (
    CATEGORICAL,
    CATEGORY_LEVELS,
    LABEL,
    NUMERIC,
    generate_findings,
    generate_rows,
    inject_bad_rows,
)

START = dt.date(2024, 3, 4)  # a Monday
DAYS = 60
SHIFT_DAY = DAYS * 2 // 3

SQL_TYPES = {
    "finding_id": "BIGINT",
    "found_at": "TIMESTAMP",
    "ingested_at": "TIMESTAMP",
    "cvss_base": "DOUBLE",
    "epss": "DOUBLE",
    "days_since_published": "DOUBLE",
    "dependency_depth": "INTEGER",
    "downloads_log": "DOUBLE",
    "n_references": "INTEGER",
    "ecosystem": "VARCHAR",
    "severity": "VARCHAR",
    "attack_vector": "VARCHAR",
    "internet_exposed": "INTEGER",
    "asset_criticality": "VARCHAR",
    "exploited_30d": "INTEGER",
    "label_at": "TIMESTAMP",
}


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return generate_findings(START, DAYS, seed=7)


@pytest.fixture(scope="module")
def findings(table: pa.Table) -> pl.DataFrame:
    """The findings with ``day``: days since START of found_at."""
    day = (pl.col("found_at").dt.date() - pl.lit(START)).dt.total_days()
    return pl.from_arrow(table).with_columns(day=day)


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Rank-based ROC AUC (Mann-Whitney U), ties counted half."""
    ranks = rankdata(score)
    positives = int(y.sum())
    negatives = len(y) - positives
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def feature_matrix(df: pl.DataFrame) -> np.ndarray:
    """Numeric features as they are; categoricals as their index in CATEGORY_LEVELS."""
    codes = [pl.col(c).cast(pl.Enum(CATEGORY_LEVELS[c])).to_physical() for c in CATEGORICAL]
    return df.select([pl.col(c).cast(pl.Float64) for c in NUMERIC] + codes).to_numpy().astype(float)


def train(df: pl.DataFrame) -> lgb.Booster:
    """A small LightGBM model, like the one a job trains by default but fewer rounds."""
    categorical = list(range(len(NUMERIC), len(NUMERIC) + len(CATEGORICAL)))
    data = lgb.Dataset(feature_matrix(df), df[LABEL].to_numpy(), categorical_feature=categorical)
    params = {"objective": "binary", "num_leaves": 15, "learning_rate": 0.1, "verbose": -1, "seed": 1}
    return lgb.train(params, data, num_boost_round=50)


def holdout_auc(model: lgb.Booster, df: pl.DataFrame) -> float:
    """ROC AUC of ``model`` on the rows of ``df``."""
    return roc_auc(df[LABEL].to_numpy(), model.predict(feature_matrix(df)))


def broken(table: pa.Table) -> pl.DataFrame:
    """Rows a data contract must quarantine (null id/time, cvss out of range, non-finite epss)."""
    return pl.from_arrow(table).filter(
        pl.col("finding_id").is_null()
        | pl.col("found_at").is_null()
        | ~pl.col("cvss_base").is_between(0, 10)
        | pl.col("epss").is_infinite()
    )


# --- shape ----------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_table(table):
    assert generate_findings(START, DAYS, seed=7).equals(table)
    assert not generate_findings(START, DAYS, seed=8).equals(table)


def test_columns_and_sql_types(table):
    con = duckdb.connect()
    con.register("findings", table)
    described = con.sql("DESCRIBE SELECT * FROM findings").fetchall()
    assert {name: sql_type for name, sql_type, *_ in described} == SQL_TYPES
    assert table.column_names == list(SQL_TYPES)
    assert set(NUMERIC + CATEGORICAL + [LABEL]) <= set(table.column_names)


def test_values_stay_in_their_ranges(findings):
    f = findings
    assert f["cvss_base"].is_between(0, 10).all()
    assert ((f["cvss_base"] * 10).round(6) % 1 == 0).all(), "cvss_base has one decimal"
    assert f["epss"].drop_nulls().is_between(0, 1).all()
    assert 0.01 < f["epss"].null_count() / len(f) < 0.06
    assert f["epss"].median() < 0.05, "epss is heavy-tailed: most values tiny"
    assert (f["days_since_published"] >= 0).all()
    assert f["dependency_depth"].is_between(0, 10).all()
    assert set(f["internet_exposed"].unique()) == {0, 1}
    assert set(f[LABEL].unique()) == {0, 1}
    for column, levels in CATEGORY_LEVELS.items():
        assert set(f[column].unique()) == set(levels), column
    assert f.drop("epss").null_count().sum_horizontal().item() == 0


def test_severity_follows_cvss_bands(findings):
    band = (
        pl.when(pl.col("cvss_base") >= 9).then(pl.lit("critical"))
        .when(pl.col("cvss_base") >= 7).then(pl.lit("high"))
        .when(pl.col("cvss_base") >= 4).then(pl.lit("medium"))
        .otherwise(pl.lit("low"))
    )
    assert (findings["severity"] == findings.select(band).to_series()).all()


def test_ids_are_unique_and_increase_with_found_at(findings):
    assert findings["finding_id"].is_unique().all()
    assert (findings["finding_id"].diff().drop_nulls() > 0).all()
    assert findings["found_at"].is_sorted()


def test_rows_per_day_vary_and_dip_on_weekends(findings):
    per_day = findings.group_by("day").len()
    assert per_day.height == DAYS
    assert 360 < per_day["len"].mean() < 440
    weekend = findings.filter(pl.col("found_at").dt.weekday() >= 6).height / 2
    weekday = findings.filter(pl.col("found_at").dt.weekday() <= 5).height / 5
    assert weekend < 0.7 * weekday


# --- time -----------------------------------------------------------------------------------------


def test_ingested_after_found_and_before_next_morning(findings):
    next_morning = pl.col("found_at").dt.truncate("1d") + pl.duration(days=1, hours=6)
    checks = findings.select(
        after=(pl.col("ingested_at") > pl.col("found_at")).all(),
        before=(pl.col("ingested_at") < next_morning).all(),
        labelled=(pl.col("label_at") == pl.col("found_at") + pl.duration(days=30)).all(),
    )
    assert checks.row(0) == (True, True, True)
    assert findings["day"].min() == 0 and findings["day"].max() == DAYS - 1


# --- label and shift ------------------------------------------------------------------------------


def test_base_rate(findings):
    assert 0.05 <= findings[LABEL].mean() <= 0.15


def test_shift_changes_the_scanner_and_the_mix(findings):
    before = findings.filter(pl.col("day") < SHIFT_DAY)
    after = findings.filter(pl.col("day") >= SHIFT_DAY)
    assert after["cvss_base"].mean() - before["cvss_base"].mean() > 0.5
    assert after["n_references"].mean() / before["n_references"].mean() > 1.3
    go_cargo = pl.col("ecosystem").is_in(["go", "cargo"]).mean()
    assert after.select(go_cargo).item() - before.select(go_cargo).item() > 0.2


def test_negative_shift_day_disables_the_shift():
    f = pl.from_arrow(generate_findings(START, DAYS, seed=7, shift_day=-1))
    halves = f.with_columns(late=pl.col("found_at") >= pl.lit(START + dt.timedelta(days=SHIFT_DAY)))
    means = halves.group_by("late").agg(pl.col("cvss_base").mean())["cvss_base"]
    assert abs(means[0] - means[1]) < 0.15


def test_lightgbm_learns_the_label(findings):
    model = train(findings.filter(pl.col("day") <= 40))
    assert holdout_auc(model, findings.filter(pl.col("day").is_between(41, 50))) >= 0.75


def test_retrained_model_beats_the_old_champion_after_the_shift():
    days, shift = 120, 60
    # Labels arrive 30 days late, so 120 days leave 40 days of labelled post-shift rows.
    f = pl.from_arrow(generate_findings(START, days, seed=7, shift_day=shift))
    f = f.with_columns(day=(pl.col("found_at").dt.date() - pl.lit(START)).dt.total_days())
    champion = train(f.filter(pl.col("day") < shift))
    challenger = train(f.filter(pl.col("day").is_between(shift - 30, 99)))
    holdout = f.filter(pl.col("day") >= 100)
    assert holdout_auc(challenger, holdout) > holdout_auc(champion, holdout) + 0.005


# --- generate_rows --------------------------------------------------------------------------------


def test_generate_rows_spreads_n_rows_over_30_days(table):
    start = dt.datetime(2024, 1, 1)
    rows = generate_rows(5_000, seed=3, start=start)
    assert rows.schema == table.schema
    assert rows.num_rows == 5_000
    assert rows["finding_id"].to_pylist() == list(range(1, 5_001))
    found = pl.from_arrow(rows)["found_at"]
    assert found.min() >= start and found.max() < start + dt.timedelta(days=30)
    assert generate_rows(5_000, seed=3, start=start).equals(rows)


# --- inject_bad_rows ------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.1])
def test_inject_bad_rows_corrupts_the_requested_count(table, fraction):
    dirty = inject_bad_rows(table, fraction, seed=1)
    assert dirty.schema == table.schema
    assert broken(dirty).height == round(fraction * table.num_rows)
    assert broken(table).height == 0, "the input is left untouched"


def test_inject_bad_rows_cycles_through_every_kind(table):
    bad = broken(inject_bad_rows(table, 0.05, seed=1))
    kinds = bad.select(
        too_high=(pl.col("cvss_base") == 11.5).sum(),
        negative=(pl.col("cvss_base") == -1).sum(),
        inf_epss=pl.col("epss").is_infinite().sum(),
        null_id=pl.col("finding_id").is_null().sum(),
        null_time=pl.col("found_at").is_null().sum(),
    ).row(0)
    assert sum(kinds) == bad.height, "one kind per corrupted row"
    assert max(kinds) - min(kinds) <= 1


def test_inject_bad_rows_keeps_the_other_rows(table):
    dirty = pl.from_arrow(inject_bad_rows(table, 0.1, seed=1))
    clean = pl.from_arrow(table)
    unchanged = clean.join(dirty, on=clean.columns, how="semi", nulls_equal=True)
    assert unchanged.height == table.num_rows - round(0.1 * table.num_rows)
