"""The grounded segmenter backends on held-out `test` renders, through the interface CoMat's attribute concentration
uses (`masks(images, phrases)`): IoU of the mask for a present "colour shape" phrase, how often a present phrase gets
no mask, and how often an absent phrase gets one: a random absent phrase, and one that shares the colour of an object
that is there (a red square's "red circle"). Images clean and with the generated look (the base model's blur, colour
shift and VAE round trip). Usage: python benchmarks/sanity/segmenter_quality.py OUT_JSON [N_PER_FAMILY]"""
import json
import sys

import numpy as np
import torch

from ralign.models.grounded_segmenter import build_grounded_segmenter
from ralign.models import TOY_MODELS_DIR
from ralign.pretrain.rewards import GeneratedLook, _images01, segmentation_probes
from ralign.world.prompts import generate

torch.set_num_threads(2)
out_path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 60
FAMILIES = ("single", "binding", "counting", "spatial", "size", "long")
rng = np.random.default_rng(7)
samples = [s for f in FAMILIES for s in generate(f, n, "test", seed=13)]
present, truth, absent, shared = segmentation_probes(samples, rng)
truth = [torch.from_numpy(m) for m in truth]
clean = _images01(samples)
looked = GeneratedLook(TOY_MODELS_DIR / "base" / "vae")(clean, torch.Generator().manual_seed(0))
results = {"n_images": len(samples), "families": FAMILIES, "backends": {}}
for backend in ("toy", "toy_grounded"):
    seg = build_grounded_segmenter({"backend": backend})
    for look, images in (("clean", clean), ("generated_look", looked)):
        got = torch.cat([seg.masks(images[i:i + 60], present[i:i + 60]) for i in range(0, len(samples), 60)]) > 0
        inter = (got & torch.stack(truth)).flatten(1).sum(1).float()
        union = (got | torch.stack(truth)).flatten(1).sum(1).float()
        row = {"iou_present": round(float((inter / union.clamp(min=1)).mean()), 3),
               "missed_present": round(float((got.flatten(1).sum(1) == 0).float().mean()), 3)}
        for name, phrases in (("found_absent_random", absent), ("found_absent_shared_colour", shared)):
            m = torch.cat([seg.masks(images[i:i + 60], phrases[i:i + 60]) for i in range(0, len(samples), 60)])
            row[name] = round(float((m.flatten(1).sum(1) > 0).float().mean()), 3)
        results["backends"].setdefault(backend, {})[look] = row
        print(backend, look, row, flush=True)
json.dump(results, open(out_path, "w"), indent=2)
