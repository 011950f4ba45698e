"""The bootstrap intervals against a hand computation, and paired differences."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ralign.world.stats import bootstrap_interval, compare_evaluations, paired_difference, rate_with_interval


def exact_bootstrap_quantiles(values, level=0.95):
    """Every one of the n^n equally likely resamples, enumerated: the exact bootstrap distribution of the mean."""
    means = sorted(np.mean(c) for c in itertools.product(values, repeat=len(values)))
    tail = (1 - level) / 2
    return np.quantile(means, [tail, 1 - tail])


def test_bootstrap_interval_matches_the_enumerated_distribution():
    values = [0.0, 0.0, 1.0, 1.0, 1.0]
    lo, hi = bootstrap_interval(values, n_resamples=20000)
    exact_lo, exact_hi = exact_bootstrap_quantiles(values)
    assert (lo, hi) == pytest.approx((exact_lo, exact_hi), abs=0.2 + 1e-9)  # resample means move in steps of 0.2
    assert lo <= 0.6 <= hi
    assert bootstrap_interval([1.0] * 7) == (1.0, 1.0)  # no spread, no uncertainty


def test_stratified_resampling_keeps_each_family_whole():
    # two families, each constant: every stratified resample has the same mean, so the interval is a point
    values, strata = [0.0] * 10 + [1.0] * 10, ["a"] * 10 + ["b"] * 10
    assert bootstrap_interval(values, strata) == (0.5, 0.5)
    lo, hi = bootstrap_interval(values)  # unstratified: the mix itself varies
    assert lo < 0.5 < hi


def test_paired_difference_cancels_prompt_difficulty():
    rng = np.random.default_rng(1)
    difficulty = rng.random(200) < 0.5
    before = difficulty.astype(float)
    after = before.copy()
    after[:20] = 1.0  # 20 fixed prompts, a few of them newly correct
    change = paired_difference(before, after)
    assert change["diff"] == pytest.approx((after - before).mean())
    assert change["ci"][0] > 0  # paired: the improvement shows although the rates' own intervals overlap
    lo_b, hi_b = rate_with_interval(before)["ci"]
    lo_a, hi_a = rate_with_interval(after)["ci"]
    assert lo_a < hi_b


def test_compare_evaluations_refuses_different_prompts():
    a = {"per_prompt": {"single": {"prompts": ["x", "y"], "all_correct": [1.0, 0.0]}}}
    b = {"per_prompt": {"single": {"prompts": ["x", "z"], "all_correct": [1.0, 1.0]}}}
    with pytest.raises(ValueError, match="different prompts"):
        compare_evaluations(a, b)
    same = compare_evaluations(a, {"per_prompt": {"single": {"prompts": ["x", "y"], "all_correct": [1.0, 1.0]}}})
    assert same["families"]["single"]["diff"] == 0.5 and same["overall"]["n"] == 2
