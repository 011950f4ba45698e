"""The reward interface every reward implements, and a guard that quarantines bad reward values.

A reward maps images (B, 3, H, W) in [0, 1] and their prompts to a per-sample score plus named components (so MLflow
shows each). Differentiable rewards return tensors that carry gradients to the images; non-differentiable ones may
return detached tensors and say so with `differentiable`.

Some rewards need more of the chain than the images; they say so with class attributes and receive keyword inputs
from whoever ran the chain: the gradient algorithms in the learner (with graph), or a reward actor, from what the
sampler shipped with the rollout (no graph):
- `uses_attention`: `attention={"maps": [per captured step: {group: [(B, side, side, tokens)]}], "token_offsets":
  [per prompt: [(start, end) character span of each token position]]}`, the UNet's cross-attention maps
  (ralign/diffusion/attention_capture.py) and where each token of the prompt sits;
- `uses_latents`: `latents=(B, C, h, w)`, the final latents before decoding.
A reward with an `adversarial_update(real_latents, fake_latents)` method also trains (CoMat's discriminator); it
then has `shared_weights()` / `load_shared_weights(state)` so the learner can hand its current weights to reward
actors that score with it.
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

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **inputs) -> RewardOutput: ...


def quarantine_records(output: RewardOutput, ok: torch.Tensor, prompts, images: torch.Tensor) -> list[dict]:
    """The samples `ok` leaves out, as records for the run's quarantine artefacts: prompt, what the reward returned,
    and the image it was given (uint8, H x W x 3)."""
    records = []
    for k in torch.nonzero(~ok).flatten().tolist():
        image = (images[k].detach().permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        records.append({"index": k, "prompt": prompts[k], "reason": "non-finite reward", "score": float(output.score[k]),
                        "components": {c: float(v[k]) for c, v in output.components.items()}, "image": image})
    return records


def finite_mask(output: RewardOutput) -> torch.Tensor:
    """(B,) True where the score and every component are finite; the rest are quarantined, never trained on."""
    ok = torch.isfinite(output.score)
    for value in output.components.values():
        ok &= torch.isfinite(value)
    return ok
