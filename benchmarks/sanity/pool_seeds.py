"""Pool the paired before/after oracle changes of several `ralign train --json` runs of one recipe (e.g. seeds 0, 1, 2).

Each run judged its own held-out prompts before and after training with the same noise; the pooling is
ralign.world.stats.pool_paired_runs (the mean per-prompt difference over all runs, a bootstrap within each run and
family).

    python benchmarks/sanity/pool_seeds.py runs/seed0.json runs/seed1.json runs/seed2.json [--json OUT]

With `--against A0.json A1.json A2.json` (another recipe's runs with the same seeds, in the same order) it compares
the two recipes instead: each pair is A's model after training and this recipe's after training, on the prompts and
noise both were judged on (the seed draws them), so the difference is paired prompt by prompt.

A run may also be a `ralign eval --against SUMMARY --json` report (e.g. a `ralign soup` of the runs, judged on each
run's prompts and noise): it stands for SUMMARY's before-training evaluation and this report as the after. Such
reports may stand on both sides of `--against` (one soup against another on the same draws).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ralign.world.stats import pool_paired_runs


def _as_summary(path: Path) -> dict:
    data = json.loads(path.read_text())
    if "oracle_after" in data:
        return data
    if "change_against" not in data:
        raise SystemExit(f"{path}: neither a `ralign train --json` summary nor a `ralign eval --against ... --json` report")
    earlier = json.loads(Path(data["change_against"]["file"]).read_text())
    return {"run_id": f"{path.name} (against {earlier.get('run_id', data['change_against']['file'])})",
            "oracle_before": earlier.get("oracle_before", earlier), "oracle_after": data}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--against", nargs="+", type=Path, help="another recipe's runs, one per run, same seeds and order")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    summaries = [_as_summary(p) for p in args.runs]
    if args.against is None:
        pairs = [(s["oracle_before"], s["oracle_after"]) for s in summaries]
    else:
        if len(args.against) != len(summaries):
            parser.error(f"--against names {len(args.against)} runs for {len(summaries)}; one per run, in the same order")
        pairs = [(_as_summary(a)["oracle_after"], s["oracle_after"]) for a, s in zip(args.against, summaries)]
    pooled = {"runs": [s.get("run_id") for s in summaries], "against": [str(a) for a in args.against or []],
              **pool_paired_runs(pairs)}
    for name, c in [*pooled["families"].items(), ("overall", pooled["overall"])]:
        print(f"{name:9s} {c['before']:.3f} -> {c['after']:.3f}  {c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]  n={c['n']}")
    if args.json:
        args.json.write_text(json.dumps(pooled, indent=1) + "\n")


if __name__ == "__main__":
    main()
