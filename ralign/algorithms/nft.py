"""DiffusionNFT (Zheng et al., 2025): online RL on the *forward* process. The policy learns from the final images of
its own chains with the pretraining (denoising) loss, contrasting an implicit positive and negative policy; no
log-probability of the sampler is used, so any sampler (eta 0 too) will do and no chain is re-run.

For each sample x_0 with optimality r in [0, 1] (from its group-relative advantage A: r = 1/2 + 1/2 clip(A / c, -1, 1)),
noise it at a uniformly drawn training time (the policy's forward process, `noised_for_training`: DDPM's
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for the UNet, the straight path x_sigma = (1 - sigma) x_0 + sigma eps for
a flow model) and with the network's prediction p_theta (noise, or velocity eps - x_0) and the prediction p_old of
the policy that started the update (no gradient):

    p_plus  = (1 - beta) p_old + beta p_theta              (the implicit positive policy)
    p_minus = (1 + beta) p_old - beta p_theta              (the implicit negative policy)
    loss    = [ r |p_plus - target|^2 + (1 - r) |p_minus - target|^2 ] / beta   (+ kl_weight |p_theta - p_ref|^2)

with squared norms averaged over the latent's dimensions. At p_theta = p_old its gradient is (2r - 1) times the
denoising loss's: images better than their group are learnt, worse ones unlearnt. The paper writes it for a
velocity-predicting flow model (the flow policy here is that case); for the epsilon-predicting UNet the same
construction is applied to the noise prediction, which is an affine function of x_0's prediction at fixed x_t, so the
implicit policies are the same. Training is CFG-free (the conditional prediction only), as in the paper; sampling
keeps the policy's guidance.

Why it is here (benchmarks/results/quickstart.md): on four fixed prompts with 64 samples per update, GRPO with the
detector reward lowered that reward (0.59 -> 0.33 at lr 5e-3, 0.59 -> 0.42 at 1e-3; so did random rewards: the
likelihood-ratio gradient over the chain is noise at this batch size), while this update raised it (0.59 -> 0.69 in
15 iterations at lr 1e-3) at half the time per iteration.

The "old" policy is the one at the start of the update (the samplers' policy when on-policy); the paper keeps an
EMA of the trained weights instead, which needs a second copy of the adapters on every sampler.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ralign.algorithms.base import RolloutAlgorithm, UpdateContext
from ralign.algorithms.grpo import batch_advantages, check_minibatches
from ralign.config import StrictModel
from ralign.rollout.batch import Chains


class NFTSettings(StrictModel):
    group_size: int = Field(8, ge=2)  # samples per prompt in a batch
    advantage_std: Literal["group", "global"] = "global"  # as GRPO's
    adv_clip: float = Field(2.0, gt=0.0)  # c: advantages at +-c and beyond give r = 1 or 0
    beta: float = Field(1.0, gt=0.0)  # strength of the implicit policies' step away from e_old
    kl_weight: float = Field(0.0, ge=0.0)  # pull of e_theta towards the adapter-off reference (same noisy latents)
    t_min: int = Field(0, ge=0, lt=1000)  # lowest training timestep (DDPM's; a flow model's sigma from t_min / 1000)
    minibatches: int = Field(1, ge=1)  # optimiser updates per pass over the batch
    inner_epochs: int = Field(1, ge=1)  # passes over one batch (each with the noise drawn at its start)
    eps: float = Field(1e-4, gt=0.0)  # added to the advantage's standard deviation
    # The samples of one prompt are noised with the same noise and time (common random numbers): their (2r - 1)-weighted
    # gradients then differ only by what differs between their images, since the group's weights sum to ~0.
    shared_noise: bool = False


def optimality(advantages: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """r = 1/2 + 1/2 clip(A / c, -1, 1): the weight of a sample's positive term (1 - r: its negative term)."""
    return 0.5 + 0.5 * (advantages / adv_clip).clamp(-1.0, 1.0)


