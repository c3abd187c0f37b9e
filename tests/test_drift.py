"""Tests for batchml.drift: agreement with scipy, PSI by hand, serialisation, streaming, failures,
and power / false-alarm rates at the default thresholds.

Measured rates (20 seeds 0..19, reference 20k rows, current 5k rows; "false alarm" = any of the
3 features flagged on identically distributed data):
    default psi (numeric & categorical)      0.5 sd mean shift 100 %   category mix change 100 %   false alarm 0 %
    ks / chi2 two-sample (p < 0.01)          100 %                     100 %                       5 % (1 seed of 20)
    wasserstein (0.1) / jensen_shannon (0.1) 100 %                     100 %                       0 %
The 0.5 sd shift gives PSI 0.21-0.28 over the seeds, only just above 0.2: a 0.25 sd shift is caught
by psi in 0 % of seeds (ks: 100 %); the mix change (leading level 50 % -> 30 %) gives PSI 0.22-0.29,
a milder one (50 -> 35 %, PSI about 0.16) is caught by psi in 0 % and by chi2 in 100 %. That is the
intended trade: psi flags shifts big enough to matter, not every detectable one.
chi2 false alarms at p < 0.01 with equal sizes (400 seeds): two-sample 1.0 %, Evidently-style goodness of fit 12.8 %.
The same figures are recomputed on every run and appear in the assertion messages.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from scipy.spatial import distance

from batchml.config import DriftConfig
from batchml.monitoring.drift import (
    MISSING_LABEL,
    SCORE_FEATURE,
    UNSEEN_LABEL,
    CurrentAccumulator,
    DriftReport,
    ReferenceProfile,
    build_profile,
    chi2_two_sample,
    compute_drift,
    current_sample_size,
    domain_classifier_auc,
    jensen_shannon,
    ks_2sample,
    psi,
    wasserstein_normed,
)
from batchml.errors import ModelError

SEEDS = range(20)
LEVELS = np.array(["npm", "pypi", "maven", "go"], dtype=object)
MIX = [0.5, 0.3, 0.15, 0.05]
SHIFTED_MIX = [0.3, 0.3, 0.25, 0.15]  # psi 0.26: the leading level loses 20 points


def make_frame(rng: np.random.Generator, n: int, *, shift: float = 0.0, mix: list[float] = MIX) -> tuple[dict, dict]:
    """Three features as a nightly batch would hold them: a normal, a skewed one with gaps, a category."""
    skewed = rng.lognormal(0.0, 1.0, n)
    skewed[rng.random(n) < 0.05] = np.nan
    numeric = {"cvss": rng.normal(5.0 + shift * 2.0, 2.0, n), "downloads": skewed}
    return numeric, {"ecosystem": rng.choice(LEVELS, n, p=mix)}


def drift_of(seed: int, configs: dict[str, DriftConfig], **current_change) -> dict[str, DriftReport]:
    """Reference 20k rows vs current 5k rows of ``make_frame``, one report per config."""
    rng = np.random.default_rng(seed)
    profile = build_profile(*make_frame(rng, 20_000), seed=seed)
    current = CurrentAccumulator(profile, seed=seed)
    current.update(*make_frame(rng, 5_000, **current_change))
    return {name: compute_drift(profile, current, config) for name, config in configs.items()}


def flagged(report: DriftReport, feature: str | None = None) -> bool:
    rows = [r for r in report.results if r.kind == "feature" and feature in (None, r.feature)]
    assert all(r.error is None for r in rows), [r.error for r in rows]
    return any(r.drifted for r in rows)


# --- the statistics agree with scipy ----------------------------------------------------------------


@pytest.mark.parametrize(("n_ref", "n_cur", "shift"), [(50, 40, 0.3), (10_000, 5_000, 0.0), (20_000, 100_000, 0.05)])
def test_ks_matches_scipy(n_ref: int, n_cur: int, shift: float) -> None:
    rng = np.random.default_rng(n_ref)
    ref, cur = rng.normal(size=n_ref), rng.normal(shift, 1.0, n_cur)
    expected = stats.ks_2samp(ref, cur)
    ref_with_gaps = np.append(ref, [np.nan, np.inf])  # missing values are ignored, not compared
    assert ks_2sample(ref_with_gaps, cur) == pytest.approx((expected.statistic, expected.pvalue), abs=1e-9, rel=1e-9)


def test_chi2_matches_scipy_contingency() -> None:
    rng = np.random.default_rng(7)
    ref = rng.multinomial(20_000, [0.4, 0.3, 0.2, 0.1, 0.0])
    cur = rng.multinomial(3_000, [0.38, 0.33, 0.19, 0.1, 0.0])
    table = np.vstack([ref, cur])[:, :4]  # scipy refuses the all-zero column; ours drops it
    statistic, p_value, dof, _ = stats.chi2_contingency(table, correction=False)
    assert chi2_two_sample(ref, cur) == pytest.approx((statistic, p_value, dof), abs=1e-9, rel=1e-9)
    assert chi2_two_sample([5, 0], [7, 0]) == (0.0, 1.0, 0)


def test_jensen_shannon_and_wasserstein_match_scipy() -> None:
    rng = np.random.default_rng(3)
    ref_counts, cur_counts = rng.integers(0, 500, 12), rng.integers(0, 500, 12)
    assert jensen_shannon(ref_counts, cur_counts) == pytest.approx(distance.jensenshannon(ref_counts, cur_counts, base=2), abs=1e-9)
    ref, cur = rng.gamma(2.0, 3.0, 8_000), rng.gamma(2.2, 3.0, 3_000)
    expected = stats.wasserstein_distance(ref, cur) / np.std(ref)
    assert wasserstein_normed(ref, cur) == pytest.approx(expected, abs=1e-9)
    assert wasserstein_normed(ref, cur, ref_std=2.0) == pytest.approx(stats.wasserstein_distance(ref, cur) / 2.0, abs=1e-9)


# --- PSI by hand ------------------------------------------------------------------------------------


def test_psi_by_hand_on_counts() -> None:
    # proportions: reference .1 .3 .6 0 (the empty bin becomes eps = 1e-4), current .2 .3 .4 .1
    expected = (0.2 - 0.1) * math.log(2) + 0 + (0.4 - 0.6) * math.log(0.4 / 0.6) + (0.1 - 1e-4) * math.log(0.1 / 1e-4)
    assert psi([10, 30, 60, 0], [20, 30, 40, 10]) == pytest.approx(expected, rel=1e-12)
    assert psi([10, 30, 60, 0], [10, 30, 60, 0]) == 0.0


def test_psi_through_reference_bins_by_hand() -> None:
    # Reference 1..10 in 2 quantile bins: the edge is the median value 5, so (-inf, 5) and [5, inf).
    profile = build_profile({"x": np.arange(1.0, 11.0)}, {}, bins=2)
    current = CurrentAccumulator(profile)
    current.update({"x": np.array([1.0, 2.0, 3.0, 7.0, np.nan])}, {})
    result = compute_drift(profile, current, DriftConfig()).results[0]
    # reference .4 .6 0 (missing, so eps); current 3/5 1/5 1/5
    expected = (0.6 - 0.4) * math.log(0.6 / 0.4) + (0.2 - 0.6) * math.log(0.2 / 0.6) + (0.2 - 1e-4) * math.log(0.2 / 1e-4)
    assert result.statistic == pytest.approx(expected, rel=1e-12)
    assert result.histogram == {"labels": ["(-inf, 5)", "[5, inf)", MISSING_LABEL],
                                "reference": [0.4, 0.6, 0.0], "current": [0.6, 0.2, 0.2]}


def test_bins_are_closed_below_and_discrete_features_get_fewer() -> None:
    profile = build_profile({"depth": np.repeat([0.0, 1.0, 2.0, 5.0], [50, 30, 15, 5])}, {})
    ref = profile.numeric["depth"]
    assert ref.edges.tolist() == [0.0, 1.0, 2.0]  # the 9 deciles of this data collapse to 3 edges
    assert ref.counts.tolist() == [0, 50, 30, 20]
    current = CurrentAccumulator(profile)
    current.update({"depth": np.array([-1.0, 0.0, 1.0, 1.5, 2.0, 9.0])}, {})
    assert current.numeric["depth"].counts.tolist() == [1, 1, 2, 2]


# --- serialisation and streaming --------------------------------------------------------------------


def test_profile_round_trips_through_json() -> None:
    rng = np.random.default_rng(11)
    numeric, categorical = make_frame(rng, 3_000)
    categorical["ecosystem"][:10] = None
    profile = build_profile(numeric, categorical, scores=rng.random(800), sample_size=500)
    text = json.dumps(profile.to_dict(), allow_nan=False)  # strict JSON: NaN in the sample became null
    loaded = ReferenceProfile.from_dict(json.loads(text))
    assert loaded.to_dict() == profile.to_dict()
    current = CurrentAccumulator(loaded)
    current.update(*make_frame(rng, 1_000, shift=0.2), scores=rng.random(1_000))
    config = DriftConfig(numeric_method="ks")
    assert compute_drift(loaded, current, config).to_rows() == compute_drift(profile, current, config).to_rows()
    with pytest.raises(ModelError, match="reference profile is unreadable"):
        ReferenceProfile.from_dict({**profile.to_dict(), "numeric": {"cvss": {"edges": [1.0], "counts": [1]}}})


@pytest.mark.parametrize("case", ["spread", "offset", "constant", "gaps"])
def test_streamed_moments_match_numpy_where_the_shortcut_would_cancel(case: str) -> None:
    rng = np.random.default_rng(11)
    values = {"spread": rng.normal(5.0, 2.0, 20_000),
              "offset": 1.7e9 + rng.normal(0.0, 3.0, 20_000),  # epoch seconds: sum(x²) - n·mean² would lose every digit
              "constant": np.full(20_000, 0.1),
              "gaps": np.where(rng.random(20_000) < 0.1, np.nan, rng.lognormal(0.0, 1.0, 20_000))}[case]
    if case == "gaps":
        values[::1000] = np.inf  # infinite values count as missing too
    profile = build_profile({"x": values[:5_000]}, {})
    current = CurrentAccumulator(profile, sample_size=0)
    for lo in range(0, values.size, 3_000):
        current.update({"x": values[lo:lo + 3_000]}, {})
    finite = values[np.isfinite(values)]
    counts = current.numeric["x"]
    assert counts.present == finite.size and counts.missing == values.size - finite.size
    assert counts.mean == pytest.approx(finite.mean(), rel=1e-12)
    assert counts.std == pytest.approx(finite.std(), rel=1e-9, abs=1e-12)


def test_streaming_in_uneven_batches_equals_one_batch() -> None:
    rng = np.random.default_rng(5)
    profile = build_profile(*make_frame(rng, 10_000), scores=rng.random(2_000))
    numeric, categorical = make_frame(rng, 12_345, shift=0.1, mix=SHIFTED_MIX)
    categorical["ecosystem"][::97] = "cargo"  # unseen in the reference
    scores = rng.random(12_345)
    whole, pieces = CurrentAccumulator(profile, sample_size=3_000), CurrentAccumulator(profile, sample_size=3_000)
    whole.update(numeric, categorical, scores)
    cuts = [0, 1, 700, 701, 4_000, 9_999, 12_000, 12_345]  # 7 uneven batches, one of a single row
    for lo, hi in zip(cuts, cuts[1:]):
        pieces.update({k: v[lo:hi] for k, v in numeric.items()}, {k: v[lo:hi] for k, v in categorical.items()}, scores[lo:hi])
    for name in numeric:
        assert pieces.numeric[name].counts.tolist() == whole.numeric[name].counts.tolist()
        assert pieces.numeric[name].missing == whole.numeric[name].missing
        assert pieces.numeric[name].mean == pytest.approx(whole.numeric[name].mean, rel=1e-12)
        assert pieces.numeric[name].std == pytest.approx(whole.numeric[name].std, rel=1e-12)
    a, b = pieces.categorical["ecosystem"], whole.categorical["ecosystem"]
    assert (a.counts.tolist(), a.unseen, a.missing) == (b.counts.tolist(), b.unseen, b.missing)
    assert a.unseen == {"cargo": 128}
    np.testing.assert_array_equal(pieces.sample(), whole.sample())
    for method in ("psi", "ks", "wasserstein", "jensen_shannon"):
        config = DriftConfig(numeric_method=method, categorical_method="chi2")
        assert compute_drift(profile, pieces, config).to_rows() == compute_drift(profile, whole, config).to_rows()


def test_partitions_tallied_apart_and_merged_equal_one_pass() -> None:
    """The Dask engine tallies each partition on its own worker (pickled back) and merges: counts
    are sums, so PSI, chi² and JS equal one pass; under ``sample_size`` rows the sample holds every
    row, so ks and wasserstein are equal too (beyond it the merged sample is a uniform one)."""
    import pickle

    rng = np.random.default_rng(6)
    profile = build_profile(*make_frame(rng, 10_000), scores=rng.random(2_000))
    numeric, categorical = make_frame(rng, 9_000, shift=0.1, mix=SHIFTED_MIX)
    categorical["ecosystem"][::50] = "cargo"
    scores = rng.random(9_000)
    whole = CurrentAccumulator(profile)
    whole.update(numeric, categorical, scores)
    parts = []
    for seed, rows in enumerate(np.array_split(rng.permutation(9_000), 3), start=1):
        part = CurrentAccumulator(profile, seed=seed)
        part.update({k: v[rows] for k, v in numeric.items()}, {k: v[rows] for k, v in categorical.items()}, scores[rows])
        parts.append(pickle.loads(pickle.dumps(part)))
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.rows == whole.rows == 9_000
    for name in numeric:
        assert merged.numeric[name].counts.tolist() == whole.numeric[name].counts.tolist()
        assert merged.numeric[name].std == pytest.approx(whole.numeric[name].std, rel=1e-12)
    assert merged.categorical["ecosystem"].unseen == whole.categorical["ecosystem"].unseen == {"cargo": 180}
    for numeric_method, categorical_method in (("psi", "chi2"), ("jensen_shannon", "psi"), ("ks", "jensen_shannon"), ("wasserstein", "chi2")):
        config = DriftConfig(numeric_method=numeric_method, categorical_method=categorical_method)
        for ours, theirs in zip(compute_drift(profile, merged, config).to_rows(), compute_drift(profile, whole, config).to_rows()):
            assert (ours["feature"], ours["drifted"], ours["n_current"]) == (theirs["feature"], theirs["drifted"], theirs["n_current"])
            assert ours["statistic"] == pytest.approx(theirs["statistic"], abs=1e-9)


def test_a_suite_that_reads_no_sample_gives_the_same_report_without_one():
    """The nightly run samples the current rows only when a method reads the sample (ks,
    wasserstein, the domain classifier): for every other suite the report of an unsampled tally
    equals the sampled one's, row for row, and a sampling suite gets a sample size."""
    rng = np.random.default_rng(8)
    profile = build_profile(*make_frame(rng, 10_000), scores=rng.random(2_000))
    numeric, categorical = make_frame(rng, 6_000, shift=0.3, mix=SHIFTED_MIX)
    scores = rng.random(6_000)
    for numeric_method in ("psi", "jensen_shannon", "ks", "wasserstein"):
        for categorical_method, multivariate in (("psi", False), ("chi2", False), ("jensen_shannon", True)):
            config = DriftConfig(numeric_method=numeric_method, categorical_method=categorical_method, multivariate=multivariate)
            sampled = CurrentAccumulator(profile)
            unsampled = CurrentAccumulator(profile, sample_size=current_sample_size(config))
            for tally in (sampled, unsampled):
                tally.update(numeric, categorical, scores)
            if numeric_method in ("ks", "wasserstein") or multivariate:
                assert current_sample_size(config) > 0 and unsampled.sample().shape == (6_000, 2)
                continue
            assert current_sample_size(config) == 0 and unsampled.sample().shape == (0, 2)
            assert compute_drift(profile, unsampled, config).to_rows() == compute_drift(profile, sampled, config).to_rows()


