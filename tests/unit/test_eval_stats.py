"""Bootstrap intervals and the paired bootstrap test: parity with a naive loop, coverage, power and size."""

import math

import numpy as np
import pytest

from mmalign.evaluation.pope import POPE_METRICS, pope_columns
from mmalign.evaluation.stats import bootstrap, paired_bootstrap, point_estimates, ratio

MEAN = {"mean": lambda s: ratio(s["x"], s["one"])}


def _cols(x):
    x = np.asarray(x, dtype=float)
    return {"x": x, "one": np.ones_like(x)}


def test_ratio_is_nan_on_zero_denominator():
    out = ratio(np.array([1.0, 0.0, 2.0]), np.array([2.0, 0.0, 0.0]))
    assert out[0] == 0.5 and math.isnan(out[1]) and math.isnan(out[2])


def test_bootstrap_matches_naive_loop_over_resampled_records():
    rng = np.random.default_rng(3)
    truth = rng.choice(["yes", "no"], 40).tolist()
    parsed = rng.choice(["yes", "no"], 40).tolist()
    got = bootstrap(pope_columns(parsed, truth), POPE_METRICS, n_boot=300, seed=11)
    # naive: the same index stream, one replicate at a time, metrics recomputed from resampled records
    draw = np.random.default_rng(11)
    reps = {name: [] for name in POPE_METRICS}
    for _ in range(300):
        idx = draw.integers(0, 40, size=40)
        m = point_estimates(pope_columns([parsed[i] for i in idx], [truth[i] for i in idx]), POPE_METRICS)
        for name in reps:
            reps[name].append(m[name])
    for name, values in reps.items():
        values = np.array(values)
        low, high = np.percentile(values[~np.isnan(values)], [2.5, 97.5])
        assert got[name].ci_low == pytest.approx(low) and got[name].ci_high == pytest.approx(high)
        assert got[name].n == 40


def test_bootstrap_interval_covers_true_value_at_nominal_rate():
    rng = np.random.default_rng(0)
    covered, widths = 0, []
    for trial in range(200):
        x = rng.random(400) < 0.3
        ci = bootstrap(_cols(x), MEAN, n_boot=300, seed=trial)["mean"]
        covered += ci.ci_low <= 0.3 <= ci.ci_high
        widths.append(ci.ci_high - ci.ci_low)
    assert 0.90 <= covered / 200 <= 0.99
    # normal-theory width 2 * 1.96 * sqrt(0.3 * 0.7 / 400) = 0.0898
    assert np.mean(widths) == pytest.approx(0.0898, rel=0.08)


def test_bootstrap_is_deterministic_for_a_seed():
    x = np.random.default_rng(1).random(100) < 0.5
    assert bootstrap(_cols(x), MEAN, n_boot=100, seed=5) == bootstrap(_cols(x), MEAN, n_boot=100, seed=5)
    assert bootstrap(_cols(x), MEAN, n_boot=100, seed=5) != bootstrap(_cols(x), MEAN, n_boot=100, seed=6)


def test_paired_test_detects_a_real_difference():
    rng = np.random.default_rng(7)
    u = rng.random(1000)
    a, b = u < 0.80, u < 0.72   # model a is right on every sample b gets right, and on 8% more
    res = paired_bootstrap(_cols(a), _cols(b), MEAN, n_boot=1000, seed=0)["mean"]
    assert res.diff == pytest.approx(a.mean() - b.mean())
    assert 0.0 < res.ci_low < res.diff < res.ci_high
    assert res.p_value < 0.01


def test_paired_test_keeps_its_size_under_the_null():
    rng = np.random.default_rng(8)
    rejections = 0
    for trial in range(100):
        a, b = rng.random(300) < 0.75, rng.random(300) < 0.75   # same accuracy, independent errors
        res = paired_bootstrap(_cols(a), _cols(b), MEAN, n_boot=200, seed=trial)["mean"]
        rejections += res.p_value < 0.05
    assert rejections <= 10
    same = rng.random(300) < 0.6
    res = paired_bootstrap(_cols(same), _cols(same), MEAN, n_boot=200, seed=0)["mean"]
    assert res.diff == 0.0 and res.p_value == 1.0 and res.ci_low == res.ci_high == 0.0


def test_mismatched_samples_are_rejected():
    with pytest.raises(ValueError, match="same samples"):
        paired_bootstrap(_cols([1, 0]), _cols([1, 0, 1]), MEAN)
