"""DPOK: policy gradient over the denoising chain with a KL penalty to the pretrained policy.

    minimise  E[ -alpha * A * sum_t ratio_t ]  +  beta * sum_t KL_t,   KL_t = ||mu_theta - mu_pre||^2 / (2 sigma_t^2)

A is the reward normalised per prompt. For a rollout sampled by the current policy ratio_t = 1 and its gradient is
grad log p_theta(x_{t-1} | x_t, c), DPOK's estimator; rollouts from an older policy version (asynchronous samplers)
are importance-corrected with ratio_t = p_theta / p_old, clipped PPO-style to [1 - eps, 1 + eps]. The KL between
two Gaussians with the same sigma_t is the scaled squared distance of their means; the pretrained mean comes from
the same UNet with its LoRA adapters switched off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ralign.diffusion.policy import DiffusionPolicy
from ralign.diffusion.sampler import Trajectory, ddim_step_with_logprob


@dataclass
class DPOKConfig:
    alpha: float = 1.0  # policy-gradient weight
    beta: float = 0.01  # KL weight
    clip_range: float = 0.2  # importance-ratio clipping for reused / stale rollouts
    adv_clip: float = 5.0  # advantages beyond this many std are clipped (one outlier must not dominate a batch)
    timestep_fraction: float = 1.0  # fraction of the chain's steps trained on per update (random subset)


def dpok_step_loss(
    log_prob_new: torch.Tensor,
    log_prob_old: torch.Tensor,
    advantages: torch.Tensor,
    mean_new: torch.Tensor,
    mean_ref: torch.Tensor,
    std: torch.Tensor,
    cfg: DPOKConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one denoising step, averaged over the batch. All inputs per sample (B,), means (B, C, H, W)."""
    adv = advantages.clamp(-cfg.adv_clip, cfg.adv_clip)
    ratio = torch.exp(log_prob_new - log_prob_old)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    kl = ((mean_new - mean_ref) ** 2).flatten(1).sum(1) / (2 * std**2)
    loss = cfg.alpha * policy_loss + cfg.beta * kl.mean()
    stats = {
        "policy_loss": policy_loss.item(),
        "kl": kl.mean().item(),
        "ratio_mean": ratio.mean().item(),
        "clip_fraction": ((ratio - 1).abs() > cfg.clip_range).float().mean().item(),
    }
    return loss, stats


def dpok_update(
    policy: DiffusionPolicy,
    traj: Trajectory,
    advantages: torch.Tensor,
    cfg: DPOKConfig,
    backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward(),
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Accumulate DPOK gradients over the chain's steps, one backward per step (memory of one UNet call).

    The optimiser step is the caller's (a DeepSpeed engine in the learner, a plain optimiser in tests)."""
    n_steps = traj.log_probs.shape[1]
    n_train = max(1, round(cfg.timestep_fraction * n_steps))
    chosen = torch.randperm(n_steps, generator=generator)[:n_train].sort().values.tolist()
    policy.scheduler.set_timesteps(n_steps)
    cond, uncond = policy.encode(traj.prompts)
    totals: dict[str, float] = {}
    for k in chosen:
        t = int(traj.timesteps[k])
        x_t, x_prev = traj.latents[:, k], traj.latents[:, k + 1]
        with torch.no_grad(), policy.reference():
            eps_ref = policy.noise_pred(x_t, t, *policy.encode(traj.prompts))
            mean_ref = ddim_step_with_logprob(policy.scheduler, eps_ref, t, x_t, policy.cfg.eta, prev_sample=x_prev).mean
        eps = policy.noise_pred(x_t, t, cond, uncond)
        out = ddim_step_with_logprob(policy.scheduler, eps, t, x_t, policy.cfg.eta, prev_sample=x_prev)
        loss, stats = dpok_step_loss(out.log_prob, traj.log_probs[:, k], advantages, out.mean, mean_ref, out.std, cfg)
        # Sum over steps (DPOK's sum_t), so each step's loss enters unscaled.
        backward(loss)
        if policy.cfg.text_encoder != "frozen" and k != chosen[-1]:
            cond, uncond = policy.encode(traj.prompts)  # the graph through the text encoder was freed by backward
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value / len(chosen)
    totals["trained_steps"] = float(len(chosen))
    return totals
