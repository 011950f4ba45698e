"""AlignProp: reward backpropagation through the last K steps with K drawn uniformly from [1, k] each update (its
random truncation, which keeps the gradient from always seeing the same end of the chain)."""

from __future__ import annotations

import torch

from ralign.algorithms.backprop_chain import LastStepsBackprop
from ralign.algorithms.draft import draft_steps


def alignprop_steps(steps: int, k: int, generator: torch.Generator | None = None) -> list[int]:
    return draft_steps(steps, int(torch.randint(1, k + 1, (1,), generator=generator)))


class AlignProp(LastStepsBackprop):
    name = "alignprop"

    def draw_gradient_steps(self, generator: torch.Generator) -> list[int]:
        return alignprop_steps(self.cfg.model.policy.steps, self.settings.k, generator)
