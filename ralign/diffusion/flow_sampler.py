"""Flow-matching sampling that records what RL needs: the SDE of Flow-GRPO over a rectified-flow ODE, with each step's
Gaussian (mean, sigma) and the log-probability of the step taken, and the deterministic ODE sampler for evaluation.

A flow model predicts the velocity v = dx/dsigma of the straight path x_sigma = (1 - sigma) x_0 + sigma eps, and
diffusers' `FlowMatchEulerDiscreteScheduler.step` integrates the ODE x <- x + (sigma_next - sigma) v. That ODE has no
log-probability. Flow-GRPO (Liu et al., 2025, eq. 8-9) replaces it by the reverse-time SDE with the same marginals,

    x_next = x + [v + s^2 / (2 sigma) (x + (1 - sigma) v)] dt + s sqrt(-dt) eps,    dt = sigma_next - sigma < 0,
    s      = a sqrt(sigma / (1 - sigma))                                            (a = `noise_level`),

a Gaussian step whose mean and standard deviation s sqrt(-dt) are written out here (diffusers' scheduler has neither).
At sigma = 1 (the first step of an unshifted grid) sqrt(sigma / (1 - sigma)) is infinite; as in Flow-GRPO's code the
first step uses sigma_max = the grid's second sigma in that denominator. The sigma grid, its shift and the timestep
values fed to the transformer are the scheduler's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ralign.diffusion.sampler import StepOutput, gaussian_log_prob

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler

# Grid variants whose sigmas the SDE above cannot use as the time of the straight path, or that make the
# scheduler draw its own noise.
_REFUSED_FLAGS = ("invert_sigmas", "stochastic_sampling")


def check_flow_scheduler(scheduler: FlowMatchEulerDiscreteScheduler, noise_level: float, steps: int) -> None:
    """One line for scheduler settings the flow sampler cannot compute with."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(f"the flow policy samples with FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
    for flag in _REFUSED_FLAGS:
        if scheduler.config.get(flag):
            raise ValueError(f"the flow sampler cannot use a FlowMatchEulerDiscreteScheduler with {flag}=True: its sigmas "
                             "are then not the time of the straight path x = (1 - sigma) x0 + sigma noise")
    if scheduler.config.get("use_dynamic_shifting"):
        raise ValueError("the flow sampler needs a fixed sigma grid: FlowMatchEulerDiscreteScheduler has "
                         "use_dynamic_shifting=True (resolution-dependent mu); set a `shift` instead")
    if not 0.0 <= noise_level <= 2.0:
        raise ValueError(f"flow noise_level must be in [0, 2] (Flow-GRPO uses 0.7), got {noise_level}")
    if steps < 2:
        raise ValueError(f"the flow SDE needs at least 2 steps (its first step's sigma_max is the grid's second sigma), got {steps}")


def flow_grid(scheduler: FlowMatchEulerDiscreteScheduler, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (K,), sigmas (K + 1,)) of a `steps`-step grid, the last sigma 0: the scheduler's own."""
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.clone(), scheduler.sigmas.clone().float()


def sde_scale_squared(sigmas: torch.Tensor, k: int, noise_level: float) -> torch.Tensor:
    """s_k^2 = a^2 sigma_k / (1 - sigma_k), with sigma_max for sigma_k = 1 in the denominator (see above)."""
    sigma = sigmas[k]
    denominator_sigma = sigmas[1] if float(sigma) >= 1.0 else sigma
    return noise_level**2 * sigma / (1 - denominator_sigma)


def flow_sde_step_with_logprob(velocity: torch.Tensor, sigmas: torch.Tensor, k: int, sample: torch.Tensor,
                               noise_level: float, prev_sample: torch.Tensor | None = None,
                               generator: torch.Generator | None = None) -> StepOutput:
    """Step k of the SDE: x_{sigma_k} -> x_{sigma_{k+1}}; pass `prev_sample` to score a step already taken (no noise
    is drawn). `noise_level` 0 is the ODE step (std 0: no log-probability, refused here)."""
    if noise_level <= 0:
        raise ValueError("noise_level must be > 0: the flow ODE step has no log-probability (use flow_ode_step)")
    sigma, sigma_next = sigmas[k].to(sample.dtype), sigmas[k + 1].to(sample.dtype)
    dt = sigma_next - sigma
    s2 = sde_scale_squared(sigmas, k, noise_level).to(sample.dtype)
    mean = sample * (1 + s2 / (2 * sigma) * dt) + velocity * (1 + s2 * (1 - sigma) / (2 * sigma)) * dt
    std = torch.sqrt(s2) * torch.sqrt(-dt)
    if prev_sample is None:
        gen_device = generator.device if generator is not None else sample.device
        noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype, device=gen_device).to(sample.device)
        prev_sample = mean + std * noise
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    pred_original = sample - sigma * velocity
    return StepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std, pred_original=pred_original)


