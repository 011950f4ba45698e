"""DPOK: policy gradient over the denoising chain with a KL penalty to the pretrained policy.

    minimise  E[ -alpha * A * sum_t ratio_t ]  +  beta * sum_t KL_t,   KL_t = ||mu_theta - mu_pre||^2 / (2 sigma_t^2)

A is the reward normalised per prompt (over the global batch of all learner workers and a short history of each
prompt, as DDPO / DPOK do). For a rollout sampled by the current policy ratio_t = 1 and its gradient is
grad log p_theta(x_{t-1} | x_t, c), DPOK's estimator; rollouts from an older policy version (asynchronous samplers)
are importance-corrected with ratio_t = p_theta / p_old, clipped PPO-style to [1 - eps, 1 + eps]. The KL between
two Gaussians with the same sigma_t is the scaled squared distance of their means; the pretrained mean comes from
the same UNet with its LoRA adapters switched off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from pydantic import Field

from ralign.algorithms.advantages import PerPromptNormalizer
from ralign.algorithms.base import RolloutAlgorithm, UpdateContext, check_skip_last_steps
from ralign.config import StrictModel
from ralign.diffusion.sampler import as_timestep
from ralign.diffusion.sampler import Trajectory

if TYPE_CHECKING:
    from ralign.diffusion.policy import DiffusionPolicy
    from ralign.rollout.batch import Chains


class DPOKSettings(StrictModel):
    alpha: float = 1.0  # policy-gradient weight
    beta: float = Field(0.01, ge=0.0)  # KL weight
    clip_range: float = Field(0.2, gt=0.0)  # importance-ratio clipping for reused / stale rollouts
    adv_clip: float = Field(5.0, gt=0.0)  # advantages beyond this many std are clipped (one outlier must not dominate)
    timestep_fraction: float = Field(0.5, gt=0.0, le=1.0)  # fraction of the trainable steps trained on per update
    # The last steps of a short chain are never trained: their score-function scale is many times the others'
    # (10-20x for step 8 of a 10-step DDIM chain, measured) and they carry fine detail, not composition.
    skip_last_steps: int = Field(0, ge=0)
    samples_per_prompt: int = Field(1, ge=1)  # consecutive samples of one prompt in a batch (per-prompt statistics)
    inner_epochs: int = Field(1, ge=1)  # optimiser updates per batch


def dpok_step_loss(
    log_prob_new: torch.Tensor,
    log_prob_old: torch.Tensor,
    advantages: torch.Tensor,
    mean_new: torch.Tensor,
    mean_ref: torch.Tensor,
    std: torch.Tensor,
    cfg: DPOKSettings,
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


def trained_steps(n_steps: int, cfg: DPOKSettings) -> int:
    return max(1, round(cfg.timestep_fraction * (n_steps - cfg.skip_last_steps)))


def dpok_update(
    policy: "DiffusionPolicy",
    traj: Trajectory,
    advantages: torch.Tensor,
    cfg: DPOKSettings,
    backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward(),
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Accumulate DPOK gradients over a random subset of the chain's steps, one backward per step (memory of one
    UNet call). The optimiser step is the caller's (a DeepSpeed engine in the learner, a plain optimiser in tests)."""
    n_steps = traj.log_probs.shape[1]
    chosen = torch.randperm(n_steps - cfg.skip_last_steps, generator=generator)[: trained_steps(n_steps, cfg)].sort().values.tolist()
    cond, uncond = policy.encode(traj.prompts)
    totals: dict[str, float] = {}
    for k in chosen:
        t = as_timestep(traj.timesteps[k])
        x_t, x_prev = traj.latents[:, k], traj.latents[:, k + 1]
        with torch.no_grad(), policy.reference():
            mean_ref = policy.step_log_prob(x_t, t, *policy.encode(traj.prompts), prev_sample=x_prev, steps=n_steps).mean
        out = policy.step_log_prob(x_t, t, cond, uncond, prev_sample=x_prev, steps=n_steps)
        loss, stats = dpok_step_loss(out.log_prob, traj.log_probs[:, k], advantages, out.mean, mean_ref, out.std, cfg)
        # Sum over steps (DPOK's sum_t), so each step's loss enters unscaled.
        backward(loss)
        if policy.cfg.text_encoder != "frozen" and k != chosen[-1]:
            cond, uncond = policy.encode(traj.prompts)  # the graph through the text encoder was freed by backward
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value / len(chosen)
    return totals


class DPOK(RolloutAlgorithm):
    name = "dpok"
    section = "dpok"
    model_families = ("unet", "flow")
    group_size_setting = "samples_per_prompt"
    Settings = DPOKSettings

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        check_skip_last_steps(cls.section, cfg.algorithm.settings_of(cls.section).skip_last_steps, cfg)

    def __init__(self, cfg):
        super().__init__(cfg)
        group = self.settings.samples_per_prompt
        # A prompt's own statistics once it has 4 rewards, or its whole group when groups are smaller.
        self.normalizer = PerPromptNormalizer(min_count=4 if group == 1 else min(4, group))

    def backwards_per_update(self) -> int:
        micro_batches = self.cfg.train.batch_size // self.cfg.train.micro_batch
        return micro_batches * trained_steps(self.cfg.model.policy.steps, self.settings)

    def update(self, batch: "Chains", ctx: UpdateContext) -> dict[str, float]:
        scores = batch.score_tensor()
        # Per-prompt normalisation over the global batch (all learner workers), as DDPO/DPOK do.
        gathered = ctx.gather((list(batch.prompts), scores.tolist()))
        all_prompts = [p for ps, _ in gathered for p in ps]
        all_scores = torch.tensor([s for _, ss in gathered for s in ss])
        all_adv = self.normalizer(all_prompts, all_scores)
        offset = sum(len(ps) for ps, _ in gathered[: ctx.rank])
        advantages = all_adv[offset : offset + len(batch)]
        policy, mb, epochs = ctx.policy, ctx.micro_batch, self.settings.inner_epochs
        micro_batches = -(-len(batch) // mb)
        totals: dict[str, float] = {}
        for _ in range(epochs):
            for start in range(0, len(batch), mb):
                sl = slice(start, start + mb)
                traj = Trajectory(batch.prompts[sl], torch.as_tensor(batch.latents[sl]).to(policy.device),
                                  torch.as_tensor(batch.log_probs[sl]).to(policy.device), None, None, torch.as_tensor(batch.timesteps))
                stats = dpok_update(policy, traj, advantages[sl].to(policy.device), self.settings, backward=ctx.backward,
                                    generator=ctx.generator)
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v / (micro_batches * epochs)
            ctx.end_update()
        totals["reward_mean"] = float(all_scores.mean())  # the global batch's, on every worker
        totals["reward_std"] = float(all_scores.std()) if len(all_scores) > 1 else 0.0
        return totals

    def state_dict(self) -> dict:
        return {"normalizer": {p: list(h) for p, h in self.normalizer.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.normalizer.history.clear()
        for p, h in state.get("normalizer", {}).items():
            self.normalizer.history[p].extend(h)
