"""ReFL (ImageReward): denoise without gradient to a random late step, take one UNet step with gradient to the
predicted x_0, decode it, and push the reward up with `ReLU(lambda - r) * scale` (rewards already above lambda
contribute nothing, which keeps the model from chasing the reward past "good enough").

Only the last step carries a graph, so the no-gradient prefix can run anywhere, e.g. in a sampler actor: `prefix`
returns the latents at the chosen step and `refl_update` finishes the chain in the learner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from pydantic import Field

from ralign.algorithms.base import GradientAlgorithm, UpdateContext
from ralign.config import StrictModel
from ralign.diffusion.sampler import decode_latents
from ralign.rewards.base import Reward, finite_mask, quarantine_records

if TYPE_CHECKING:
    from ralign.diffusion.policy import DiffusionPolicy
    from ralign.rollout.batch import Prefixes


class ReFLSettings(StrictModel):
    lam: float = 1.0  # reward level above which a sample no longer contributes (lambda in ReLU(lambda - r))
    scale: float = Field(1.0, gt=0.0)
    # The gradient step k is drawn from [steps - late_step_max, steps - late_step_min): offsets from the chain's end.
    late_step_min: int = Field(0, ge=0)
    late_step_max: int = Field(5, ge=1)


def refl_loss(rewards: torch.Tensor, lam: float, scale: float) -> torch.Tensor:
    return (torch.relu(lam - rewards) * scale).mean()


def choose_late_step(steps: int, cfg: ReFLSettings, generator: torch.Generator | None = None) -> int:
    lo, hi = steps - cfg.late_step_max, steps - cfg.late_step_min
    if not (0 <= lo < hi <= steps):
        raise ValueError(f"ReFL late-step window [{lo}, {hi}) is not inside a {steps}-step chain")
    return int(torch.randint(lo, hi, (1,), generator=generator))


def prefix(policy: "DiffusionPolicy", prompts: Sequence[str], seeds: Sequence[int], stop_step: int) -> torch.Tensor:
    """Latents x_{t_k} after `stop_step` no-gradient steps (what a sampler actor hands to the learner)."""
    return policy.sample_prefix(prompts, seeds, stop_step)


def refl_update(
    policy: "DiffusionPolicy",
    prompts: Sequence[str],
    latents_k: torch.Tensor,
    step_k: int,
    reward: Reward,
    cfg: ReFLSettings,
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
        return {"loss": float("nan"), "reward": float("nan"), "quarantined": float((~ok).sum()), "skipped": True}
    loss = refl_loss(out.score[ok], cfg.lam, cfg.scale)
    backward(loss)
    stats = {"loss": loss.item(), "reward": out.score[ok].mean().item(), "quarantined": float((~ok).sum())}
    stats.update({f"reward/{k}": v[ok].mean().item() for k, v in out.components.items()})
    return stats


class ReFL(GradientAlgorithm):
    name = "refl"
    section = "refl"
    Settings = ReFLSettings

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        r, steps = cfg.algorithm.settings_of(cls.section), cfg.model.policy.steps
        if not (r.late_step_min < r.late_step_max <= steps):
            raise ValueError(f"algorithm.refl late-step window [{r.late_step_min}, {r.late_step_max}) must lie inside "
                             f"model.policy.steps={steps}")

    def draw_gradient_steps(self, generator: torch.Generator) -> list[int]:
        return [choose_late_step(self.cfg.model.policy.steps, self.settings, generator)]

    def continue_chains(self, part: "Prefixes", x_start: torch.Tensor, start_step: int, grad_steps: list[int],
                        ctx: UpdateContext, quarantine: list) -> dict[str, float]:
        k = grad_steps[0]
        if start_step < k:  # the learner runs the prefix itself (algorithm.prefix_on_samplers=false)
            if start_step != 0:
                raise ValueError(f"a handed-over ReFL prefix must end at the gradient step {k}, not at {start_step}")
            with torch.no_grad():
                x_start = prefix(ctx.policy, part.prompts, part.seeds, k)
        return refl_update(ctx.policy, part.prompts, x_start, k, ctx.reward, self.settings, backward=ctx.backward,
                           quarantine=quarantine)
