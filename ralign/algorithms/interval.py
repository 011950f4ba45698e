"""The interval scheme of CoMat and LongAlign: reward backpropagation through every `interval`-th denoising step from
a random offset (5 of 50 steps in the papers), with the gradient flowing through the chain between them."""

from __future__ import annotations

import torch

from ralign.algorithms.backprop_chain import BackpropAlgorithm


def interval_steps(steps: int, interval: int, generator: torch.Generator | None = None) -> list[int]:
    offset = int(torch.randint(0, interval, (1,), generator=generator))
    return list(range(offset, steps, interval))


class IntervalBackprop(BackpropAlgorithm):
    name = "interval"

    def draw_gradient_steps(self, generator: torch.Generator) -> list[int]:
        return interval_steps(self.cfg.model.policy.steps, self.settings.interval, generator)
