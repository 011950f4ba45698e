"""Does RL on the flow model raise its own reward off the prompts it trained on? For 24 held-out `test` prompts per
short family, 8 images each from the training sampler (10 SDE steps, noise level 0.7, guidance 3; same noise for
every policy), the `detector` reward and the oracle's all-correct verdict, base model against each checkpoint:
paired changes over prompts (per-prompt means of the 8 images, families pooled). Usage:
python benchmarks/sanity/flow_reward_shift.py OUT_JSON NAME=CHECKPOINT_DIR [NAME=CHECKPOINT_DIR ...]"""
import json, sys, torch
torch.set_num_threads(2)
from jobs.diagnose import sample_and_judge
from ralign.diffusion.policy import build_policy, policy_from_checkpoint
from ralign.rewards.detector import DetectorReward
from ralign.world.evaluation import eval_prompts
from ralign.world.stats import paired_difference
SAMPLER, PER_PROMPT = {"steps": 10, "eta": 0.7, "guidance": 3.0}, 8
out, variants = sys.argv[1], dict(arg.split("=", 1) for arg in sys.argv[2:])
prompts_by_family = eval_prompts("test", 24, 0, ["single", "binding", "counting", "spatial", "size"])
reward = DetectorReward()
def per_prompt_means(policy):
    rewards, verdicts = [], []
    for samples in prompts_by_family.values():
        r, c, _ = sample_and_judge(policy, reward, [s.prompt for s in samples], PER_PROMPT, seed=0)
        rewards += r.mean(1).tolist()
        verdicts += c.mean(1).tolist()
    return rewards, verdicts
base = per_prompt_means(build_policy({"pipeline": "flow", "policy": {"unet_lora_rank": 0, **SAMPLER}}))
rows = {}
for name, ckpt in variants.items():
    after = per_prompt_means(policy_from_checkpoint(ckpt, **SAMPLER))
    rows[name] = {"checkpoint": ckpt, "detector_reward": paired_difference(base[0], after[0]),
                  "oracle_all_correct": paired_difference(base[1], after[1])}
    print(name, rows[name], flush=True)
json.dump({"sampler": SAMPLER, "prompts_per_family": 24, "images_per_prompt": PER_PROMPT, "rows": rows}, open(out, "w"), indent=2)
