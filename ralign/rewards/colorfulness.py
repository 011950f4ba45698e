"""Colourfulness (Hasler & Suesstrunk, 2003) as a differentiable, prompt-independent "aesthetic" reward.

It plays the part of TextCraftor's aesthetic predictor in the toy world: it rewards vivid, saturated images whatever
the prompt says, so it is also the natural example of a text-irrelevant reward that a model can over-fit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ralign.rewards.base import Reward, RewardOutput


class ColorfulnessReward(Reward):
    name = "colorfulness"
    differentiable = True

    def __init__(self, device: str = "cpu"):
        self.device = device  # no weights: works on whatever device the images are on

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **_) -> RewardOutput:
        r, g, b = images[:, 0], images[:, 1], images[:, 2]
        rg = r - g
        yb = 0.5 * (r + g) - b
        std = torch.sqrt(rg.flatten(1).var(1) + yb.flatten(1).var(1) + 1e-8)
        mean = torch.sqrt(rg.flatten(1).mean(1) ** 2 + yb.flatten(1).mean(1) ** 2 + 1e-8)
        score = std + 0.3 * mean
        return RewardOutput(score, {"colorfulness_std": std, "colorfulness_mean": mean})
