"""Direct reward backpropagation through the sampling chain: DRaFT-K, AlignProp, and the interval scheme.

Which denoising steps carry gradient into the trainable weights:
- `draft`: the last K steps (DRaFT-K); K = 1 is DRaFT-1.
- `alignprop`: the last K steps with K drawn uniformly from [1, k] each update (AlignProp's random truncation).
- `interval`: every `interval`-th step from a random offset (what CoMat and LongAlign do: 5 of 50 steps); between
  them the UNet runs without parameter gradient but the latent path stays differentiable, so gradient from the
  reward reaches the earlier gradient steps through the chain.
Everything before the first gradient step is a no-gradient prefix; it can run in a sampler actor and be handed over
(`start_latents`, `start_step`). TextCraftor trains the text encoder with `draft`: the prefix uses the original
encoder's embeddings, the gradient steps the tuned encoder's. UNet calls with gradient are checkpointed, so memory
grows with the number of gradient steps by one latent per step, not by one UNet's activations per step.

Rewards that need more than the final images (CoMat, ralign/rewards/base.py) get them from here: the cross-attention
maps of `attention_steps` randomly chosen gradient steps (those UNet calls run un-checkpointed, with recording
attention processors), and the final latents. A reward that trains alongside (CoMat's discriminator) takes one
`adversarial_update` per micro-batch on the frozen model's latents for the same prompts and noise versus these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ralign.diffusion.attention_capture import AttentionStore
from ralign.diffusion.policy import DiffusionPolicy, step_generator
from ralign.rewards.base import Reward, finite_mask, quarantine_records
from ralign.diffusion.sampler import ddim_step_with_logprob, decode_latents, guided_noise, initial_noise
from ralign.diffusion.text_encoding import token_offsets


@dataclass
class DirectBackpropConfig:
    mode: str = "draft"  # draft | alignprop | interval
    k: int = 1  # draft: gradient steps; alignprop: maximum truncation
    interval: int = 10  # interval mode: one gradient step every `interval` steps
    checkpointing: bool = True
    loss_scale: float = 1.0
    original_text_prefix: bool = True  # TextCraftor: original encoder for no-gradient steps
    attention_steps: int = 2  # rewards that use attention: gradient steps whose cross-attention is captured (CoMat: 2)


def gradient_steps(steps: int, cfg: DirectBackpropConfig, generator: torch.Generator | None = None) -> list[int]:
    """Indices (0 = first denoising step) of the steps whose UNet call carries gradient."""
    if cfg.mode == "draft":
        k = cfg.k
    elif cfg.mode == "alignprop":
        k = int(torch.randint(1, cfg.k + 1, (1,), generator=generator))
    elif cfg.mode == "interval":
        offset = int(torch.randint(0, cfg.interval, (1,), generator=generator))
        return list(range(offset, steps, cfg.interval))
    else:
        raise ValueError(f"direct backprop mode must be draft, alignprop or interval, got {cfg.mode!r}")
    if not 1 <= k <= steps:
        raise ValueError(f"k={k} gradient steps do not fit a {steps}-step chain")
    return list(range(steps - k, steps))


def _unet_eps(policy: DiffusionPolicy, x, t, cond, uncond, use_checkpoint: bool):
    if use_checkpoint:
        return checkpoint(guided_noise, policy.unet, x, t, cond, uncond, policy.cfg.guidance, use_reentrant=False)
    return guided_noise(policy.unet, x, t, cond, uncond, policy.cfg.guidance)


def run_chain(
    policy: DiffusionPolicy,
    prompts: Sequence[str],
    start_latents: torch.Tensor,
    start_step: int,
    grad_steps: Sequence[int],
    cfg: DirectBackpropConfig,
    generator: torch.Generator | None = None,
    attention_store: AttentionStore | None = None,
    attention_steps: Sequence[int] = (),
) -> tuple[torch.Tensor, list[dict[str, list[torch.Tensor]]]]:
    """Final latents x_0 from `start_latents` at `start_step`, with gradient through `grad_steps`, and the
    cross-attention maps of `attention_steps` (a subset of `grad_steps`) when an `attention_store` is given."""
    steps = policy.cfg.steps
    policy.scheduler.set_timesteps(steps)
    grad_set = set(grad_steps)
    first_grad = min(grad_set) if grad_set else steps
    with torch.no_grad():
        plain_cond, plain_uncond = policy.encode(prompts, original=cfg.original_text_prefix)
    cond, uncond = policy.encode(prompts) if grad_set else (plain_cond, plain_uncond)
    x = start_latents
    maps = []
    for k in range(start_step, steps):
        t = int(policy.scheduler.timesteps[k])
        if k in grad_set and attention_store is not None and k in attention_steps:
            with attention_store.capture():
                eps = guided_noise(policy.unet, x, t, cond, uncond, policy.cfg.guidance)
            maps.append(attention_store.maps(len(prompts)))
            attention_store.clear()
        elif k in grad_set:
            eps = _unet_eps(policy, x, t, cond, uncond, cfg.checkpointing)
        else:
            with torch.no_grad():
                c, u = (plain_cond, plain_uncond) if k < first_grad else (cond.detach(), uncond.detach())
                eps = guided_noise(policy.unet, x, t, c, u, policy.cfg.guidance)
        x = ddim_step_with_logprob(policy.scheduler, eps, t, x, policy.cfg.eta, generator=generator).prev_sample \
            if policy.cfg.eta > 0 else _ddim_deterministic(policy, eps, t, x)
        if k < first_grad:
            x = x.detach()
    return x, maps


def _ddim_deterministic(policy: DiffusionPolicy, eps: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
    # eta = 0: diffusers' own DDIM step is differentiable in eps and x.
    return policy.scheduler.step(eps, t, x, eta=0.0).prev_sample


def backprop_update(
    policy: DiffusionPolicy,
    prompts: Sequence[str],
    seeds: Sequence[int],
    reward: Reward,
    cfg: DirectBackpropConfig,
    backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward(),
    start_latents: torch.Tensor | None = None,
    start_step: int = 0,
    grad_steps: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    quarantine: list | None = None,
) -> dict[str, float]:
    """Loss = -mean reward of the decoded final images; backward through the chosen steps (the caller steps).
    Samples whose reward is not finite are left out of the loss (and described in `quarantine`, when given)."""
    if grad_steps is None:
        grad_steps = gradient_steps(policy.cfg.steps, cfg, generator)
    if start_latents is None:
        start_latents = initial_noise(policy.latent_shape(), seeds, device=policy.device)
    inputs, store, attention_steps = {}, None, []
    if getattr(reward, "uses_attention", False) and grad_steps:
        if policy.cfg.text_encoding != "plain":
            raise ValueError("attention-based rewards need token positions of the plain text encoding, not segment encoding")
        store = AttentionStore(policy.unet)
        order = torch.randperm(len(grad_steps), generator=generator)[: cfg.attention_steps].tolist()
        attention_steps = sorted(grad_steps[i] for i in order)
    x0, maps = run_chain(policy, prompts, start_latents, start_step, grad_steps, cfg, generator, store, attention_steps)
    images = decode_latents(policy.vae, x0)
    if store is not None:
        inputs["attention"] = {"maps": maps, "token_offsets": [token_offsets(policy.tokenizer, p) for p in prompts]}
    if getattr(reward, "uses_latents", False):
        inputs["latents"] = x0
    stats: dict[str, float] = {}
    if hasattr(reward, "adversarial_update") and getattr(reward, "trains", True):
        # The discriminator learns before the generator is scored against it, on the same micro-batch.
        stats.update(reward.adversarial_update(frozen_model_latents(policy, prompts, seeds), x0.detach()))
    out = reward(images, prompts, **inputs)
    ok = finite_mask(out)
    if quarantine is not None and not ok.all():
        quarantine.extend(quarantine_records(out, ok, prompts, images))
    if not ok.any():
        return {"loss": float("nan"), "reward": float("nan"), "quarantined": float((~ok).sum())}
    loss = -out.score[ok].mean() * cfg.loss_scale
    backward(loss)
    stats.update({"loss": loss.item(), "reward": out.score[ok].mean().item(), "quarantined": float((~ok).sum()),
                  "grad_steps": float(len(grad_steps))})
    stats.update({f"reward/{k}": v[ok].mean().item() for k, v in out.components.items()})
    return stats


@torch.no_grad()
def frozen_model_latents(policy: DiffusionPolicy, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
    """What the pretrained model (adapters off, original text encoder) generates for these prompts and noise."""
    x_T = initial_noise(policy.latent_shape(), seeds, device=policy.device)
    with policy.reference():
        x0, _ = run_chain(policy, prompts, x_T, 0, [], DirectBackpropConfig(original_text_prefix=True), step_generator(seeds))
    return x0
