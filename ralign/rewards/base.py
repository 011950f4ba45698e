"""The reward interface every reward implements, and a guard that quarantines bad reward values.

A reward maps images (B, 3, H, W) in [0, 1] and their prompts (optionally the sampler's cross-attention maps) to a
per-sample score plus named components (so MLflow shows each). Differentiable rewards return tensors that carry
gradients to the images; non-differentiable ones may return detached tensors and say so with `differentiable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class RewardOutput:
    score: torch.Tensor  # (B,)
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,)

    def detached(self) -> "RewardOutput":
        return RewardOutput(self.score.detach(), {k: v.detach() for k, v in self.components.items()})


class Reward(Protocol):
    name: str
    differentiable: bool

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], attention: dict | None = None) -> RewardOutput: ...


def finite_mask(output: RewardOutput) -> torch.Tensor:
    """(B,) True where the score and every component are finite; the rest are quarantined, never trained on."""
    ok = torch.isfinite(output.score)
    for value in output.components.values():
        ok &= torch.isfinite(value)
    return ok
