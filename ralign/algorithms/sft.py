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

from ralign.diffusion.text_encoding import PlainEncoder

if TYPE_CHECKING:
    from ralign.diffusion.policy import DiffusionPolicy


def sft_loss(policy: "DiffusionPolicy", images: torch.Tensor, prompts: Sequence[str], generator: torch.Generator,
             caption_dropout: float = 0.1, distill_weight: float = 0.0) -> torch.Tensor:
    """images (B, 3, H, W) in [-1, 1] (the VAE's range); the caller steps the optimiser. `distill_weight > 0` adds
    `plain_teacher_gap` on the same noisy latents."""
    keep = torch.rand(len(prompts), generator=generator) >= caption_dropout
    prompts = [p if k else "" for p, k in zip(prompts, keep.tolist())]
    with torch.no_grad():
        latents = policy.vae.encode(images.to(policy.device)).latent_dist.sample(generator) * policy.vae.config.scaling_factor
    noisy, t, prediction, target = _denoising_terms(policy, latents, prompts, generator)
    loss = F.mse_loss(prediction, target)
    if distill_weight > 0:
        loss = loss + distill_weight * plain_teacher_gap(policy, noisy, t, prediction, prompts)
    return loss


def plain_teacher_gap(policy: "DiffusionPolicy", noisy: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor,
                      prompts: Sequence[str]) -> torch.Tensor:
    """Mean squared gap between the policy's prediction and the pretrained model's (adapters off) reading the same
    prompt through the pipeline's plain encoding, over the prompts that encoding reads whole.

    Not in LongAlign (its stage 1 is the denoising loss on long captions): a distillation we add because renders alone
    do not teach the toy UNet to read segment encodings of short prompts as well as it read plain ones (single-object
    all-correct 1.00 -> 0.46 after 600 steps, a screen on 50 held-out prompts; benchmarks/results/seed_methods.md). The teacher's output on the same
    noisy latent is an exact, low-variance target for what the prompt should mean. With `segment_plain_short` the
    policy reads short prompts exactly as the teacher does, and the term keeps the shared adapters from changing
    what they mean while long prompts are learnt."""
    plain = PlainEncoder(policy.original_text_encoder or policy.text_encoder, policy.tokenizer)
    fits = torch.tensor([plain.overflow(p) is None for p in prompts], device=prediction.device)
    if not bool(fits.any()):
        return prediction.sum() * 0.0
    with torch.no_grad(), policy.reference():
        teacher = policy.predict(noisy[fits], t[fits], plain([p for p, f in zip(prompts, fits.tolist()) if f]))
    return F.mse_loss(prediction[fits], teacher)


def _denoising_terms(policy, latents: torch.Tensor, prompts: Sequence[str], generator: torch.Generator,
                     t_min: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, times, the policy's prediction, its target) of the pretraining loss on x_0 = `latents`."""
    cond, _ = policy.encode(prompts)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    noisy, t, target = policy.noised_for_training(latents, noise, generator, t_min)
    return noisy, t, policy.predict(noisy, t, cond), target


def denoising_loss(policy, latents: torch.Tensor, prompts: Sequence[str], generator: torch.Generator,
                   t_min: int = 0) -> torch.Tensor:
    """The pretraining loss on a policy's latents x_0 (either family: the policy's `noised_for_training` draws the
    training time from t_min up and names the target: the noise for the UNet, the velocity for a flow model)."""
    _, _, prediction, target = _denoising_terms(policy, latents, prompts, generator, t_min)
    return F.mse_loss(prediction, target)
