"""Sanity check of the GRPO update, in-process (the library's Learner, no Ray): 4 fixed `train` prompts of one family
x 16 samples per iteration, fresh noise each time. Does the reward of those very prompts rise? The oracle judges the
same images (evaluation only). Results: benchmarks/results/fixed_prompt_sanity.json.

    python benchmarks/sanity/fixed_prompts_grpo.py LR BETA ITERATIONS CLIP FAMILY REWARD SKIP_LAST_STEPS [PIPELINE]
    REWARD: a registered reward name, or `random` (standard-normal scores: a control for drift without signal)
    PIPELINE: `base` (the toy UNet, 10 DDIM steps, eta 1) or `flow` (the toy flow model, 10 SDE steps, noise level 0.7)
"""
import sys, time, json
import numpy as np, torch
torch.set_num_threads(2)
from ralign.config import parse_config
from ralign.training.config import TrainConfig
from ralign.training.learner import Learner
from ralign.diffusion.policy import build_policy
from ralign.diffusion.seeding import seed_lora_init
from ralign.rewards.registry import build_reward
from ralign.rollout.batch import Chains
from ralign.world import oracle, prompts as P

lr, beta, iters, clip = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
fam = sys.argv[5]; RW = sys.argv[6] if len(sys.argv) > 6 else "detector"
G, NP = 16, 4
SKIP = int(sys.argv[7]) if len(sys.argv) > 7 else 2
PIPELINE = sys.argv[8] if len(sys.argv) > 8 else "base"
ETA = {"base": 1.0, "flow": 0.7}[PIPELINE]  # each model's training sampler (flow_grpo.yaml for the flow model)
cfg = parse_config(TrainConfig, {
  "model": {"pipeline": PIPELINE, "policy": {"unet_lora_rank": 8, "steps": 10, "eta": ETA, "guidance": 3.0}},
  "algorithm": {"name": "grpo", "grpo": {"group_size": G, "advantage_std": "global", "clip_range": clip, "beta": beta,
                "timestep_fraction": 1.0, "skip_last_steps": SKIP, "minibatches": 2}},
  "reward": {"name": "detector"}, "train": {"batch_size": G*NP, "micro_batch": 32, "lr": lr}, "ray": {"request_batch": 32}})
seed_lora_init()
learner = Learner(cfg, build_policy(cfg.policy_spec()))
reward = build_reward({"name": "detector" if RW == "random" else RW})
ps = [s.prompt for s in P.generate(fam, NP, split="train", seed=7)]
print(ps, flush=True)
prompts = [p for p in ps for _ in range(G)]
for it in range(iters):
    t0 = time.time()
    seeds = [it * 1000 + j for j in range(len(prompts))]
    with torch.no_grad():
        traj = learner.policy.sample(prompts, seeds)
        out = reward(traj.images, prompts)
    imgs = (traj.images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    ora = np.mean([oracle.judge(p, im).all_correct for p, im in zip(prompts, imgs)])
    stats = learner.update(Chains(list(range(len(prompts))), prompts, seeds, [0]*len(prompts), latents=traj.latents,
                                  log_probs=traj.log_probs, timesteps=traj.timesteps, scores=(np.random.default_rng(it).standard_normal(len(prompts)) if RW == "random" else out.score.numpy())))
    print(json.dumps({"it": it, "reward": round(float(out.score.mean()), 3), "det_ok": round(float(out.components.get('all_correct', out.score).float().mean()), 3),
                      "oracle": round(float(ora), 3), "kl": round(stats.get("kl", 0), 6), "clip": round(stats["clip_fraction"], 3),
                      "gn": round(stats["grad_norm"], 4), "s": round(time.time() - t0, 1)}), flush=True)
