"""What the pipeline tests sample: a tiny random policy and a fixed cycle of prompts (seeds = sample ids)."""

from __future__ import annotations

SPEC = {"pipeline": "tiny-random", "policy": {"unet_lora_rank": 2, "steps": 2}}
PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]


class PromptCycle:
    def __init__(self):
        self.i = 0

    def __call__(self, n):
        prompts = [PROMPTS[(self.i + k) % len(PROMPTS)] for k in range(n)]
        seeds = list(range(self.i, self.i + n))
        self.i += n
        return prompts, seeds
