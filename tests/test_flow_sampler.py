"""The flow-matching sampler (Flow-GRPO's SDE): one step's mean, sigma and log-probability by hand, the ratio exactly 1
when a chain is re-scored, the SDE keeping the flow's marginals on a case with a known velocity, the ODE step, and the
scheduler settings it refuses."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from ralign.diffusion.flow_sampler import (check_flow_scheduler, flow_grid, flow_ode_step, flow_sde_step_with_logprob,
                                           guided_velocity, sample_flow_chain)


def tiny_transformer(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8).eval()


def test_one_sde_step_by_hand():
    _, sigmas = flow_grid(FlowMatchEulerDiscreteScheduler(shift=3.0), 10)
    x, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    a = 0.7
    for k in (0, 4, 8):
        sigma, nxt = float(sigmas[k]), float(sigmas[k + 1])
        dt = nxt - sigma
        s2 = a**2 * sigma / (1 - (float(sigmas[1]) if sigma >= 1.0 else sigma))
        mean = x + (v + s2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt  # Flow-GRPO's eq. 9, written as the paper has it
        std = math.sqrt(s2) * math.sqrt(-dt)
        x_next = mean + std * torch.randn_like(x)
        out = flow_sde_step_with_logprob(v, sigmas, k, x, a, prev_sample=x_next)
        assert torch.allclose(out.mean, mean, atol=1e-5) and float(out.std) == pytest.approx(std, rel=1e-5)
        per_dim = (-((x_next - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1)
        assert torch.allclose(out.log_prob, per_dim.sum(1), rtol=1e-4)
        assert torch.equal(out.prev_sample, x_next)  # a step already taken is scored, not redrawn
    assert float(sigmas[0]) == 1.0  # so k = 0 above used sigma_max = sigmas[1] in the denominator


def test_a_rescored_chain_has_ratio_one_and_the_ode_is_the_zero_noise_limit():
    transformer, scheduler = tiny_transformer(), FlowMatchEulerDiscreteScheduler(shift=3.0)
    cond = (torch.randn(2, 5, 16), torch.randn(2, 16))
    uncond = (torch.zeros(2, 5, 16), torch.zeros(2, 16))
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents, log_probs, means, stds, ts = sample_flow_chain(
            transformer, scheduler, cond, uncond, x_T, steps=6, noise_level=0.7, guidance=3.0,
            generator=torch.Generator().manual_seed(1))
        assert latents.shape == (2, 7, 4, 8, 8) and log_probs.shape == (2, 6) and stds.shape == (6,)
        _, sigmas = flow_grid(scheduler, 6)
        for k in range(6):
            v = guided_velocity(transformer, latents[:, k], ts[k], cond, uncond, 3.0)
            again = flow_sde_step_with_logprob(v, sigmas, k, latents[:, k], 0.7, prev_sample=latents[:, k + 1])
            assert torch.allclose(again.log_prob, log_probs[:, k], atol=1e-4, rtol=0)  # ratio exp(0) = 1
            assert torch.allclose(again.mean, means[:, k], atol=1e-6)
            # As the noise level goes to 0 the SDE's mean becomes the Euler step of the ODE.
            tiny = flow_sde_step_with_logprob(v, sigmas, k, latents[:, k], 1e-4, prev_sample=latents[:, k + 1])
            assert torch.allclose(tiny.mean, flow_ode_step(v, sigmas, k, latents[:, k]), atol=1e-5)
        ode, ode_lp, *_ = sample_flow_chain(transformer, scheduler, cond, uncond, x_T, steps=6, noise_level=0.0, guidance=3.0)
        assert torch.equal(ode_lp, torch.zeros(2, 6))
        # The ODE chain is diffusers' own Euler integration.
        scheduler.set_timesteps(6)
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(guided_velocity(transformer, x, t, cond, uncond, 3.0), t, x).prev_sample
        assert torch.allclose(ode[:, -1], x, atol=1e-5)


def test_the_sde_keeps_the_marginals_of_a_flow_with_a_known_velocity():
    # Data x0 ~ N(0, c^2) in one dimension: x_sigma = (1 - sigma) x0 + sigma eps has variance (1 - sigma)^2 c^2 +
    # sigma^2 and the exact velocity E[eps - x0 | x_sigma] = x (sigma - (1 - sigma) c^2) / var(sigma). Integrated from
    # pure noise, the SDE must end at variance c^2 like the ODE (up to the discretisation).
    c2 = 0.25
    _, sigmas = flow_grid(FlowMatchEulerDiscreteScheduler(), 200)
    x = torch.randn(40_000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    for k in range(200):
        sigma = float(sigmas[k])
        var = (1 - sigma) ** 2 * c2 + sigma**2
        v = x * (sigma - (1 - sigma) * c2) / var
        x = flow_sde_step_with_logprob(v, sigmas, k, x, 0.7, generator=gen).prev_sample
        if k in (50, 100, 150):
            expected = (1 - float(sigmas[k + 1])) ** 2 * c2 + float(sigmas[k + 1]) ** 2
            assert float(x.var()) == pytest.approx(expected, rel=0.05)
    assert float(x.var()) == pytest.approx(c2, rel=0.05)


def test_scheduler_settings_the_sampler_cannot_compute_are_refused():
    check_flow_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 0.7, 10)
    for bad, words in ((FlowMatchEulerDiscreteScheduler(invert_sigmas=True), "invert_sigmas"),
                       (FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), "stochastic_sampling"),
                       (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), "use_dynamic_shifting")):
        with pytest.raises(ValueError, match=words):
            check_flow_scheduler(bad, 0.7, 10)
    with pytest.raises(ValueError, match="noise_level"):
        check_flow_scheduler(FlowMatchEulerDiscreteScheduler(), -0.1, 10)
    with pytest.raises(ValueError, match="at least 2 steps"):
        check_flow_scheduler(FlowMatchEulerDiscreteScheduler(), 0.7, 1)
    from diffusers import DDIMScheduler

    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        check_flow_scheduler(DDIMScheduler(), 0.7, 10)
    with pytest.raises(ValueError, match="no log-probability"):
        flow_sde_step_with_logprob(torch.zeros(1, 1), torch.tensor([1.0, 0.5, 0.0]), 0, torch.zeros(1, 1), 0.0)


def test_a_saved_flow_pipeline_loads_offline_and_its_ode_chain_is_diffusers_own(tmp_path):
    from ralign.models import ModelLoadError
    from ralign.models.toy_flow import load_flow_pipeline, tiny_random_flow_pipeline
    from ralign.models.toy_t2i import tiny_random_pipeline

    tiny_random_flow_pipeline().save_pretrained(tmp_path / "flow", safe_serialization=True)
    pipe = load_flow_pipeline(tmp_path / "flow")
    assert pipe.text_encoder_3 is None and not list((tmp_path / "flow").rglob("*.bin"))
    prompts = ["a red circle", "two blue squares"]
    with torch.no_grad():
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=True,
                                                                 max_sequence_length=pipe.tokenizer.model_max_length)
        x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        ours, *_ = sample_flow_chain(pipe.transformer, pipe.scheduler, (cond, pooled), (uncond, pooled_uncond), x_T,
                                     steps=5, noise_level=0.0, guidance=3.0)
        theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, pooled_prompt_embeds=pooled,
                      negative_pooled_prompt_embeds=pooled_uncond, latents=x_T, num_inference_steps=5, guidance_scale=3.0,
                      height=64, width=64, output_type="latent").images
    assert torch.allclose(ours[:, -1], theirs, atol=1e-5)
    tiny_random_pipeline().save_pretrained(tmp_path / "unet", safe_serialization=True)
    with pytest.raises(ModelLoadError, match="not a StableDiffusion3Pipeline"):
        load_flow_pipeline(tmp_path / "unet")
