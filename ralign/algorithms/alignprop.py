"""AlignProp: reward backpropagation through the last K steps with K drawn uniformly from [1, k] each update (its
random truncation, which keeps the gradient from always seeing the same end of the chain)."""

from __future__ import annotations

import torch

from ralign.algorithms.backprop_chain import BackpropAlgorithm
from ralign.algorithms.draft import draft_steps


def alignprop_steps(steps: int, k: int, generator: torch.Generator | None = None) -> list[int]:
    return draft_steps(steps, int(torch.randint(1, k + 1, (1,), generator=generator)))


class AlignProp(BackpropAlgorithm):
    name = "alignprop"

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        k, steps = cfg.algorithm.settings_of(cls.section).k, cfg.model.policy.steps
        if k > steps:
            raise ValueError(f"algorithm.backprop.k={k} is longer than model.policy.steps={steps}")

    def draw_gradient_steps(self, generator: torch.Generator) -> list[int]:
        return alignprop_steps(self.cfg.model.policy.steps, self.settings.k, generator)
