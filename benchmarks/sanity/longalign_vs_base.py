"""LongAlign against the base model (not its stage 1): a checkpoint read through its own policy (segment encoding),
the base model through its plain encoding, the same held-out prompts and noise; paired all-correct per family and
the paired change in long-prompt object recall. Usage: python benchmarks/sanity/longalign_vs_base.py CHECKPOINT_DIR N OUT_JSON
[FAMILIES, comma-separated; default the six] [SEED: the draw of prompts and noise; default 0, the runs' own]"""
import json, sys, torch
torch.set_num_threads(2)
from ralign.diffusion.policy import build_policy, policy_from_checkpoint
from ralign.world.evaluation import evaluate_generator
from ralign.world.stats import compare_evaluations, paired_difference
ckpt, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
FAM = tuple(sys.argv[4].split(",")) if len(sys.argv) > 4 and sys.argv[4] else ("single", "binding", "counting", "spatial", "size", "long")
SEED = int(sys.argv[5]) if len(sys.argv) > 5 else 0
def ev(pol):
    return evaluate_generator(lambda p: pol.generate_images(p, seed=SEED, batch_size=50), split="test", n=n, seed=SEED,
                              families=FAM)
base = ev(build_policy({"pipeline": "base", "policy": {"unet_lora_rank": 0, "text_encoder": "frozen", "steps": 10, "eta": 0.0, "guidance": 3.0}}))
after = ev(policy_from_checkpoint(ckpt))
ch = compare_evaluations(base, after)
ch["long_object_recall"] = paired_difference(base["per_prompt"]["long"]["object_recall"], after["per_prompt"]["long"]["object_recall"])
json.dump({"checkpoint": ckpt, "n_per_family": n, "seed": SEED, "families": FAM, "change_vs_base": ch}, open(out, "w"), indent=2)
for f in FAM:
    print(f, ch["families"][f])
print("overall", ch["overall"]); print("long object recall", ch["long_object_recall"])
