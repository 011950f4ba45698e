"""CoMat's concept-matching reward: how likely the captioner finds the prompt given the generated image.

score = −NLL of the prompt's tokens under the captioner (BLIP), per sample, with the caption prefix ("a picture of"
here, "a photography of" in CoMat) masked out. Differentiable in the images: the gradient asks the image to contain
what the prompt says, concept by concept, since every prompt word has to be explained by the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ralign.models import TOY_MODELS_DIR
from ralign.models.captioner import caption_nll, load_captioner
from ralign.rewards.base import Reward, RewardOutput

TOY_CAPTIONER = TOY_MODELS_DIR / "captioner"


class CaptionReward(Reward):
    name = "caption"
    differentiable = True

    def __init__(self, path: str | Path = TOY_CAPTIONER, device: str = "cpu"):
        self.model, self.tokenizer = load_captioner(path)
        self.model.requires_grad_(False).to(device)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **_) -> RewardOutput:
        nll = caption_nll(self.model, self.tokenizer, images, prompts)
        return RewardOutput(-nll, {"caption_nll": nll})
