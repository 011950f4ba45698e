"""Direct reward backpropagation through the sampling chain: what DRaFT-K (draft.py), AlignProp (alignprop.py) and
the interval scheme of CoMat and LongAlign (interval.py) share, on either policy family. They differ only in which denoising steps carry
gradient into the trainable weights; their settings are one section, `algorithm.backprop`.

Everything before the first gradient step is a no-gradient prefix; it can run in a sampler actor and be handed over
(`start_latents`, `start_step`). Between gradient steps the UNet runs without parameter gradient but the latent path
stays differentiable, so gradient from the reward reaches the earlier gradient steps through the chain. TextCraftor
trains the text encoder with DRaFT: the prefix uses the original encoder's embeddings, the gradient steps the tuned
encoder's. Network calls with gradient are checkpointed, so memory grows with the number of gradient steps by one
latent per step, not by one network's activations per step. The steps are the policy's own: DDIM over the UNet, or
Flow-GRPO's SDE (the ODE at eta 0) over a flow model's transformer, which is DRaFT-K on a flow model.

Rewards that need more than the final images (CoMat, ralign/rewards/base.py) get them from here: the cross-attention
maps of `attention_steps` randomly chosen gradient steps (those UNet calls run un-checkpointed, with recording
attention processors), and the final latents. A reward that trains alongside (CoMat's discriminator) takes one
`adversarial_update` per micro-batch on the frozen model's latents for the same prompts and noise versus these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from pydantic import Field

from ralign.algorithms.base import GradientAlgorithm, UpdateContext
from ralign.config import StrictModel
from ralign.diffusion.attention_capture import AttentionStore
from ralign.diffusion.seeding import initial_noise, step_generator
from ralign.diffusion.text_encoding import token_offsets
from ralign.rewards.base import Reward, finite_mask, quarantine_records

if TYPE_CHECKING:
    from ralign.diffusion.flow_policy import FlowPolicy
    from ralign.diffusion.policy import DiffusionPolicy
    from ralign.rollout.batch import Prefixes


class BackpropSettings(StrictModel):
    k: int = Field(1, ge=1)  # draft: gradient steps at the end of the chain; alignprop: the largest truncation
    interval: int = Field(5, ge=1)  # interval: one gradient step every `interval` steps from a random offset
    checkpointing: bool = True  # recompute UNet activations in backward (memory of one latent per gradient step)
    loss_scale: float = Field(1.0, gt=0.0)
    original_text_prefix: bool = True  # TextCraftor: the pretrained text encoder for the no-gradient steps
    attention_steps: int = Field(2, ge=1)  # rewards that score cross-attention (CoMat): gradient steps whose maps are captured


def run_chain(
    policy: "DiffusionPolicy | FlowPolicy",
    prompts: Sequence[str],
    start_latents: torch.Tensor,
    start_step: int,
    grad_steps: Sequence[int],
    cfg: BackpropSettings,
    generator: torch.Generator | None = None,
    attention_store: AttentionStore | None = None,
    attention_steps: Sequence[int] = (),
) -> tuple[torch.Tensor, list[dict[str, list[torch.Tensor]]]]:
    """Final latents x_0 from `start_latents` at `start_step`, with gradient through `grad_steps`, and the
    cross-attention maps of `attention_steps` (a subset of `grad_steps`) when an `attention_store` is given. Each
    step is the policy's own `chain_output` and `chain_transition` (DDIM for the UNet policy, Flow-GRPO's SDE or the
    ODE for a flow policy)."""
    steps = policy.cfg.steps
    grad_set = set(grad_steps)
    first_grad = min(grad_set) if grad_set else steps
    with torch.no_grad():
        plain_cond, plain_uncond = policy.encode(prompts, original=cfg.original_text_prefix)
    cond, uncond = policy.encode(prompts) if grad_set else (plain_cond, plain_uncond)
    x = start_latents
    maps = []
    for k in range(start_step, steps):
        if k in grad_set and attention_store is not None and k in attention_steps:
            with attention_store.capture():
                out = policy.chain_output(x, k, cond, uncond)
            maps.append(attention_store.maps(len(prompts)))
            attention_store.clear()
        elif k in grad_set:
            out = policy.chain_output(x, k, cond, uncond, checkpointed=cfg.checkpointing)
        else:
            with torch.no_grad():
                c, u = (plain_cond, plain_uncond) if k < first_grad else (_detached(cond), _detached(uncond))
                out = policy.chain_output(x, k, c, u)
        x = policy.chain_transition(out, k, x, generator)
        if k < first_grad:
            x = x.detach()
    return x, maps


def _detached(embeddings):
    # A flow policy's embeddings are (token states, pooled).
    return tuple(e.detach() for e in embeddings) if isinstance(embeddings, tuple) else embeddings.detach()


def pick_attention_steps(grad_steps: Sequence[int], count: int, generator: torch.Generator | None) -> list[int]:
    """`count` of the gradient steps, drawn at random, whose cross-attention is captured (CoMat: 2)."""
    order = torch.randperm(len(grad_steps), generator=generator)[:count].tolist()
    return sorted(grad_steps[i] for i in order)


def backprop_update(
    policy: "DiffusionPolicy | FlowPolicy",
    prompts: Sequence[str],
    seeds: Sequence[int],
    reward: Reward,
    cfg: BackpropSettings,
    grad_steps: Sequence[int],
    backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward(),
    start_latents: torch.Tensor | None = None,
    start_step: int = 0,
    generator: torch.Generator | None = None,
    quarantine: list | None = None,
) -> dict[str, float]:
    """Loss = -mean reward of the decoded final images; backward through `grad_steps` (the caller steps).
    Samples whose reward is not finite are left out of the loss (and described in `quarantine`, when given)."""
    grad_steps = list(grad_steps)
    if start_latents is None:
        start_latents = initial_noise(policy.latent_shape(), seeds, device=policy.device)
    inputs, store, attention_steps = {}, None, []
    if reward.uses_attention and grad_steps:
        if policy.family != "unet":
            raise ValueError(f"reward {reward.name} scores cross-attention maps, which are recorded from a UNet's attention "
                             "processors; a flow model's joint attention has none (use a reward of the final images)")
        if policy.cfg.text_encoding != "plain":
            raise ValueError("attention-based rewards need token positions of the plain text encoding, not segment encoding")
        store = AttentionStore(policy.unet)
        attention_steps = pick_attention_steps(grad_steps, cfg.attention_steps, generator)
    x0, maps = run_chain(policy, prompts, start_latents, start_step, grad_steps, cfg, generator, store, attention_steps)
    images = policy.decode(x0)
    if store is not None:
        inputs["attention"] = {"maps": maps, "token_offsets": [token_offsets(policy.tokenizer, p) for p in prompts]}
    if reward.uses_latents:
        inputs["latents"] = x0
    stats: dict[str, float] = {}
    if reward.trains:
        # The discriminator learns before the generator is scored against it, on the same micro-batch.
        stats.update(reward.adversarial_update(frozen_model_latents(policy, prompts, seeds), x0.detach()))
    out = reward(images, prompts, **inputs)
    ok = finite_mask(out)
    if quarantine is not None and not ok.all():
        quarantine.extend(quarantine_records(out, ok, prompts, images))
    if not ok.any():
        return {"loss": float("nan"), "reward": float("nan"), "quarantined": float((~ok).sum()), "skipped": True}
    loss = -out.score[ok].mean() * cfg.loss_scale
    backward(loss)
    stats.update({"loss": loss.item(), "reward": out.score[ok].mean().item(), "quarantined": float((~ok).sum())})
    stats.update({f"reward/{k}": v[ok].mean().item() for k, v in out.components.items()})
    return stats


@torch.no_grad()
def frozen_model_latents(policy: "DiffusionPolicy | FlowPolicy", prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
    """What the pretrained model (adapters off, original text encoder) generates for these prompts and noise."""
    x_T = initial_noise(policy.latent_shape(), seeds, device=policy.device)
    with policy.reference():
        x0, _ = run_chain(policy, prompts, x_T, 0, [], BackpropSettings(original_text_prefix=True), step_generator(seeds))
    return x0


class BackpropAlgorithm(GradientAlgorithm):
    """What DRaFT, AlignProp and the interval scheme share: the chain, the settings, TextCraftor's prefix."""

    section = "backprop"
    Settings = BackpropSettings
    model_families = ("unet", "flow")  # the chain is the policy's own (`chain_output`, `chain_transition`)

    def original_text_prefix(self) -> bool:
        # TextCraftor: a run that tunes the text encoder starts its chains with the original encoder.
        return self.settings.original_text_prefix and self.cfg.model.policy.text_encoder != "frozen"

    def attention_steps(self, grad_steps: list[int], generator: torch.Generator) -> list[int]:
        return pick_attention_steps(grad_steps, self.settings.attention_steps, generator)

    def continue_chains(self, part: "Prefixes", x_start: torch.Tensor, start_step: int, grad_steps: list[int],
                        ctx: UpdateContext, quarantine: list) -> dict[str, float]:
        return backprop_update(ctx.policy, part.prompts, part.seeds, ctx.reward, self.settings, grad_steps,
                               backward=ctx.backward, start_latents=x_start, start_step=start_step,
                               generator=ctx.generator, quarantine=quarantine)


class LastStepsBackprop(BackpropAlgorithm):
    """DRaFT and AlignProp: the gradient flows through (up to) the last `k` steps, which must fit the chain."""

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        k, steps = cfg.algorithm.settings_of(cls.section).k, cfg.model.policy.steps
        if k > steps:
            raise ValueError(f"algorithm.backprop.k={k} is longer than model.policy.steps={steps}")
