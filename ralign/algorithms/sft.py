"""Supervised fine-tuning with the policy's own text encoding: the denoising loss on (prompt, image) pairs.

LongAlign's first stage: before preference optimisation, the model is fine-tuned on long captions *with segment-level
encoding*, because a UNet trained on one 77-token (here 24-token) encoding does not understand a concatenation of
segment encodings out of the box (measured on the toy world: single-object all-correct 1.0 -> 0.31 when the base
model is simply fed segment encodings). The loss is the pretraining one — ε-prediction MSE at a uniformly drawn
DDPM timestep — with captions dropped to "" at `caption_dropout` so classifier-free guidance keeps working, and
gradients reach only the policy's trainable weights (LoRA adapters and/or a trainable text encoder).
"""

from __future__ import annotations

from collections.abc import Sequence

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ralign.diffusion.policy import DiffusionPolicy


def sft_loss(policy: "DiffusionPolicy", images: torch.Tensor, prompts: Sequence[str], generator: torch.Generator,
             caption_dropout: float = 0.1) -> torch.Tensor:
    """images (B, 3, H, W) in [-1, 1] (the VAE's range); the caller steps the optimiser."""
    keep = torch.rand(len(prompts), generator=generator) >= caption_dropout
    prompts = [p if k else "" for p, k in zip(prompts, keep.tolist())]
    with torch.no_grad():
        latents = policy.vae.encode(images.to(policy.device)).latent_dist.sample(generator) * policy.vae.config.scaling_factor
    return denoising_loss(policy, latents, prompts, generator)


def denoising_loss(policy, latents: torch.Tensor, prompts: Sequence[str], generator: torch.Generator,
                   t_min: int = 0) -> torch.Tensor:
    """The pretraining loss on a policy's latents x_0 (either family: the policy's `noised_for_training` draws the
    training time from t_min up and names the target: the noise for the UNet, the velocity for a flow model)."""
    cond, _ = policy.encode(prompts)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    noisy, t, target = policy.noised_for_training(latents, noise, generator, t_min)
    return F.mse_loss(policy.predict(noisy, t, cond), target)