def nft_loss(e_theta: torch.Tensor, e_old: torch.Tensor, target: torch.Tensor, r: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean over the micro-batch of [r |e+ - target|^2 + (1 - r) |e- - target|^2] / beta (per-dimension means);
    the target is the noise for the UNet and the velocity noise - x_0 for a flow model."""
    positive = ((1 - beta) * e_old + beta * e_theta - target).pow(2).flatten(1).mean(1)
    negative = ((1 + beta) * e_old - beta * e_theta - target).pow(2).flatten(1).mean(1)
    loss = ((r * positive + (1 - r) * negative) / beta).mean()
    return loss, {"positive_loss": positive.mean().item(), "negative_loss": negative.mean().item()}


class NFT(RolloutAlgorithm):
    name = "nft"
    section = "nft"
    group_size_setting = "group_size"
    Settings = NFTSettings
    model_families = ("unet", "flow")  # it reads the policy's forward process (`noised_for_training`, `predict`)
    needs_log_probs = False  # it learns from final images only

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        check_minibatches(cls.section, cfg.algorithm.settings_of(cls.section).minibatches, cfg.train)

    def micro_batches_per_update(self) -> int:
        return self.cfg.train.batch_size // self.settings.minibatches // self.cfg.train.micro_batch

    def update(self, batch: Chains, ctx: UpdateContext) -> dict[str, float]:
        s, policy = self.settings, ctx.policy
        scores = batch.score_tensor()
        groups = [i // s.group_size for i in batch.ids]
        advantages = batch_advantages(scores, groups, s.advantage_std, s.eps, ctx.gather)
        r = optimality(advantages, s.adv_clip).to(policy.device)
        x0 = torch.as_tensor(batch.final_latents).to(policy.device)
        n, mb = len(batch), ctx.micro_batch
        per_update = n // s.minibatches
        totals: dict[str, float] = {}
        passes = 0
        draws = torch.unique(torch.tensor(groups), return_inverse=True)[1] if s.shared_noise else torch.arange(n)
        for _ in range(s.inner_epochs):
            noise = torch.randn((int(draws.max()) + 1, *x0.shape[1:]), generator=ctx.generator)[draws].to(x0)
            noisy, t, target = policy.noised_for_training(x0, noise, ctx.generator, s.t_min, draws)
            # e_old and e_ref for the whole pass before any optimiser step: the policy that started it, and the
            # reference, each on the same noisy latents.
            with torch.no_grad():
                e_old = self._predict(policy, noisy, t, batch.prompts, range(n), mb)
                e_ref = None
                if s.kl_weight > 0:
                    with policy.reference():
                        e_ref = self._predict(policy, noisy, t, batch.prompts, range(n), mb)
            order = torch.randperm(n, generator=ctx.generator)
            for m in range(s.minibatches):
                chosen = order[m * per_update: (m + 1) * per_update].tolist()
                for lo in range(0, len(chosen), mb):
                    idx = chosen[lo: lo + mb]
                    cond, _ = policy.encode([batch.prompts[i] for i in idx])
                    e_theta = policy.predict(noisy[idx], t[idx], cond)
                    loss, stats = nft_loss(e_theta, e_old[idx], target[idx], r[idx], s.beta)
                    stats["policy_loss"] = loss.item()
                    if e_ref is not None:
                        kl = (e_theta - e_ref[idx]).pow(2).mean()
                        loss = loss + s.kl_weight * kl
                        stats["kl"] = kl.item()
                    ctx.backward(loss)
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0.0) + value
                    passes += 1
                ctx.end_update()
        out = {k: v / max(1, passes) for k, v in totals.items()}
        all_scores = torch.tensor([x for part in ctx.gather(scores.tolist()) for x in part])
        out["reward_mean"] = float(all_scores.mean())
        out["reward_std"] = float(all_scores.std()) if len(all_scores) > 1 else 0.0
        out["optimality_abs_dev"] = float((r - 0.5).abs().mean())  # 0: no sample is better or worse than its group
        return out

    @staticmethod
    def _predict(policy, noisy: torch.Tensor, t: torch.Tensor, prompts, indices, mb: int) -> torch.Tensor:
        indices = list(indices)
        out = []
        for lo in range(0, len(indices), mb):
            idx = indices[lo: lo + mb]
            cond, _ = policy.encode([prompts[i] for i in idx])
            out.append(policy.predict(noisy[idx], t[idx], cond))
        return torch.cat(out)

