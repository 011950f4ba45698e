"""Does RL on the flow model raise its own reward off the prompts it trained on? For 24 held-out `test` prompts per
short family, 8 images each from the training sampler (10 SDE steps, noise level 0.7, guidance 3; same noise for
every policy), the `detector` reward and the oracle's all-correct verdict, base model against each checkpoint:
paired changes over prompts (per-prompt means of the 8 images, families pooled). Usage:
python benchmarks/sanity/flow_reward_shift.py OUT_JSON NAME=CHECKPOINT_DIR [NAME=CHECKPOINT_DIR ...]"""
import json, sys, torch
torch.set_num_threads(2)
import numpy as np
from ralign.diffusion.policy import build_policy, policy_from_checkpoint
from ralign.diffusion.seeding import sample_seed
from ralign.rewards.detector import DetectorReward
from ralign.world import oracle
from ralign.world.evaluation import eval_prompts
from ralign.world.stats import paired_difference
SAMPLER, PER_PROMPT = {"steps": 10, "eta": 0.7, "guidance": 3.0}, 8
out, variants = sys.argv[1], dict(arg.split("=", 1) for arg in sys.argv[2:])
prompts_by_family = eval_prompts("test", 24, 0, ["single", "binding", "counting", "spatial", "size"])
reward = DetectorReward()
def per_prompt_means(policy):
    rewards, verdicts = [], []
    for samples in prompts_by_family.values():
        prompts = [s.prompt for s in samples for _ in range(PER_PROMPT)]
        r, c = [], []
        for lo in range(0, len(prompts), 64):
            chunk = prompts[lo:lo + 64]
            with torch.no_grad():
                traj = policy.sample(chunk, [sample_seed(0, lo + j) for j in range(len(chunk))])
                r += reward(traj.images, chunk).score.tolist()
            images = (traj.images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            c += [oracle.judge(p, im).all_correct for p, im in zip(chunk, images)]
        rewards += np.reshape(r, (-1, PER_PROMPT)).mean(1).tolist()
        verdicts += np.reshape(c, (-1, PER_PROMPT)).mean(1).tolist()
    return rewards, verdicts
base = per_prompt_means(build_policy({"pipeline": "flow", "policy": {"unet_lora_rank": 0, **SAMPLER}}))
rows = {}
for name, ckpt in variants.items():
    after = per_prompt_means(policy_from_checkpoint(ckpt, **SAMPLER))
    rows[name] = {"checkpoint": ckpt, "detector_reward": paired_difference(base[0], after[0]),
                  "oracle_all_correct": paired_difference(base[1], after[1])}
    print(name, rows[name], flush=True)
json.dump({"sampler": SAMPLER, "prompts_per_family": 24, "images_per_prompt": PER_PROMPT, "rows": rows}, open(out, "w"), indent=2)
