"""CLIP-based rewards: the CLIP score of the reward CLIP, and the preference model's score.

Both are differentiable in the images. Real runs point `path` at a converted open_clip checkpoint directory (same
layout as the toy ones: `open_clip_config.json`, `model.safetensors`, `tokenizer/`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ralign.models import TOY_MODELS_DIR
from ralign.models.reward_clip import encode_images, encode_texts, load_reward_clip
from ralign.rewards.base import Reward, RewardOutput

TOY_DIR = TOY_MODELS_DIR


class ClipScoreReward(Reward):
    """cos(text, image) of the reward CLIP (the "CLIP score"; x100 scaling is left out, rewards stay O(1))."""

    name = "clip_score"
    differentiable = True

    def __init__(self, path: str | Path = TOY_DIR / "reward_clip", device: str = "cpu"):
        self.model, self.tokenizer = load_reward_clip(path)
        self.model.requires_grad_(False).to(device)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **_) -> RewardOutput:
        score = (encode_images(self.model, images) * encode_texts(self.model, self.tokenizer, prompts)).sum(-1)
        return RewardOutput(score, {"clip_score": score})


class PreferenceReward(ClipScoreReward):
    """The preference model's cosine score (PickScore-style; the logit scale is a constant and left out)."""

    name = "preference"

    def __init__(self, path: str | Path = TOY_DIR / "preference", device: str = "cpu"):
        super().__init__(path, device)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **_) -> RewardOutput:
        score = (encode_images(self.model, images) * encode_texts(self.model, self.tokenizer, prompts)).sum(-1)
        return RewardOutput(score, {"preference": score})
