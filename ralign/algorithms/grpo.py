"""GRPO (Flow-GRPO / DanceGRPO): group-relative policy optimisation over the denoising chain.

Each batch holds groups of `group_size` samples of one prompt (the samplers draw them with distinct noise); a
sample's advantage is its reward minus its group's mean, divided by the group's standard deviation (or, with
`advantage_std: global`, by the standard deviation of the centred rewards of the whole global batch, which keeps a
group whose rewards barely differ from getting full-sized advantages). Per trained step k:

    ratio_k = exp(mean_d log p_theta(x_{k+1} | x_k) - mean_d log p_old(x_{k+1} | x_k))
    loss_k  = max(-A ratio_k, -A clip(ratio_k, 1 - eps, 1 + eps))  +  beta KL_k,
    KL_k    = mean_d (mu_theta - mu_ref)^2 / (2 sigma_k^2)

with log-probabilities and the KL *averaged* over the latent's dimensions (Flow-GRPO's and ddpo-pytorch's
convention: a ratio of summed log-densities is exp(D times a per-dimension change), D = 256 here and 16,384 for SD1.5
latents, and clips at once). The reference is the same network with its adapters off. Each of `inner_epochs` passes
splits the batch into `minibatches` optimiser updates, each over a fresh random subset of the chain's steps; on the
first pass of fresh rollouts the ratio is exactly 1.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ralign.algorithms.base import RolloutAlgorithm, UpdateContext, check_skip_last_steps
from ralign.config import StrictModel
from ralign.diffusion.sampler import as_timestep
from ralign.rollout.batch import Chains


class GRPOSettings(StrictModel):
    group_size: int = Field(8, ge=2)  # samples per prompt in a batch
    advantage_std: Literal["group", "global"] = "global"
    adv_clip: float = Field(5.0, gt=0.0)
    clip_range: float = Field(5e-3, gt=0.0)  # on the ratio of per-dimension mean log-probabilities
    beta: float = Field(1.0, ge=0.0)  # KL to the reference, per-dimension mean (same scale as the policy term)
    timestep_fraction: float = Field(0.5, gt=0.0, le=1.0)  # of the trainable steps, drawn afresh per update
    # The last steps of a short chain are never trained: their score-function scale |d mean / d eps| / sigma is many
    # times the others' (the log-prob gradient of step 8 of a 10-step DDIM chain is 10-20x any other's, and with it
    # the gradients of two halves of a batch point apart: cosine -0.40, +0.24 without it) and carry fine detail.
    skip_last_steps: int = Field(2, ge=0)
    inner_epochs: int = Field(1, ge=1)
    minibatches: int = Field(2, ge=1)  # optimiser updates per pass over the batch
    eps: float = Field(1e-4, gt=0.0)  # added to the advantage's standard deviation
    # DanceGRPO's init_same_noise: a group's samples start from one x_T, so what separates their rewards is the step
    # noise the ratio is computed over, not an initial noise the policy never chose.
    shared_initial_noise: bool = False


def check_minibatches(section: str, minibatches: int, train) -> None:
    """Each of an update's `minibatches` optimiser steps takes whole micro-batches of the batch."""
    if train.batch_size % minibatches or (train.batch_size // minibatches) % train.micro_batch:
        raise ValueError(f"algorithm.{section}.minibatches={minibatches} must split train.batch_size={train.batch_size} into "
                         f"minibatches that are multiples of train.micro_batch={train.micro_batch}")


def group_advantages(scores: torch.Tensor, groups: list[int], std: str, eps: float,
                     global_scale: float | None = None) -> torch.Tensor:
    """(r - group mean) / (group std | `global_scale`) for each sample; `groups[i]` names sample i's group."""
    scores = scores.double()
    keys = torch.tensor(groups)
    centred = torch.empty_like(scores)
    scale = torch.empty_like(scores)
    for g in keys.unique().tolist():
        idx = (keys == g).nonzero().flatten()
        r = scores[idx]
        centred[idx] = r - r.mean()
        scale[idx] = r.std(unbiased=False) if len(idx) > 1 else 0.0
    if std == "global":
        scale[:] = centred.std(unbiased=False) if global_scale is None else global_scale
    return (centred / (scale + eps)).float()


def batch_advantages(scores: torch.Tensor, groups: list[int], std: str, eps: float, gather) -> torch.Tensor:
    """`group_advantages` of this worker's samples; with std "global" the scale is that of the centred rewards over
    every learner's batch (`gather`: one object from every worker; groups never straddle workers)."""
    global_scale = None
    if std == "global":
        parts = gather((scores - group_means(scores, groups)).tolist())
        flat = torch.tensor([x for part in parts for x in part], dtype=torch.float64)
        global_scale = float(flat.std(unbiased=False)) if len(flat) > 1 else 0.0
    return group_advantages(scores, groups, std, eps, global_scale)


def mean_log_prob(log_prob_sum: torch.Tensor, latent_numel: int) -> torch.Tensor:
    """A step's log-density averaged over the latent's dimensions, from its sum over them (what samplers record)."""
    return log_prob_sum / latent_numel


def grpo_step_loss(log_prob_new: torch.Tensor, log_prob_old: torch.Tensor, advantages: torch.Tensor,
                   mean_new: torch.Tensor, mean_ref: torch.Tensor | None, std: torch.Tensor, cfg: GRPOSettings
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """One step's loss averaged over the micro-batch; log-probabilities are per-dimension means (B,)."""
    ratio = torch.exp(log_prob_new - log_prob_old)
    adv = advantages.clamp(-cfg.adv_clip, cfg.adv_clip)
    policy_loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)).mean()
    loss = policy_loss
    stats = {"policy_loss": policy_loss.item(), "ratio_mean": ratio.mean().item(),
             "ratio_max_dev": (ratio - 1).abs().max().item(),
             "clip_fraction": ((ratio - 1).abs() > cfg.clip_range).float().mean().item()}
    if mean_ref is not None:
        kl = ((mean_new - mean_ref) ** 2).flatten(1).mean(1) / (2 * std**2)
        loss = loss + cfg.beta * kl.mean()
        stats["kl"] = kl.mean().item()
    return loss, stats