# --- unseen levels, missing values, failures --------------------------------------------------------


def test_unseen_levels_and_missing_values_are_counted() -> None:
    profile = build_profile({"epss": np.linspace(0, 1, 1_000)}, {"ecosystem": np.array(["npm"] * 600 + ["pypi"] * 400, dtype=object)})
    current = CurrentAccumulator(profile)
    levels = np.array(["npm"] * 50 + ["pypi"] * 30 + ["cargo"] * 15 + ["nuget"] * 5 + [None] * 20 + [float("nan")] * 5, dtype=object)
    epss = np.concatenate([np.linspace(0, 1, 100), [np.nan] * 20, [np.inf] * 5])
    current.update({"epss": epss}, {"ecosystem": levels})
    # 125 rows: below the default drift.min_rows, which would flag nothing; here the flags are under test
    rows = {(r.feature, r.kind): r for r in compute_drift(profile, current, DriftConfig(min_rows=1)).results}
    unseen = rows["ecosystem", "unseen_levels"]
    assert (unseen.statistic, unseen.n_current, unseen.drifted) == (pytest.approx(0.2), 100, True)
    assert unseen.histogram["labels"] == ["cargo", "nuget"]
    histogram = rows["ecosystem", "feature"].histogram
    assert histogram["labels"] == ["npm", "pypi", UNSEEN_LABEL, MISSING_LABEL]
    assert histogram["current"] == pytest.approx([50 / 125, 30 / 125, 20 / 125, 25 / 125])
    assert rows["ecosystem", "missing_rate"].statistic == pytest.approx(25 / 125)
    assert rows["epss", "missing_rate"].statistic == pytest.approx(25 / 125)  # ±inf counts as missing
    assert rows["epss", "missing_rate"].drifted


