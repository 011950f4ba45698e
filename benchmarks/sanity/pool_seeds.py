"""Pool the paired before/after oracle changes of several `ralign train --json` runs of one recipe (e.g. seeds 0, 1, 2).

Each run judged its own held-out prompts before and after training with the same noise; the pooling is
ralign.world.stats.pool_paired_runs (the mean per-prompt difference over all runs, a bootstrap within each run and
family).

    python benchmarks/sanity/pool_seeds.py runs/seed0.json runs/seed1.json runs/seed2.json [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ralign.world.stats import pool_paired_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    summaries = [json.loads(p.read_text()) for p in args.runs]
    pooled = {"runs": [s.get("run_id") for s in summaries],
              **pool_paired_runs([(s["oracle_before"], s["oracle_after"]) for s in summaries])}
    for name, c in [*pooled["families"].items(), ("overall", pooled["overall"])]:
        print(f"{name:9s} {c['before']:.3f} -> {c['after']:.3f}  {c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]  n={c['n']}")
    if args.json:
        args.json.write_text(json.dumps(pooled, indent=1) + "\n")


if __name__ == "__main__":
    main()
