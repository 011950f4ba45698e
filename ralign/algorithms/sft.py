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
    from diffusers import DDPMScheduler

    from ralign.diffusion.policy import DiffusionPolicy


def sft_loss(policy: "DiffusionPolicy", images: torch.Tensor, prompts: Sequence[str], noise_scheduler: "DDPMScheduler",
             generator: torch.Generator, caption_dropout: float = 0.1) -> torch.Tensor:
    """images (B, 3, H, W) in [-1, 1] (the VAE's range); the caller steps the optimiser."""
    keep = torch.rand(len(prompts), generator=generator) >= caption_dropout
    prompts = [p if k else "" for p, k in zip(prompts, keep.tolist())]
    with torch.no_grad():
        latents = policy.vae.encode(images.to(policy.device)).latent_dist.sample(generator) * policy.vae.config.scaling_factor
    return denoising_loss(policy, latents, prompts, noise_scheduler, generator)


def denoising_loss(policy: "DiffusionPolicy", latents: torch.Tensor, prompts: Sequence[str], noise_scheduler: "DDPMScheduler",
                   generator: torch.Generator, t_range: tuple[int, int] | None = None) -> torch.Tensor:
    """The pretraining loss on (scaled) latents x_0: noise them at a uniformly drawn DDPM timestep (from `t_range`,
    [low, high), when given) and regress the noise."""
    low, high = t_range or (0, noise_scheduler.config.num_train_timesteps)
    cond, _ = policy.encode(prompts)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = torch.randint(low, high, (len(prompts),), generator=generator).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    return F.mse_loss(policy.unet(noisy, t, encoder_hidden_states=cond).sample, noise)
