"""The reward interface every reward implements, and a guard that quarantines bad reward values.

A reward maps images (B, 3, H, W) in [0, 1] and their prompts to a per-sample score plus named components (so MLflow
shows each). What else a reward can do is declared on its class, never probed for:

- `differentiable`: its score carries gradients to the images (the gradient algorithms need that).
- `uses_attention`: it scores the UNet's cross-attention, passed as `attention={"maps": [per captured step: {group:
  [(B, side, side, tokens)]}], "token_offsets": [per prompt: [(start, end) character span of each token position]]}`
  (ralign/diffusion/attention_capture.py);
- `uses_latents`: it scores the final latents before decoding, passed as `latents=(B, C, h, w)`.
  Whoever ran the chain passes those: the gradient algorithms in the learner (with graph), or a reward actor from
  what the sampler shipped with the rollout (no graph).
- `trains`: it learns alongside the policy (CoMat's discriminator): `adversarial_update(real, fake)` takes one step,
  `shared_weights()` / `load_shared_weights(state)` hand its current weights from the learner to the reward actors
  that score with it, `save_state` / `load_state` put it into the learner's checkpoints.

A composite reward (a weighted sum, a wrapper) answers from its parts; config validation asks the classmethods
(`differentiable_for`, `chain_inputs_for`, `attention_for`) before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch


@dataclass
class RewardOutput:
    score: torch.Tensor  # (B,)
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,)

    def detached(self) -> "RewardOutput":
        return RewardOutput(self.score.detach(), {k: v.detach() for k, v in self.components.items()})


class Reward:
    name: ClassVar[str]
    differentiable: bool = False
    uses_attention: bool = False
    uses_latents: bool = False
    trains: bool = False

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], *, attention: dict | None = None,
                 latents: torch.Tensor | None = None) -> RewardOutput:
        raise NotImplementedError

    @property
    def chain_inputs(self) -> bool:
        """Whether it scores more of the chain than the final images."""
        return self.uses_attention or self.uses_latents

    # ---- what the class can do, from its options alone (before any model is loaded) -----------------------------
    @classmethod
    def differentiable_for(cls, options: dict) -> bool:
        return cls.differentiable

    @classmethod
    def chain_inputs_for(cls, options: dict) -> list[str]:
        """Names of the (terms of the) reward that score the chain's attention maps or latents."""
        return [cls.name] if cls.uses_attention or cls.uses_latents else []

    @classmethod
    def model_dirs_for(cls, options: dict) -> list[Path]:
        """The directories of weights the reward reads with these options (its path parameters); `ralign compare`
        records their fingerprints so that a row measured with other weights is not passed off as current."""
        from ralign.models.weights import directories_read

        return directories_read(cls.__init__, options)

    @classmethod
    def attention_for(cls, options: dict) -> bool:
        """Whether it (or a term of it) scores cross-attention, which samplers must then record."""
        return cls.uses_attention

    # ---- a reward that trains alongside the policy (`trains`) ---------------------------------------------------
    def adversarial_update(self, real_latents: torch.Tensor, fake_latents: torch.Tensor) -> dict[str, float]:
        return {}

    def shared_weights(self) -> dict[str, torch.Tensor]:
        return {}

    def load_shared_weights(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"reward {self.name!r} trains nothing; it cannot load shared weights")

    def save_state(self, directory: str | Path) -> None:
        pass

    def load_state(self, directory: str | Path) -> None:
        pass


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
