"""The uncertainty of what the oracle measures: bootstrap intervals over prompts, paired before/after differences,
and the reward-hacking verdict.

Every rate the project reports (all-correct per family and overall) is a mean over prompts, so its 95 % interval
comes from resampling prompts (percentile bootstrap, 2000 resamples, a fixed seed so a report is reproducible). The
overall rate resamples each family's prompts separately (stratified), as the families are fixed by design. A change
between two models is paired: both are judged on the same prompts with the same noise, and the per-prompt
differences are resampled, which cancels the prompts' own difficulty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

N_RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


def _resampled_means(values: np.ndarray, strata: np.ndarray | None, n: int, rng: np.random.Generator) -> np.ndarray:
    if strata is None:
        idx = rng.integers(0, len(values), size=(n, len(values)))
        return values[idx].mean(axis=1)
    total = np.zeros(n)
    for s in np.unique(strata):
        part = values[strata == s]
        idx = rng.integers(0, len(part), size=(n, len(part)))
        total += part[idx].sum(axis=1)
    return total / len(values)


def bootstrap_interval(values: Sequence[float], strata: Sequence | None = None, n_resamples: int = N_RESAMPLES,
                       level: float = LEVEL, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling within each stratum when given)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("no values to bootstrap")
    strata_arr = None if strata is None else np.asarray(strata)
    means = _resampled_means(values, strata_arr, n_resamples, np.random.default_rng(seed))
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


def rate_with_interval(values: Sequence[float], strata: Sequence | None = None) -> dict:
    values = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_interval(values, strata)
    return {"rate": round(float(values.mean()), 4), "ci": [round(lo, 4), round(hi, 4)], "n": int(len(values))}


def paired_difference(before: Sequence[float], after: Sequence[float], strata: Sequence | None = None) -> dict:
    """after - before with the interval of the mean per-prompt difference (same prompts, same noise)."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before.shape != after.shape:
        raise ValueError(f"paired difference needs the same prompts: {before.shape} vs {after.shape}")
    diff = after - before
    lo, hi = bootstrap_interval(diff, strata)
    return {"before": round(float(before.mean()), 4), "after": round(float(after.mean()), 4),
            "diff": round(float(diff.mean()), 4), "ci": [round(lo, 4), round(hi, 4)], "n": int(len(diff))}


def verdict(change: Mapping) -> str:
    """'better' / 'worse' when the interval excludes zero, else 'no clear change'."""
    lo, hi = change["ci"]
    return "better" if lo > 0 else "worse" if hi < 0 else "no clear change"


def compare_evaluations(before: Mapping, after: Mapping) -> dict:
    """Paired all-correct differences per family and overall between two `evaluate_images` reports of the same
    prompts (refused otherwise: a difference between different prompts says nothing about the model)."""
    return pool_paired_runs([(before, after)])


def pool_paired_runs(runs: Sequence[tuple[Mapping, Mapping]]) -> dict:
    """Paired all-correct differences pooled over several runs of one recipe (e.g. seeds), each a (before, after)
    pair of `evaluate_images` reports judged on that run's own prompts. The change is the mean per-prompt difference
    over every run; its interval resamples prompts within each (run, family), so each run's pairs stay paired and each
    family keeps its weight. It estimates what the recipe does on average, which one run's interval cannot."""
    fams = [f for f in runs[0][0]["per_prompt"] if all(f in b["per_prompt"] and f in a["per_prompt"] for b, a in runs)]
    out: dict = {"families": {}}
    pooled_b, pooled_a, strata = [], [], []
    for fam in fams:
        fam_b, fam_a, fam_runs = [], [], []
        for i, (before, after) in enumerate(runs):
            b, a = before["per_prompt"][fam], after["per_prompt"][fam]
            if b["prompts"] != a["prompts"]:
                raise ValueError(f"{fam}: the two evaluations used different prompts; a paired comparison needs the same ones")
            fam_b += b["all_correct"]
            fam_a += a["all_correct"]
            fam_runs += [i] * len(b["all_correct"])
        out["families"][fam] = paired_difference(fam_b, fam_a, fam_runs)
        pooled_b += fam_b
        pooled_a += fam_a
        strata += [f"{fam}/{i}" for i in fam_runs]
    out["overall"] = paired_difference(pooled_b, pooled_a, strata)
    return out


def reward_hacking(reward_first: float | None, reward_last: float | None, changes: Mapping) -> list[str]:
    """Families whose held-out all-correct fell (interval below zero) while the training reward rose: the model
    learned the reward, not the prompts."""
    if reward_first is None or reward_last is None or not reward_last > reward_first:
        return []
    return [fam for fam, change in changes["families"].items() if change["ci"][1] < 0]


def pairwise_accuracy(rewards: Sequence[float], correct: Sequence[bool]) -> tuple[float, int]:
    """How often the reward ranks an oracle-correct image above an incorrect one of the same prompt (ties half),
    and over how many pairs; (nan, 0) when the prompt's images are all correct or all wrong."""
    r, c = np.asarray(rewards, dtype=np.float64), np.asarray(correct, dtype=bool)
    good, bad = r[c], r[~c]
    if not len(good) or not len(bad):
        return float("nan"), 0
    wins = (good[:, None] > bad[None, :]).sum() + 0.5 * (good[:, None] == bad[None, :]).sum()
    return float(wins / (len(good) * len(bad))), int(len(good) * len(bad))