def flow_ode_step(velocity: torch.Tensor, sigmas: torch.Tensor, k: int, sample: torch.Tensor) -> torch.Tensor:
    """The Euler step of the ODE (FlowMatchEulerDiscreteScheduler.step without its stochastic option)."""
    return sample + (sigmas[k + 1] - sigmas[k]).to(sample.dtype) * velocity


def guided_velocity(transformer: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor | float,
                    cond: tuple[torch.Tensor, torch.Tensor], uncond: tuple[torch.Tensor, torch.Tensor] | None,
                    guidance: float) -> torch.Tensor:
    """The velocity with classifier-free guidance; `cond` / `uncond` are (token embeddings, pooled embeddings), as
    SD3's transformer takes them. One batched call, uncond first, as StableDiffusion3Pipeline does."""
    batch = sample.shape[0]
    if uncond is None or guidance == 1.0:
        t = torch.full((batch,), float(timestep), device=sample.device, dtype=sample.dtype)
        return transformer(hidden_states=sample, timestep=t, encoder_hidden_states=cond[0], pooled_projections=cond[1]).sample
    t = torch.full((2 * batch,), float(timestep), device=sample.device, dtype=sample.dtype)
    both = transformer(hidden_states=torch.cat([sample, sample]), timestep=t,
                       encoder_hidden_states=torch.cat([uncond[0], cond[0]]),
                       pooled_projections=torch.cat([uncond[1], cond[1]])).sample
    v_uncond, v_cond = both.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


def sample_flow_chain(
    transformer: torch.nn.Module,
    scheduler: FlowMatchEulerDiscreteScheduler,
    cond: tuple[torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor] | None,
    initial_latents: torch.Tensor,
    *,
    steps: int,
    noise_level: float,
    guidance: float,
    generator: torch.Generator | None = None,
    start_step: int = 0,
    stop_step: int | None = None,
    step_hook: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps [start_step, stop_step) of a `steps`-step chain; returns (latents, log_probs, means, stds, timesteps)
    shaped as `ralign.diffusion.sampler.sample_chain`'s. `noise_level` 0 runs the ODE (log-probabilities and
    stds 0: evaluation only)."""
    timesteps, sigmas = flow_grid(scheduler, steps)
    sigmas = sigmas.to(initial_latents.device)
    stop = steps if stop_step is None else stop_step
    x = initial_latents
    latents, log_probs, means, stds = [x], [], [], []
    for k in range(start_step, stop):
        v = guided_velocity(transformer, x, timesteps[k], cond, uncond, guidance)
        if noise_level > 0:
            out = flow_sde_step_with_logprob(v, sigmas, k, x, noise_level, generator=generator)
            x, lp, mean, std = out.prev_sample, out.log_prob, out.mean, out.std
        else:
            x = flow_ode_step(v, sigmas, k, x)
            lp, mean, std = x.new_zeros(x.shape[0]), x, x.new_zeros(())
        latents.append(x)
        log_probs.append(lp)
        means.append(mean)
        stds.append(std)
        if step_hook is not None:
            step_hook(k, x)
    if not log_probs:
        return (torch.stack(latents, dim=1), x.new_zeros((x.shape[0], 0)), x.new_zeros((x.shape[0], 0, *x.shape[1:])),
                x.new_zeros((0,)), timesteps[start_step:stop].clone())
    return (torch.stack(latents, dim=1), torch.stack(log_probs, dim=1), torch.stack(means, dim=1), torch.stack(stds),
            timesteps[start_step:stop].clone())
