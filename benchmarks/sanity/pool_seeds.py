"""Pool the paired before/after oracle changes of several `ralign train --json` runs of one recipe (e.g. seeds 0, 1, 2).

Each run judged its own held-out prompts before and after training with the same noise; the pooled change is the mean
per-prompt difference over all runs, its 95 % interval a bootstrap that resamples prompts within each (run, family),
so a run's prompts stay paired and the families keep their weights. It estimates what running the recipe does on
average, which one run's interval (its own prompts, its own training noise) cannot.

    python benchmarks/sanity/pool_seeds.py runs/seed0.json runs/seed1.json runs/seed2.json [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ralign.world.stats import paired_difference


def pool(summaries: list[dict]) -> dict:
    families = list(summaries[0]["oracle_before"]["per_prompt"])
    out: dict = {"runs": [s.get("run_id") for s in summaries], "families": {}}
    every_b, every_a, every_stratum = [], [], []
    for fam in families:
        fam_b, fam_a, fam_strata = [], [], []
        for i, s in enumerate(summaries):
            before, after = s["oracle_before"]["per_prompt"][fam], s["oracle_after"]["per_prompt"][fam]
            if before["prompts"] != after["prompts"]:
                raise ValueError(f"run {s.get('run_id')}: {fam} was judged on different prompts before and after")
            fam_b += before["all_correct"]
            fam_a += after["all_correct"]
            fam_strata += [i] * len(before["all_correct"])
        out["families"][fam] = paired_difference(fam_b, fam_a, strata=fam_strata)
        every_b += fam_b
        every_a += fam_a
        every_stratum += [f"{fam}/{i}" for i in fam_strata]
    out["overall"] = paired_difference(every_b, every_a, strata=every_stratum)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    pooled = pool([json.loads(p.read_text()) for p in args.runs])
    for name, c in [*pooled["families"].items(), ("overall", pooled["overall"])]:
        print(f"{name:9s} {c['before']:.3f} -> {c['after']:.3f}  {c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]  n={c['n']}")
    if args.json:
        args.json.write_text(json.dumps(pooled, indent=1) + "\n")


if __name__ == "__main__":
    main()
