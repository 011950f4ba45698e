"""LongAlign stage-1 variants against one reference checkpoint and the base model, on the same held-out `long`
prompts and noise: paired change in long-prompt object recall and all-correct. Usage:
python benchmarks/sanity/stage1_recall_screen.py N OUT_JSON REFERENCE_DIR NAME=CHECKPOINT_DIR [NAME=CHECKPOINT_DIR ...]"""
import json, sys, torch
torch.set_num_threads(2)
from ralign.diffusion.policy import build_policy, policy_from_checkpoint
from ralign.world.evaluation import evaluate_generator
from ralign.world.stats import paired_difference
n, out, reference = int(sys.argv[1]), sys.argv[2], sys.argv[3]
variants = dict(arg.split("=", 1) for arg in sys.argv[4:])
def long_verdicts(pol):
    report = evaluate_generator(lambda p: pol.generate_images(p, seed=0, batch_size=50), split="test", n=n, seed=0, families=("long",))
    return report["per_prompt"]["long"]
base = long_verdicts(build_policy({"pipeline": "base", "policy": {"unet_lora_rank": 0, "text_encoder": "frozen", "steps": 10, "eta": 0.0, "guidance": 3.0}}))
ref = long_verdicts(policy_from_checkpoint(reference))
rows = {"reference": {"checkpoint": reference,
                      "recall_vs_base": paired_difference(base["object_recall"], ref["object_recall"]),
                      "all_correct_vs_base": paired_difference(base["all_correct"], ref["all_correct"])}}
for name, ckpt in variants.items():
    v = long_verdicts(policy_from_checkpoint(ckpt))
    rows[name] = {"checkpoint": ckpt,
                  "recall_vs_base": paired_difference(base["object_recall"], v["object_recall"]),
                  "recall_vs_reference": paired_difference(ref["object_recall"], v["object_recall"]),
                  "all_correct_vs_base": paired_difference(base["all_correct"], v["all_correct"])}
    print(name, rows[name], flush=True)
json.dump({"n_long_prompts": n, "split": "test", "rows": rows}, open(out, "w"), indent=2)