class GRPO(RolloutAlgorithm):
    name = "grpo"
    section = "grpo"
    model_families = ("unet", "flow")
    group_size_setting = "group_size"
    Settings = GRPOSettings

    @property
    def shares_initial_noise(self) -> bool:
        return self.settings.shared_initial_noise

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        s = cfg.algorithm.settings_of(cls.section)
        check_skip_last_steps(cls.section, s.skip_last_steps, cfg)
        check_minibatches(cls.section, s.minibatches, cfg.train)

    def trainable_steps(self) -> int:
        return self.cfg.model.policy.steps - self.settings.skip_last_steps

    def steps_per_update(self) -> int:
        return max(1, round(self.settings.timestep_fraction * self.trainable_steps()))

    def micro_batches_per_update(self) -> int:
        return self.cfg.train.batch_size // self.settings.minibatches // self.cfg.train.micro_batch

    def backwards_per_update(self) -> int:
        return self.micro_batches_per_update() * self.steps_per_update()

    def update(self, batch: Chains, ctx: UpdateContext) -> dict[str, float]:
        s, policy = self.settings, ctx.policy
        scores = batch.score_tensor()
        advantages = batch_advantages(scores, [i // s.group_size for i in batch.ids], s.advantage_std, s.eps, ctx.gather)
        latents = torch.as_tensor(batch.latents)
        old_log_probs = mean_log_prob(torch.as_tensor(batch.log_probs), latents[0, 0].numel())
        n_steps = old_log_probs.shape[1]
        per_update = len(batch) // s.minibatches
        totals: dict[str, float] = {}
        worst_ratio = 0.0
        updates = 0
        for _ in range(s.inner_epochs):
            order = torch.randperm(len(batch), generator=ctx.generator)
            for m in range(s.minibatches):
                chosen = torch.randperm(self.trainable_steps(), generator=ctx.generator)[: self.steps_per_update()].tolist()
                minibatch = order[m * per_update: (m + 1) * per_update].tolist()
                for lo in range(0, len(minibatch), ctx.micro_batch):
                    idx = minibatch[lo: lo + ctx.micro_batch]
                    prompts = [batch.prompts[i] for i in idx]
                    cond, uncond = policy.encode(prompts)
                    for k in chosen:
                        t = as_timestep(batch.timesteps[k])
                        x_t, x_prev = latents[idx, k].to(policy.device), latents[idx, k + 1].to(policy.device)
                        mean_ref = None
                        if s.beta > 0:
                            with torch.no_grad(), policy.reference():
                                ref_cond, ref_uncond = policy.encode(prompts)
                                mean_ref = policy.step_log_prob(x_t, t, ref_cond, ref_uncond, prev_sample=x_prev, steps=n_steps).mean
                        out = policy.step_log_prob(x_t, t, cond, uncond, prev_sample=x_prev, steps=n_steps)
                        loss, stats = grpo_step_loss(mean_log_prob(out.log_prob, x_t[0].numel()), old_log_probs[idx, k].to(policy.device),
                                                     advantages[idx].to(policy.device), out.mean, mean_ref, out.std, s)
                        # The update's loss is the mean over its trained steps.
                        ctx.backward(loss / len(chosen))
                        if policy.cfg.text_encoder != "frozen":
                            cond, uncond = policy.encode(prompts)  # the graph through the text encoder was freed
                        worst_ratio = max(worst_ratio, stats.pop("ratio_max_dev"))
                        for key, value in stats.items():
                            totals[key] = totals.get(key, 0.0) + value
                        updates += 1
                ctx.end_update()
        out = {k: v / max(1, updates) for k, v in totals.items()}
        out["ratio_max_dev"] = worst_ratio  # on the first micro-steps of fresh rollouts it is 0: the sampling policy
        all_scores = torch.tensor([x for part in ctx.gather(scores.tolist()) for x in part])
        out["reward_mean"] = float(all_scores.mean())
        out["reward_std"] = float(all_scores.std()) if len(all_scores) > 1 else 0.0
        out["advantage_abs_mean"] = float(advantages.abs().mean())
        return out


def group_means(scores: torch.Tensor, groups: list[int]) -> torch.Tensor:
    keys = torch.tensor(groups)
    means = torch.empty_like(scores)
    for g in keys.unique().tolist():
        idx = (keys == g).nonzero().flatten()
        means[idx] = scores[idx].mean()
    return means
