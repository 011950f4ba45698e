"""`ralign bench memory`: peak memory and step time of one direct-backprop update (DRaFT-K) versus K, with and
without gradient checkpointing.

Each (K, checkpointing) setting runs in a fresh process, so one setting's allocations cannot hide in the heap another
left behind. In it: the policy and reward of the config are loaded, one warm-up update runs (first-call allocations:
LoRA gradients, kernels), then the measured update: its wall time, and the growth of the process's RSS over it
(sampled every 5 ms from a baseline taken after giving freed heap pages back to the OS). The chain is lengthened to
max(K) steps when the config's is shorter, so every K measures the same chain. What grows with K without
checkpointing is the UNet activations kept for backward (one set per gradient step); with checkpointing only each
step's inputs are kept and one step's activations are rebuilt at a time.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _measure(config: str, overrides: list[str], k: int, checkpointing: bool, steps: int, threads: int, queue) -> None:
    try:
        import torch

        from jobs.bench.common import PeakSampler
        from ralign.algorithms.backprop_chain import backprop_update
        from ralign.algorithms.draft import draft_steps
        from ralign.diffusion.seeding import seed_lora_init
        from ralign.config import load_config
        from ralign.diffusion.policy import build_policy
        from ralign.rewards.registry import build_reward
        from ralign.training.config import TrainConfig
        from ralign.world.prompts import generate_mixed

        torch.set_num_threads(threads)
        cfg = load_config(TrainConfig, config, [*overrides, "algorithm.name=draft", f"algorithm.backprop.k={k}",
                                                f"algorithm.backprop.checkpointing={str(checkpointing).lower()}",
                                                f"model.policy.steps={steps}"])
        seed_lora_init()
        policy = build_policy(cfg.policy_spec())
        reward = build_reward(cfg.reward.spec())
        n = cfg.train.micro_batch
        prompts = [s.prompt for s in generate_mixed(n, split="train", seed=0, families=tuple(cfg.prompts.families))]
        seeds = list(range(n))
        bp = cfg.algorithm.settings_of("backprop")

        def update() -> float:
            policy.unet.zero_grad(set_to_none=True)
            start = time.perf_counter()
            backprop_update(policy, prompts, seeds, reward, bp, draft_steps(steps, k), generator=torch.Generator().manual_seed(0))
            return time.perf_counter() - start

        update()  # warm-up
        with PeakSampler() as sampler:
            step_s = update()
        queue.put({"k": k, "checkpointing": checkpointing, "steps": steps, "micro_batch": n, "step_s": round(step_s, 4),
                   "baseline_rss_mb": round(sampler.baseline, 1), "peak_rss_mb": round(sampler.peak, 1),
                   "peak_growth_mb": round(sampler.growth_mb, 1)})
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a row with the error
        queue.put({"k": k, "checkpointing": checkpointing, "error": f"{exc.__class__.__name__}: {exc}"})


def _growth_exponent(rows: list[dict]) -> float | None:
    """Slope of log(peak growth) against log(K): 1 is linear growth, well below 1 sub-linear."""
    import math

    pts = [(math.log(r["k"]), math.log(max(r["peak_growth_mb"], 1.0))) for r in rows if "peak_growth_mb" in r]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    var = sum((x - mx) ** 2 for x, _ in pts)
    return round(sum((x - mx) * (y - my) for x, y in pts) / var, 3) if var else None


def _linear_fit(rows: list[dict]) -> dict | None:
    """Peak growth ≈ intercept + slope·K by least squares: the slope is what one more gradient step costs."""
    pts = [(r["k"], r["peak_growth_mb"]) for r in rows if "peak_growth_mb" in r]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    var = sum((x - mx) ** 2 for x, _ in pts)
    if not var:
        return None
    slope = sum((x - mx) * (y - my) for x, y in pts) / var
    return {"mb_per_gradient_step": round(slope, 2), "intercept_mb": round(my - slope * mx, 1)}


def run(config: str | Path, ks: list[int], overrides: list[str] | None = None, threads: int = 2, timeout_s: float = 1800) -> dict:
    from jobs.bench.common import machine
    from ralign.config import UserError, load_config
    from ralign.training.config import TrainConfig

    if not ks or min(ks) < 1:
        raise UserError("--k needs positive gradient-step counts, e.g. 1,2,5,10,25")
    base = load_config(TrainConfig, config, overrides or [])
    steps = max(base.model.policy.steps, max(ks))
    ctx = mp.get_context("spawn")
    rows = []
    for checkpointing in (True, False):
        for k in ks:
            queue = ctx.Queue()
            proc = ctx.Process(target=_measure, args=(str(config), list(overrides or []), k, checkpointing, steps, threads, queue))
            proc.start()
            try:
                row = queue.get(timeout=timeout_s)
            except Exception:  # noqa: BLE001 - a hung or killed child is a row with the reason
                row = {"k": k, "checkpointing": checkpointing, "error": f"no result within {timeout_s}s (exit code {proc.exitcode})"}
            proc.join(timeout=60)
            rows.append(row)
            log.info("bench memory: K=%d checkpointing=%s -> %s", k, checkpointing,
                     row.get("error") or f"{row['step_s']:.2f}s, +{row['peak_growth_mb']:.0f} MB (peak {row['peak_rss_mb']:.0f} MB)")
    ckpt = [r for r in rows if r["checkpointing"] and "error" not in r]
    plain = [r for r in rows if not r["checkpointing"] and "error" not in r]
    return {
        "benchmark": "memory", "machine": machine(), "config": str(config), "overrides": list(overrides or []),
        "chain_steps": steps, "threads": threads, "rows": rows,
        "growth_exponent": {"checkpointing": _growth_exponent(ckpt), "no_checkpointing": _growth_exponent(plain)},
        "linear_fit": {"checkpointing": _linear_fit(ckpt), "no_checkpointing": _linear_fit(plain)},
    }
