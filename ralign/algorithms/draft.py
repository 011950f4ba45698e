"""DRaFT-K: reward backpropagation through the last K denoising steps (K = 1 is DRaFT-1); TextCraftor's gradient."""

from __future__ import annotations

import torch

from ralign.algorithms.backprop_chain import LastStepsBackprop


def draft_steps(steps: int, k: int) -> list[int]:
    """The last `k` of a `steps`-step chain (0 = first step)."""
    if not 1 <= k <= steps:
        raise ValueError(f"k={k} gradient steps do not fit a {steps}-step chain")
    return list(range(steps - k, steps))


class DRaFT(LastStepsBackprop):
    name = "draft"

    def draw_gradient_steps(self, generator: torch.Generator) -> list[int]:
        return draft_steps(self.cfg.model.policy.steps, self.settings.k)