def test_failing_methods_record_an_error_never_nan() -> None:
    profile = build_profile({"constant": np.full(500, 3.0), "cvss": np.linspace(0, 10, 500)}, {"ecosystem": np.array(["npm"] * 500, dtype=object)})
    report = compute_drift(profile, CurrentAccumulator(profile), DriftConfig(numeric_method="wasserstein"))  # nothing streamed
    assert all(r.error for r in report.results), [r for r in report.results if not r.error]
    current = CurrentAccumulator(profile)
    current.update({"constant": np.full(100, 3.0), "cvss": np.full(100, np.nan)}, {"ecosystem": np.array(["npm"] * 100, dtype=object)},
                   scores=np.random.default_rng(0).random(100))
    rows = {(r.feature, r.kind): r for r in compute_drift(profile, current, DriftConfig(numeric_method="wasserstein")).results}
    assert "reference std is 0.0" in rows["constant", "feature"].error
    assert rows["cvss", "feature"].error == "no current values"
    assert "no score distribution" in rows[SCORE_FEATURE, "prediction"].error
    for row in rows.values():
        if row.error:
            assert (row.statistic, row.p_value, row.drifted) == (None, None, False)
    for row in compute_drift(profile, current, DriftConfig(numeric_method="ks")).to_rows():
        assert not any(isinstance(v, float) and math.isnan(v) for v in row.values())


