"""DiffusionNFT: the optimality weights, the loss's gradient (images better than their group are learnt, worse ones
unlearnt), and an update through the DeepSpeed learner that does what that gradient says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ralign.algorithms.nft import nft_loss, optimality
from ralign.config import ConfigError, parse_config
from ralign.diffusion.policy import build_policy
from ralign.diffusion.seeding import seed_lora_init
from ralign.rollout.batch import Chains
from ralign.training.config import TrainConfig
from ralign.training.learner import Learner


def test_optimality_maps_clipped_advantages_to_zero_one():
    r = optimality(torch.tensor([-5.0, -1.0, 0.0, 1.0, 2.0, 9.0]), adv_clip=2.0)
    assert torch.allclose(r, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))


def test_at_the_old_policy_the_gradient_is_the_denoising_gradient_times_two_r_minus_one():
    e_old, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    r = torch.tensor([1.0, 0.5, 0.0])
    for beta in (0.5, 1.0):
        e_theta = e_old.clone().requires_grad_(True)
        loss, _ = nft_loss(e_theta, e_old, noise, r, beta)
        loss.backward()
        plain = e_old.clone().requires_grad_(True)
        per_sample = (plain - noise).pow(2).flatten(1).mean(1)
        (per_sample * (2 * r - 1)).mean().backward()
        assert torch.allclose(e_theta.grad, plain.grad, atol=1e-6)
    assert torch.equal(e_theta.grad[1], torch.zeros(4, 2, 2))  # a sample as good as its group: no gradient


def make_cfg(pipeline: str = "tiny-random", **nft) -> TrainConfig:
    return parse_config(TrainConfig, {
        "model": {"pipeline": pipeline, "policy": {"unet_lora_rank": 4, "steps": 3}},
        "algorithm": {"name": "nft", "nft": {"group_size": 2, **nft}},
        "reward": {"name": "colorfulness"}, "train": {"batch_size": 4, "micro_batch": 2, "lr": 1e-2},
        "ray": {"request_batch": 2},
    })


@pytest.mark.parametrize("pipeline", ["tiny-random", "tiny-random-flow"])  # the UNet's noise, the flow's velocity
def test_an_update_learns_the_better_image_of_each_group_and_unlearns_the_worse(pipeline):
    cfg = make_cfg(pipeline, kl_weight=0.1, adv_clip=0.5)  # every advantage saturates: r is 1 or 0
    seed_lora_init()
    learner = Learner(cfg, build_policy(cfg.policy_spec()))
    policy = learner.policy
    prompts, seeds = ["a red circle", "a red circle", "two blue squares", "two blue squares"], [1, 2, 3, 4]
    traj = policy.sample(prompts, seeds)
    x0 = traj.latents[:, -1]
    scores = torch.tensor([0.9, 0.1, 0.2, 0.8])  # samples 0 and 3 beat their group

    probe_noise = torch.randn((8, *x0.shape), generator=torch.Generator().manual_seed(5))

    def denoising_losses() -> torch.Tensor:
        """Each image's pretraining loss, averaged over 8 fixed (noise, training time) draws."""
        times = torch.Generator().manual_seed(6)
        with torch.no_grad():
            cond, _ = policy.encode(prompts)
            losses = []
            for j in range(8):
                noisy, t, target = policy.noised_for_training(x0, probe_noise[j], times)
                losses.append(F.mse_loss(policy.predict(noisy, t, cond), target, reduction="none").flatten(1).mean(1))
            return torch.stack(losses).mean(0)

    before = denoising_losses()
    for _ in range(3):
        stats = learner.update(Chains([0, 1, 2, 3], prompts, seeds, [0] * 4, latents=traj.latents, log_probs=traj.log_probs,
                                      timesteps=traj.timesteps, scores=scores))
    change = denoising_losses() - before
    # What the update minimises, sum (2r - 1) L_i, fell on noise it never saw: the better images' denoising loss fell
    # relative to the worse ones' (within a group the images of one prompt are alike, so both move together).
    weights = 2 * torch.tensor([1.0, 0.0, 0.0, 1.0]) - 1
    assert float((weights * change).sum()) < 0
    assert stats["optimality_abs_dev"] == pytest.approx(0.5) and stats["kl"] > 0 and stats["grad_norm"] > 0
    assert learner.engine.global_steps == 3

    # Rewards that do not differ within a group carry no signal: r = 1/2 everywhere and, without the KL term, no
    # gradient at all.
    flat = Learner(make_cfg(pipeline), build_policy(make_cfg(pipeline).policy_spec()))
    stats = flat.update(Chains([0, 1, 2, 3], prompts, seeds, [0] * 4, latents=traj.latents, log_probs=traj.log_probs,
                               timesteps=traj.timesteps, scores=torch.tensor([0.3, 0.3, 0.7, 0.7])))
    assert stats["optimality_abs_dev"] == 0.0 and stats["grad_norm"] == 0.0


@pytest.mark.parametrize("pipeline", ["tiny-random", "tiny-random-flow"])
def test_shared_noise_cancels_what_the_images_of_a_group_have_in_common(pipeline):
    """Two groups whose images are identical within the group and whose advantages are unclipped: with the group's
    samples noised alike (shared_noise), the (2r - 1)-weighted gradients cancel exactly; with independent draws
    they do not, which is the noise shared_noise removes."""
    prompts, seeds = ["a red circle", "a red circle", "two blue squares", "two blue squares"], [1, 2, 3, 4]
    scores = torch.tensor([0.6, 0.4, 0.45, 0.55])  # |A| / adv_clip < 1: no clipping, the weights sum to 0 per group
    norms = {}
    for shared in (True, False):
        seed_lora_init()
        cfg = make_cfg(pipeline, shared_noise=shared, adv_clip=100.0)
        learner = Learner(cfg, build_policy(cfg.policy_spec()))
        traj = learner.policy.sample(prompts, seeds)
        traj.latents[1], traj.latents[3] = traj.latents[0], traj.latents[2]  # the same chain twice in each group
        stats = learner.update(Chains([0, 1, 2, 3], prompts, seeds, [0] * 4, latents=traj.latents,
                                      log_probs=traj.log_probs, timesteps=traj.timesteps, scores=scores))
        norms[shared] = stats["grad_norm"]
    assert norms[True] == pytest.approx(0.0, abs=1e-7) and norms[False] > 1e-5


def test_configs_it_cannot_run_are_refused():
    with pytest.raises(ConfigError, match="groups of 3 per prompt"):
        make_cfg(group_size=3)
    with pytest.raises(ConfigError, match="minibatches=3"):
        make_cfg(minibatches=3)
    # It needs no log-probabilities: a deterministic sampler is accepted.
    parse_config(TrainConfig, {"model": {"pipeline": "tiny-random", "policy": {"eta": 0.0}},
                               "algorithm": {"name": "nft", "nft": {"group_size": 2}}, "reward": {"name": "colorfulness"},
                               "train": {"batch_size": 4, "micro_batch": 2}, "ray": {"request_batch": 2}})
