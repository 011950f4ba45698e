"""The bootstrap intervals against a hand computation, and paired differences."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ralign.world.stats import bootstrap_interval, compare_evaluations, paired_difference, pool_paired_runs, rate_with_interval


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


def _report(prompts_by_family: dict[str, tuple[list[str], list[float]]]) -> dict:
    return {"per_prompt": {f: {"prompts": p, "all_correct": v} for f, (p, v) in prompts_by_family.items()}}


def test_pooling_runs_averages_every_prompt_pair_and_resamples_within_each_run():
    # run 0: single +1 on one of two prompts, binding 0; run 1 (other prompts): single 0, binding +1 on both
    run0 = (_report({"single": (["a", "b"], [0.0, 1.0]), "binding": (["c", "d"], [0.0, 0.0])}),
            _report({"single": (["a", "b"], [1.0, 1.0]), "binding": (["c", "d"], [0.0, 0.0])}))
    run1 = (_report({"single": (["e", "f"], [1.0, 1.0]), "binding": (["g", "h"], [0.0, 0.0])}),
            _report({"single": (["e", "f"], [1.0, 1.0]), "binding": (["g", "h"], [1.0, 1.0])}))
    pooled = pool_paired_runs([run0, run1])
    assert pooled["families"]["single"]["diff"] == 0.25 and pooled["families"]["single"]["n"] == 4  # (1 + 0 + 0 + 0) / 4
    assert pooled["families"]["binding"]["diff"] == 0.5  # (0 + 0 + 1 + 1) / 4
    assert pooled["overall"]["diff"] == 0.375 and pooled["overall"]["n"] == 8
    # binding's per-run differences are constant (0 in run 0, 1 in run 1): resampling within runs leaves no spread,
    # where resampling the four pooled pairs freely would mix the runs
    assert pooled["families"]["binding"]["ci"] == [0.5, 0.5]
    # one run pooled alone is that run's paired comparison (compare_evaluations is that case)
    alone = pool_paired_runs([run0])
    assert alone["families"]["single"] == paired_difference([0.0, 1.0], [1.0, 1.0])
    assert alone["overall"] == paired_difference([0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], ["single"] * 2 + ["binding"] * 2)


def test_pooling_refuses_a_run_judged_on_different_prompts_after_training():
    good = (_report({"single": (["a"], [0.0])}), _report({"single": (["a"], [1.0])}))
    bad = (_report({"single": (["b"], [0.0])}), _report({"single": (["c"], [1.0])}))
    with pytest.raises(ValueError, match="different prompts"):
        pool_paired_runs([good, bad])