def test_update_rejects_batches_that_do_not_match_the_profile() -> None:
    profile = build_profile({"cvss": np.arange(10.0)}, {})
    with pytest.raises(ValueError, match="missing: \\['cvss'\\]"):
        CurrentAccumulator(profile).update({}, {})
    with pytest.raises(ValueError, match="same length"):
        CurrentAccumulator(profile).update({"cvss": np.arange(3.0)}, {}, scores=np.arange(4.0))


# --- report shape, thresholds, prediction and multivariate drift ------------------------------------


def drift_table_columns() -> set[str]:
    """The columns of batchml.drift as the warehouse creates it: a report row must fill all but the run's own."""
    import duckdb

    from batchml.storage.warehouse import migrate

    con = duckdb.connect()
    try:
        migrate(con)
        return {name for (name,) in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'batchml' AND table_name = 'drift'").fetchall()}
    finally:
        con.close()


def test_report_rows_thresholds_and_dataset_drift() -> None:
    rng = np.random.default_rng(2)
    numeric, categorical = make_frame(rng, 20_000)
    profile = build_profile(numeric, categorical, scores=rng.beta(2, 5, 5_000))
    current = CurrentAccumulator(profile)
    current.update(*make_frame(rng, 5_000, shift=0.5), scores=rng.beta(3, 4, 5_000))
    report = compute_drift(profile, current, DriftConfig(thresholds={"downloads": 1e-6}, dataset_drift_share=0.6))
    rows = {(r["feature"], r["kind"]): r for r in report.to_rows()}
    assert set(rows["cvss", "feature"]) == drift_table_columns() - {"run_id", "job", "model_version", "computed_at"}
    assert json.loads(rows["cvss", "feature"]["histogram"])["labels"][0].startswith("(-inf, ")
    assert rows["downloads", "feature"]["threshold"] == 1e-6 and rows["downloads", "feature"]["drifted"]
    assert rows[SCORE_FEATURE, "prediction"]["drifted"]
    assert (report.feature_count, report.drifted_count, report.dataset_drift) == (3, 2, True)
    json.dumps(report.to_rows(), allow_nan=False)  # plain values only, ready for the warehouse


def test_domain_classifier_sees_a_change_in_correlation_that_marginals_miss() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6_000, 2))
    reference = np.column_stack([x[:, 0], x[:, 0] + 0.3 * x[:, 1]])
    same = np.column_stack([x[:3_000, 1], x[:3_000, 1] + 0.3 * rng.normal(size=3_000)])
    flipped = np.column_stack([x[3_000:, 0], -x[3_000:, 0] + 0.3 * x[3_000:, 1]])  # same marginals, sign flipped
    assert abs(domain_classifier_auc(reference, same, seed=0) - 0.5) < 0.05
    assert domain_classifier_auc(reference, flipped, seed=0) > 0.9
    profile = build_profile({"a": reference[:, 0], "b": reference[:, 1]}, {})
    current = CurrentAccumulator(profile)
    current.update({"a": flipped[:, 0], "b": flipped[:, 1]}, {})
    rows = compute_drift(profile, current, DriftConfig(multivariate=True)).results
    assert [r.drifted for r in rows if r.kind == "feature"] == [False, False]
    assert rows[-1].kind == "multivariate" and rows[-1].drifted


