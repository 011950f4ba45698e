"""Held-out screen of a training recipe, in-process (the library's Learner, no Ray, one thread): fresh `train` prompts
of the five short families every iteration; every EVERY iterations the policy generates images for held-out `test`
prompts with the evaluation sampler (deterministic DDIM, seed 0: the same prompts and noise each time) and the oracle
judges them, paired with the base model's images. A screen for choosing settings (NEVAL prompts per family, default
50), not an alignment claim: claims come from `ralign train` with 100 prompts per family.

    python benchmarks/sanity/heldout_screen.py NAME '{"algorithm": {...}, "train": {...}, "x": {...}}'

The JSON is merged into the default config (NFT with the detector reward, as jobs/configs/nft.yaml); "x" holds the
screen's own knobs: iters, every, neval, train_families, eval_families, ema (decay of an adapter average also evaluated).
Rollout algorithms (grpo, nft, rsft, dpok) learn from sampled chains scored by the reward; gradient algorithms
(draft, alignprop, interval, refl) from the reward's gradient in the learner. Results: benchmarks/results/draft_detector.md.
"""
import copy
import json
import os
import sys
import time

import torch

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from ralign.config import parse_config
from ralign.diffusion.policy import build_policy
from ralign.diffusion.seeding import seed_lora_init
from ralign.rewards.registry import build_reward
from ralign.rollout.batch import Chains, Prefixes
from ralign.training.config import TrainConfig
from ralign.training.learner import Learner
from ralign.world import prompts as P
from ralign.world.evaluation import evaluate_generator
from ralign.world.stats import compare_evaluations

SHORT = ("single", "binding", "counting", "spatial", "size")
DEFAULT = {
    "model": {"pipeline": "base", "policy": {"unet_lora_rank": 8, "steps": 10, "eta": 1.0, "guidance": 3.0}},
    "algorithm": {"name": "nft", "nft": {"group_size": 8, "advantage_std": "global", "adv_clip": 2.0, "beta": 1.0,
                                         "minibatches": 4, "kl_weight": 1.0}},
    "reward": {"name": "detector"}, "train": {"batch_size": 64, "micro_batch": 16, "lr": 1e-3}, "ray": {"request_batch": 16},
}


def merge(a: dict, b: dict) -> dict:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            merge(a[k], v)
        else:
            a[k] = v
    return a


name = sys.argv[1]
overrides = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
knobs = overrides.pop("x", {})
cfg = parse_config(TrainConfig, merge(copy.deepcopy(DEFAULT), overrides))
iters, every, neval = knobs.get("iters", 60), knobs.get("every", 10), knobs.get("neval", 50)
train_families = tuple(knobs.get("train_families", SHORT))
eval_families = tuple(knobs.get("eval_families", SHORT))

seed_lora_init()
reward = build_reward(cfg.reward.spec())
learner = Learner(cfg, build_policy(cfg.policy_spec()), reward=reward if reward.differentiable else None)
policy = learner.policy
gradient_algorithm = learner.algorithm.reward_in_learner
group = 1 if gradient_algorithm else learner.algorithm.group_size(cfg)
per_iteration = cfg.train.batch_size
params = policy.trainable_parameters()
average = [p.detach().clone() for p in params] if knobs.get("ema") else None


def evaluate() -> dict:
    return evaluate_generator(lambda prompts: policy.generate_images(prompts, seed=0, batch_size=64),
                              split="test", n=neval, seed=0, families=eval_families)


def summary(after: dict, before: dict) -> dict:
    change = compare_evaluations(before, after)
    out = {f: round(c["diff"], 3) for f, c in change["families"].items()}
    out["overall"] = round(change["overall"]["diff"], 3)
    out["ci"] = [round(x, 3) for x in change["overall"]["ci"]]
    return out


def swap_average() -> None:
    for p, a in zip(params, average):
        kept = p.detach().clone()
        p.data.copy_(a)
        a.copy_(kept)


start = time.time()
before = evaluate()
print(json.dumps({"name": name, "before": {f: m["all_correct"] for f, m in before["families"].items()}}), flush=True)
stream = P.generate_mixed(iters * per_iteration // group + 10, split="train", seed=12345, families=train_families)
for it in range(iters):
    t0 = time.time()
    unique = [stream[it * (per_iteration // group) + j].prompt for j in range(per_iteration // group)]
    prompts = [p for p in unique for _ in range(group)]
    seeds = [it * 1000 + j for j in range(len(prompts))]
    record = {"it": it}
    if gradient_algorithm:
        stats = learner.update(Prefixes.from_prompts(prompts, seeds))
    else:
        with torch.no_grad():
            traj = policy.sample(prompts, seeds)
            scores = reward(traj.images, prompts).score
        stats = learner.update(Chains(list(range(len(prompts))), prompts, seeds, [0] * len(prompts), latents=traj.latents,
                                      log_probs=traj.log_probs, timesteps=traj.timesteps, scores=scores.numpy()))
    record.update(reward=round(stats.get("reward_mean", float("nan")), 4), kl=round(stats.get("kl", 0.0), 6),
                  grad_norm=round(stats["grad_norm"], 4), s=round(time.time() - t0, 1))
    if average is not None:
        with torch.no_grad():
            for p, a in zip(params, average):
                a.mul_(knobs["ema"]).add_(p.detach(), alpha=1 - knobs["ema"])
    if (it + 1) % every == 0:
        record["held_out"] = summary(evaluate(), before)
        if average is not None:
            swap_average()
            record["held_out_average"] = summary(evaluate(), before)
            swap_average()
    print(json.dumps(record), flush=True)
print(json.dumps({"done": name, "wall_s": round(time.time() - start)}), flush=True)
