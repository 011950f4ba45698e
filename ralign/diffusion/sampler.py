"""Diffusion sampling that records what RL needs: per denoising step the latents, the predicted mean, sigma_t and the
log-probability of the step actually taken.

diffusers' `DDIMScheduler.step` returns the next sample but not the Gaussian it was drawn from, and DPOK / DDPO need
log p(x_{t-1} | x_t, c) and the mean itself (for the KL to the pretrained policy). `ddim_step_with_logprob` is the
DDIM update with eta > 0 (eta = 1 is DDPM's posterior variance) written out so that both are available; everything
else (timestep grid, alphas, classifier-free guidance layout, VAE decoding) is diffusers' own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import DDIMScheduler

LOG_2PI = math.log(2 * math.pi)


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x_{t-1}
    log_prob: torch.Tensor  # (B,) log density of prev_sample under N(mean, std^2 I), summed over latent dims
    mean: torch.Tensor  # the Gaussian's mean, same shape as the sample
    std: torch.Tensor  # scalar tensor, sigma_t of this step
    pred_original: torch.Tensor  # predicted x_0


def _alpha(scheduler: DDIMScheduler, timestep: torch.Tensor | int) -> torch.Tensor:
    return scheduler.alphas_cumprod[int(timestep)]


def check_scheduler(scheduler: DDIMScheduler, eta: float, steps: int) -> None:
    """Refuse, in one line naming the key, a scheduler whose `steps`-step chain `ddim_step_with_logprob` cannot give
    the Gaussians of: only epsilon prediction, and (with eta > 0) no step of zero variance, whose log-probability
    would be NaN (the last step, when `set_alpha_to_one` is true or the grid ends at timestep 0)."""
    from ralign.config import UserError

    config = scheduler.config
    if config.prediction_type != "epsilon":
        raise UserError(f"scheduler config prediction_type={config.prediction_type!r}: the policy's steps are written "
                        "for epsilon prediction only")
    if eta <= 0:
        return
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps.tolist():
        prev_t = previous_timestep(scheduler, t)
        alpha_t = scheduler.alphas_cumprod[t]
        alpha_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
        if not float((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)) > 0:
            key = "set_alpha_to_one=true" if config.set_alpha_to_one else f"steps_offset={config.steps_offset} (the grid ends at timestep 0)"
            raise UserError(f"scheduler config {key} gives the step from timestep {t} zero variance, so its log-probability "
                            "is undefined with model.policy.eta > 0; use set_alpha_to_one=false and steps_offset=1 "
                            "(SD1.5's own config) or sample with eta 0")


def previous_timestep(scheduler: DDIMScheduler, timestep: int) -> int:
    return int(timestep) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I) summed over all non-batch dims."""
    var = std**2
    elementwise = -((x - mean) ** 2) / (2 * var) - torch.log(std) - 0.5 * LOG_2PI
    return elementwise.flatten(1).sum(dim=1)


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    noise_pred: torch.Tensor,
    timestep: int,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One DDIM step x_t -> x_{t-1} with eta > 0 (epsilon prediction), and the log-prob of the step.

    Pass `prev_sample` to score a step that was already taken (e.g. by an older policy): then no noise is drawn.
    """
    if eta <= 0:
        raise ValueError("eta must be > 0: a deterministic DDIM step has no log-probability")
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"only epsilon prediction is supported, got {scheduler.config.prediction_type!r}")
    prev_t = previous_timestep(scheduler, timestep)
    alpha_t = _alpha(scheduler, timestep).to(sample.dtype)
    alpha_prev = (scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod).to(sample.dtype)
    pred_original = (sample - (1 - alpha_t).sqrt() * noise_pred) / alpha_t.sqrt()
    # Clip or threshold the predicted x_0 exactly as DDIMScheduler.step does (its own thresholding, so the two can
    # never disagree); the direction term keeps the model's epsilon, as diffusers does by default.
    if scheduler.config.thresholding:
        pred_original = scheduler._threshold_sample(pred_original)
    elif scheduler.config.clip_sample:
        pred_original = pred_original.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    direction = (1 - alpha_prev - std**2).clamp(min=0).sqrt() * noise_pred
    mean = alpha_prev.sqrt() * pred_original + direction
    if prev_sample is None:
        # Drawn on the generator's device (CPU) and moved: the same seed gives the same noise on CPU and GPU.
        gen_device = generator.device if generator is not None else sample.device
        noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype, device=gen_device).to(sample.device)
        prev_sample = mean + std * noise
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    return StepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std, pred_original=pred_original)


@dataclass
class Trajectory:
    """A batch of sampled chains. Step k goes from latents[:, k] (timestep timesteps[k]) to latents[:, k + 1]."""

    prompts: list[str]
    latents: torch.Tensor  # (B, K + 1, C, H, W), x_T first
    log_probs: torch.Tensor  # (B, K)
    means: torch.Tensor  # (B, K, C, H, W)
    stds: torch.Tensor  # (K,)
    timesteps: torch.Tensor  # (K,)
    images: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1]
    # Cross-attention maps of the steps asked for (ralign/diffusion/attention_capture.py), no graph: per step {group: [maps]}.
    attention: list[dict[str, list[torch.Tensor]]] | None = None

    @property
    def final_latents(self) -> torch.Tensor:
        return self.latents[:, -1]


def guided_noise(
    unet: torch.nn.Module,
    sample: torch.Tensor,
    timestep: int,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance: float,
    cross_attention_kwargs: dict | None = None,
) -> torch.Tensor:
    """Epsilon with classifier-free guidance, one batched UNet call (uncond and cond stacked, as diffusers does)."""
    if uncond is None or guidance == 1.0:
        return unet(sample, timestep, encoder_hidden_states=cond, cross_attention_kwargs=cross_attention_kwargs).sample
    both = unet(
        torch.cat([sample, sample]),
        timestep,
        encoder_hidden_states=torch.cat([uncond, cond]),
        cross_attention_kwargs=cross_attention_kwargs,
    ).sample
    eps_uncond, eps_cond = both.chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def sample_chain(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    initial_latents: torch.Tensor,
    *,
    steps: int,
    eta: float,
    guidance: float,
    generator: torch.Generator | None = None,
    start_step: int = 0,
    stop_step: int | None = None,
    step_hook: Callable[[int, torch.Tensor], None] | None = None,
    unet_context: Callable[[int], contextlib.AbstractContextManager] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run steps [start_step, stop_step) of a `steps`-step DDIM chain; returns (latents, log_probs, means, stds, ts).

    `start_step > 0` continues a chain handed over from elsewhere; `stop_step < steps` runs only a prefix (what a
    sampler actor does for the gradient algorithms). `unet_context(step)`, when given, wraps that step's UNet call
    (e.g. to record its cross-attention)."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[start_step:stop_step]
    x = initial_latents
    latents, log_probs, means, stds = [x], [], [], []
    for k, t in enumerate(timesteps):
        with unet_context(start_step + k) if unet_context is not None else contextlib.nullcontext():
            eps = guided_noise(unet, x, t, cond, uncond, guidance)
        if eta > 0:
            out = ddim_step_with_logprob(scheduler, eps, int(t), x, eta, generator=generator)
            x, log_prob, mean, std = out.prev_sample, out.log_prob, out.mean, out.std
        else:
            # Deterministic DDIM (diffusers' own step, the evaluation sampler's): no Gaussian, so the log-probability
            # and sigma are recorded as 0; algorithms that learn from final images only (NFT, RSFT) accept it.
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            log_prob, mean, std = x.new_zeros(x.shape[0]), x, x.new_zeros(())
        latents.append(x)
        log_probs.append(log_prob)
        means.append(mean)
        stds.append(std)
        if step_hook is not None:
            step_hook(start_step + k, x)
    if not log_probs:  # an empty range: nothing was sampled
        empty = x.new_zeros((x.shape[0], 0))
        return torch.stack(latents, dim=1), empty, x.new_zeros((x.shape[0], 0, *x.shape[1:])), x.new_zeros((0,)), timesteps.clone()
    return (
        torch.stack(latents, dim=1),
        torch.stack(log_probs, dim=1),
        torch.stack(means, dim=1),
        torch.stack(stds),
        timesteps.clone(),
    )


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode to images in [0, 1] (B, 3, H, W); differentiable."""
    images = vae.decode(latents / vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


def as_timestep(value) -> int | float:
    """A chain's recorded timestep as a Python number of its own kind: DDIM's are integers (they index the
    scheduler's tables), a flow grid's are fractional (1000 sigma) and must not be truncated."""
    value = value.item() if hasattr(value, "item") else value
    return int(value) if float(value).is_integer() else float(value)