# --- power and false alarms at the default thresholds -----------------------------------------------


CONFIGS = {"psi (default)": DriftConfig(), "ks / chi2": DriftConfig(numeric_method="ks", categorical_method="chi2"),
           "wasserstein / jensen_shannon": DriftConfig(numeric_method="wasserstein", categorical_method="jensen_shannon")}


@pytest.fixture(scope="module")
def rates() -> dict[str, dict[str, float]]:
    """Share of seeds flagged per method family: shifted numeric, changed category mix, no change."""
    scenarios = {"power_shift": ({"shift": 0.5}, "cvss"), "power_mix": ({"mix": SHIFTED_MIX}, "ecosystem"), "false_alarm": ({}, None)}
    hits: dict[str, dict[str, list[bool]]] = {family: {s: [] for s in scenarios} for family in CONFIGS}
    for scenario, (change, feature) in scenarios.items():
        for seed in SEEDS:
            for family, report in drift_of(seed, CONFIGS, **change).items():
                hits[family][scenario].append(flagged(report, feature))
    return {family: {s: float(np.mean(h)) for s, h in by_scenario.items()} for family, by_scenario in hits.items()}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_power_and_false_alarm_rate(rates: dict[str, dict[str, float]], family: str, record_property) -> None:
    measured = rates[family]
    message = f"{family}: measured over {len(SEEDS)} seeds {measured}"
    record_property("rates", measured)  # lands in --junitxml output, no -s needed
    print(message)
    assert measured["power_shift"] >= 0.95, message
    assert measured["power_mix"] >= 0.95, message
    assert measured["false_alarm"] <= 0.05, message


