"""The `detector` reward made differentiable: the same detector, the same prompt reader and the same rules, each rule
written as a smooth function of the detector's class probabilities and boxes, so that the reward's gradient reaches
the image and, through the chain, the policy (DRaFT, AlignProp, ReFL and the interval scheme train on it).

The rules of ralign/rewards/detector.py count thresholded detections; here a query is an object of class c to the
degree d = sigmoid((logit_c - logit(threshold)) / sharpness), so:
- count: each named object's soft count sum_q d_q against the number asked, 1 - |count - n| / n (floored at 0);
- size: the detection-weighted mean box side against the small / large split, sigmoid(+-(side - split) / size_scale);
- relation: the detection-weighted centres of the two objects, sigmoid((gap - half a grid cell) / position_scale),
  the gap measured along the relation's axis (a relation holds between different cells, which are a cell apart);
- nothing else: exp(-(soft count of every class the prompt does not name)).
The score is the mean of the checks, as the rules' score is; it ranks a base model's images of one prompt as well as
the rules do or better (within-prompt pairwise accuracy, benchmarks/results/diagnose_soft_detector.md). It never
calls the oracle. A prompt in which the reader finds no object scores NaN (the reward guard quarantines it).

Why not differentiate the rules themselves: a thresholded count and a grid cell have zero gradient almost everywhere.
Why the logits: the step is as sharp as the rules' threshold needs near it (sharpness 0.25 in logit units is about
0.05 in probability at the threshold 0.3), with gradient tails that decay exponentially in the logit rather than
vanish with the probability's own saturation. Softer steps (sharpness 1) rank a base model's images less well
(counting: 0.74 against 0.82 at 0.5) and moved a fixed batch's oracle verdicts half as fast under DRaFT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ralign.models import TOY_MODELS_DIR
from ralign.models.detector import DEFAULT_THRESHOLD, LABELS, load_detector
from ralign.rewards.base import Reward, RewardOutput
from ralign.rewards.detector import WantedObject, read_prompt
from ralign.world.scene import GRID, IMAGE_SIZE, SIZES

_CLASS = {label: i for i, label in enumerate(LABELS)}
_SIZE_SPLIT = sum(SIZES.values()) / len(SIZES)
_HALF_CELL = IMAGE_SIZE / GRID / 2
CHECKS = ("count", "size", "relation", "nothing_else")


def _classes(w: WantedObject) -> list[int]:
    return [_CLASS[(c, s)] for c, s in LABELS if s == w.shape and (w.color is None or c == w.color)]


def soft_checks(detected: torch.Tensor, boxes: torch.Tensor, wanted: list[WantedObject],
                relations: list[tuple[int, str, int]], position_scale: float = 3.0, size_scale: float = 1.5
                ) -> dict[str, list[torch.Tensor]]:
    """Each relaxed rule's checks (1 = passes) for one image: `detected` (queries, classes) in [0, 1], the degree to
    which each query is an object of each class; `boxes` (queries, 4) as (cx, cy, w, h) in pixels."""
    checks: dict[str, list[torch.Tensor]] = {k: [] for k in CHECKS}
    side = boxes[:, 2:].mean(-1)
    centres = []
    named: set[int] = set()
    for w in wanted:
        classes = _classes(w)
        named.update(classes)
        mine = detected[:, classes].sum(-1)
        count = mine.sum()
        checks["count"].append((1 - (count - w.count).abs() / w.count).clamp(min=0))
        weights = mine / (count + 1e-6)
        if w.size is not None:
            sign = 1.0 if w.size == "large" else -1.0
            checks["size"].append(torch.sigmoid(sign * ((weights * side).sum() - _SIZE_SPLIT) / size_scale))
        centres.append((weights[:, None] * boxes[:, :2]).sum(0))
    for subject, relation, reference in relations:
        (xa, ya), (xb, yb) = centres[subject], centres[reference]
        gap = {"to the left of": xb - xa, "to the right of": xa - xb, "above": yb - ya, "below": ya - yb}[relation]
        checks["relation"].append(torch.sigmoid((gap - _HALF_CELL) / position_scale))
    others = [c for c in range(len(LABELS)) if c not in named]
    checks["nothing_else"].append(torch.exp(-detected[:, others].sum()))
    return checks


class SoftDetectorReward(Reward):
    name = "soft_detector"
    differentiable = True

    def __init__(self, path: str | Path = TOY_MODELS_DIR / "detector", threshold: float = DEFAULT_THRESHOLD,
                 sharpness: float = 0.25, position_scale: float = 3.0, size_scale: float = 1.5, parser: str = "lexicon",
                 device: str = "cpu"):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"soft_detector reward: threshold must be in (0, 1), got {threshold}")
        for key, value in (("sharpness", sharpness), ("position_scale", position_scale), ("size_scale", size_scale)):
            if not value > 0:
                raise ValueError(f"soft_detector reward: {key} must be > 0, got {value}")
        self.model = load_detector(path).requires_grad_(False).to(device)
        self.threshold, self.sharpness, self.parser = threshold, sharpness, parser
        self.position_scale, self.size_scale = position_scale, size_scale
        if self.model.config.num_labels != len(LABELS):  # a softmax head would need its no-object column handled
            raise ValueError("soft_detector reward: needs a detector with one sigmoid output per class (Conditional / "
                             "Deformable DETR)")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **_) -> RewardOutput:
        out = self.model(pixel_values=images.float() * 2.0 - 1.0)
        detected = torch.sigmoid((out.logits - math.log(self.threshold / (1 - self.threshold))) / self.sharpness)
        boxes = out.pred_boxes * IMAGE_SIZE
        nan = torch.tensor(float("nan"), device=images.device)
        scores, parts = [], {k: [] for k in CHECKS}
        for i, prompt in enumerate(prompts):
            wanted, relations = read_prompt(prompt, self.parser)
            if not wanted:
                scores.append(nan)
                for k in CHECKS:
                    parts[k].append(nan)
                continue
            checks = soft_checks(detected[i], boxes[i], wanted, relations, self.position_scale, self.size_scale)
            scores.append(torch.stack([v for values in checks.values() for v in values]).mean())
            for k in CHECKS:
                # A rule the prompt does not ask for (no size, no relation) passes, as in the components' means.
                parts[k].append(torch.stack(checks[k]).mean().detach() if checks[k] else torch.ones((), device=images.device))
        score = torch.stack(scores)
        return RewardOutput(score, {"soft_detector": score, **{k: torch.stack(v) for k, v in parts.items()}})
