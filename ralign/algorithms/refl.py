"""ReFL (ImageReward): denoise without gradient to a random late step, take one UNet step with gradient to the
predicted x_0, decode it, and push the reward up with `ReLU(lambda - r) * scale` (rewards already above lambda
contribute nothing, which keeps the model from chasing the reward past "good enough").

Only the last step carries a graph, so the no-gradient prefix can run anywhere, e.g. in a sampler actor: `prefix`
returns the latents at the chosen step and `refl_update` finishes the chain in the learner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ralign.diffusion.policy import DiffusionPolicy
from ralign.rewards.base import Reward, finite_mask, quarantine_records
from ralign.diffusion.sampler import decode_latents


@dataclass
class ReFLConfig:
    lam: float = 1.0  # reward level above which a sample no longer contributes (lambda in ReLU(lambda - r))
    scale: float = 1.0
    late_step_min: int = 0  # chain step range for the gradient step, as offsets from the end of the chain:
    late_step_max: int = 5  # step k is drawn from [steps - late_step_max, steps - late_step_min)
    pretrain_loss_weight: float = 0.0  # optional denoising loss on reference latents (ReFL's regulariser)


def refl_loss(rewards: torch.Tensor, lam: float, scale: float) -> torch.Tensor:
    return (torch.relu(lam - rewards) * scale).mean()


def choose_late_step(steps: int, cfg: ReFLConfig, generator: torch.Generator | None = None) -> int:
    lo, hi = steps - cfg.late_step_max, steps - cfg.late_step_min
    if not (0 <= lo < hi <= steps):
        raise ValueError(f"ReFL late-step window [{lo}, {hi}) is not inside a {steps}-step chain")
    return int(torch.randint(lo, hi, (1,), generator=generator))


def prefix(policy: DiffusionPolicy, prompts: Sequence[str], seeds: Sequence[int], stop_step: int) -> torch.Tensor:
    """Latents x_{t_k} after `stop_step` no-gradient steps (what a sampler actor hands to the learner)."""
    return policy.sample_prefix(prompts, seeds, stop_step)


def refl_update(
    policy: DiffusionPolicy,
    prompts: Sequence[str],
    latents_k: torch.Tensor,
    step_k: int,
    reward: Reward,
    cfg: ReFLConfig,
    backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward(),
    quarantine: list | None = None,
) -> dict[str, float]:
    """One gradient step from x_{t_k} to predicted x_0, reward, ReFL loss; returns stats (the caller steps).
    Samples whose reward is not finite are left out of the loss (and described in `quarantine`, when given)."""
    policy.scheduler.set_timesteps(policy.cfg.steps)
    t = int(policy.scheduler.timesteps[step_k])
    cond, uncond = policy.encode(prompts)
    eps = policy.noise_pred(latents_k, t, cond, uncond)
    alpha = policy.scheduler.alphas_cumprod[t].to(latents_k.dtype)
    pred_x0 = (latents_k - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    images = decode_latents(policy.vae, pred_x0)
    out = reward(images, prompts)
    ok = finite_mask(out)
    if quarantine is not None and not ok.all():
        quarantine.extend(quarantine_records(out, ok, prompts, images))
    if not ok.any():
        return {"loss": float("nan"), "reward": float("nan"), "quarantined": float((~ok).sum())}
    loss = refl_loss(out.score[ok], cfg.lam, cfg.scale)
    backward(loss)
    stats = {"loss": loss.item(), "reward": out.score[ok].mean().item(), "quarantined": float((~ok).sum()), "step_k": float(step_k)}
    stats.update({f"reward/{k}": v[ok].mean().item() for k, v in out.components.items()})
    return stats