def test_two_sample_chi2_keeps_its_level_where_goodness_of_fit_does_not() -> None:
    # Equal sizes on both sides: goodness of fit against reference proportions ignores the
    # reference's own noise, so its real false-alarm rate at p < 0.01 is several times 1 %.
    rng = np.random.default_rng(0)
    two_sample, goodness = [], []
    for _ in range(400):
        ref, cur = rng.multinomial(20_000, MIX), rng.multinomial(20_000, MIX)
        two_sample.append(chi2_two_sample(ref, cur)[1] < 0.01)
        goodness.append(stats.chisquare(cur, ref * cur.sum() / ref.sum()).pvalue < 0.01)
    message = f"false alarms at p<0.01: two-sample {np.mean(two_sample):.3f}, goodness of fit {np.mean(goodness):.3f}"
    print(message)
    assert np.mean(two_sample) <= 0.025, message
    assert np.mean(goodness) >= 2 * max(np.mean(two_sample), 0.01), message


def test_arrow_strings_are_counted_like_python_values() -> None:
    import pyarrow as pa

    profile = build_profile({"epss": np.linspace(0, 1, 1_000)}, {"ecosystem": np.array(["npm"] * 600 + ["pypi"] * 400, dtype=object)})
    values = ["npm"] * 50 + ["pypi"] * 30 + ["cargo"] * 15 + [None] * 20
    epss = np.linspace(0, 1, len(values))
    as_objects, as_arrow = CurrentAccumulator(profile), CurrentAccumulator(profile)
    as_objects.update({"epss": epss}, {"ecosystem": np.array(values, dtype=object)})
    as_arrow.update({"epss": epss}, {"ecosystem": pa.chunked_array([pa.array(values[:40]), pa.array(values[40:])])})
    a, b = as_arrow.categorical["ecosystem"], as_objects.categorical["ecosystem"]
    assert (a.counts.tolist(), a.unseen, a.missing) == (b.counts.tolist(), b.unseen, b.missing) == ([50, 30], {"cargo": 15}, 20)
