"""The hand-written DDIM step with log-prob agrees with diffusers' step and with a direct Gaussian density."""

from __future__ import annotations

import pytest
import torch

from ralign.models import toy_t2i
from ralign.diffusion.sampler import ddim_step_with_logprob, gaussian_log_prob
from ralign.diffusion.seeding import initial_noise


@pytest.fixture()
def scheduler():
    s = toy_t2i.sample_scheduler()
    s.set_timesteps(10)
    return s


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_step_matches_diffusers_with_the_same_noise(scheduler, eta):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8)
    eps = torch.randn_like(x)
    noise = torch.randn_like(x)
    for t in scheduler.timesteps[:-1]:
        ref = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        ours = ddim_step_with_logprob(scheduler, eps, int(t), x, eta, prev_sample=None, generator=None)
        # same mean and std -> reproduce diffusers' sample from our Gaussian with diffusers' noise
        assert torch.allclose(ours.mean + ours.std * noise, ref, atol=1e-5)


def test_log_prob_equals_direct_gaussian(scheduler):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    eps = torch.randn_like(x)
    t = int(scheduler.timesteps[3])
    out = ddim_step_with_logprob(scheduler, eps, t, x, eta=1.0)
    direct = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample).flatten(1).sum(1)
    assert torch.allclose(out.log_prob, direct, rtol=1e-5)
    # eta = 1 is DDPM's posterior variance, exactly diffusers' _get_variance
    prev_t = t - 1000 // 10
    assert torch.allclose(out.std**2, scheduler._get_variance(t, prev_t), rtol=1e-5)
    # scoring a given step reproduces the log-prob of the sampled one
    again = ddim_step_with_logprob(scheduler, eps, t, x, eta=1.0, prev_sample=out.prev_sample)
    assert torch.allclose(again.log_prob, out.log_prob)


def test_log_prob_has_gradient_through_the_mean(scheduler):
    x = torch.randn(2, 4, 8, 8)
    eps = torch.randn_like(x, requires_grad=True)
    t = int(scheduler.timesteps[2])
    taken = ddim_step_with_logprob(scheduler, eps.detach(), t, x, eta=1.0).prev_sample
    out = ddim_step_with_logprob(scheduler, eps, t, x, eta=1.0, prev_sample=taken)
    out.log_prob.sum().backward()
    assert eps.grad is not None and torch.isfinite(eps.grad).all() and eps.grad.abs().sum() > 0


def test_gaussian_log_prob_hand_value():
    x = torch.zeros(1, 2)
    mean = torch.ones(1, 2)
    std = torch.tensor(2.0)
    # each dim: -(1/(2*4)) - log 2 - 0.5 log(2 pi)
    expected = 2 * (-0.125 - torch.log(torch.tensor(2.0)) - 0.5 * torch.log(torch.tensor(2 * torch.pi)))
    assert torch.allclose(gaussian_log_prob(x, mean, std), expected.reshape(1))


def test_eta_zero_is_refused(scheduler):
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_with_logprob(scheduler, torch.zeros(1, 4, 8, 8), int(scheduler.timesteps[0]), torch.zeros(1, 4, 8, 8), eta=0.0)


def test_initial_noise_is_per_seed():
    a = initial_noise((4, 8, 8), [1, 2])
    b = initial_noise((4, 8, 8), [2])
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])


@pytest.mark.parametrize("config", [{"clip_sample": True, "clip_sample_range": 0.5},
                                    {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 0.6},
                                    {}], ids=["clip_sample", "thresholding", "plain"])
def test_the_step_equals_diffusers_ddim_step_under_clipping_and_thresholding(config):
    import torch
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False,
                              steps_offset=1, **config)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, generator=g) * 2, torch.randn(2, 4, 8, 8, generator=g)
    for t in (int(scheduler.timesteps[0]), int(scheduler.timesteps[-1])):
        ours = ddim_step_with_logprob(scheduler, eps, t, x, 1.0, generator=torch.Generator().manual_seed(1))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        theirs = scheduler.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours.prev_sample, theirs, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(ours.log_prob).all()


def test_a_zero_variance_last_step_or_another_prediction_type_is_refused():
    from diffusers import DDIMScheduler

    from ralign.config import UserError
    from ralign.diffusion.sampler import check_scheduler

    def scheduler(**kw):
        return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **{"steps_offset": 1, **kw})

    check_scheduler(scheduler(set_alpha_to_one=False), eta=1.0, steps=10)  # SD1.5's own settings
    with pytest.raises(UserError, match="set_alpha_to_one=true gives the step from timestep 1 zero variance"):
        check_scheduler(scheduler(set_alpha_to_one=True), eta=1.0, steps=10)
    with pytest.raises(UserError, match="steps_offset=0"):
        check_scheduler(scheduler(set_alpha_to_one=False, steps_offset=0), eta=1.0, steps=10)
    check_scheduler(scheduler(set_alpha_to_one=True), eta=0.0, steps=10)  # deterministic sampling needs no log-probability
    with pytest.raises(UserError, match="prediction_type='v_prediction'"):
        check_scheduler(scheduler(prediction_type="v_prediction"), eta=1.0, steps=10)


def test_eta_zero_chains_are_the_evaluation_samplers():
    """With eta 0 the policy's chain is diffusers' deterministic DDIM pipeline (what `ralign eval` generates with), so
    algorithms that learn from final images can train on the images they are judged by."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ralign.diffusion.policy import DiffusionPolicy
    from ralign.diffusion.seeding import initial_noise
    from ralign.diffusion.settings import PolicyConfig
    from ralign.models.toy_t2i import tiny_random_pipeline

    pipe = tiny_random_pipeline()
    policy = DiffusionPolicy(pipe, PolicyConfig(unet_lora_rank=0, steps=4, eta=0.0, guidance=3.0))
    prompts, seeds = ["a red circle", "two blue squares"], [3, 4]
    traj = policy.sample(prompts, seeds)
    assert torch.equal(traj.log_probs, torch.zeros(2, 4))
    cond, uncond = policy.encode(prompts)
    reference = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                                        scheduler=DDIMScheduler.from_config(pipe.scheduler.config), safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    latents = reference(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=initial_noise(policy.latent_shape(), seeds),
                        num_inference_steps=4, guidance_scale=3.0, output_type="latent").images
    assert torch.allclose(traj.latents[:, -1], latents, atol=1e-5)
