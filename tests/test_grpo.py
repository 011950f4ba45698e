"""GRPO: group-relative advantages by hand, the per-dimension log-probability convention, the ratio on-policy, and
one update through the DeepSpeed learner; groups stay whole from the prompt stream to the learner."""

from __future__ import annotations

import math

import pytest
import torch

from ralign.algorithms.grpo import GRPOSettings, group_advantages, grpo_step_loss, mean_log_prob
from ralign.algorithms.registry import build_algorithm
from ralign.config import ConfigError, parse_config
from ralign.diffusion.policy import build_policy
from ralign.diffusion.sampler import gaussian_log_prob
from ralign.diffusion.seeding import seed_lora_init
from ralign.rewards.colorfulness import ColorfulnessReward
from ralign.rollout.batch import Chains
from ralign.rollout.prompts import PromptSource
from ralign.training.config import TrainConfig
from ralign.training.learner import Learner


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 3.0, 10.0, 10.0, 2.0, 4.0])
    groups = [0, 0, 1, 1, 2, 2]
    by_group = group_advantages(r, groups, "group", eps=0.0)
    # group 0: mean 2, std 1 -> -1, +1; group 1: equal rewards -> 0 (0 / eps); group 2: -1, +1
    assert torch.allclose(by_group[[0, 1, 4, 5]], torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    assert torch.equal(group_advantages(torch.tensor([5.0, 5.0]), [0, 0], "group", eps=1e-4), torch.zeros(2))
    # global: centred rewards (-1, 1, 0, 0, -1, 1) over their own standard deviation sqrt(4/6)
    glob = group_advantages(r, groups, "global", eps=0.0)
    assert torch.allclose(glob, torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0]) / math.sqrt(4 / 6))


def test_log_probability_conventions():
    x, mean, std = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor(0.7)
    summed = gaussian_log_prob(x, mean, std)  # what samplers record and DPOK differentiates
    per_dim = torch.distributions.Normal(mean, std).log_prob(x).flatten(1)
    assert torch.allclose(summed, per_dim.sum(1), atol=1e-4)
    assert torch.allclose(mean_log_prob(summed, 4 * 8 * 8), per_dim.mean(1), atol=1e-6)


def test_clipped_ratio_and_kl_by_hand():
    cfg = GRPOSettings(clip_range=0.1, beta=0.5)
    new, old = torch.tensor([0.2, -0.2], requires_grad=True), torch.tensor([0.0, 0.0])
    adv = torch.tensor([1.0, 1.0])
    mean = torch.zeros(2, 1, 1, 2)
    ref = torch.ones(2, 1, 1, 2)
    loss, stats = grpo_step_loss(new, old, adv, mean, ref, torch.tensor(1.0), cfg)
    r = torch.exp(torch.tensor([0.2, -0.2]))
    expected_policy = torch.maximum(-r, -r.clamp(0.9, 1.1)).mean()
    assert stats["policy_loss"] == pytest.approx(expected_policy.item())
    assert stats["kl"] == pytest.approx(0.5) and stats["clip_fraction"] == 1.0
    assert loss.item() == pytest.approx(expected_policy.item() + 0.5 * 0.5)


def make_cfg(**grpo) -> TrainConfig:
    return parse_config(TrainConfig, {
        "model": {"pipeline": "tiny-random", "policy": {"unet_lora_rank": 2, "steps": 4}},
        "algorithm": {"name": "grpo", "grpo": {"group_size": 2, "minibatches": 1, "beta": 0.1, **grpo}},
        "reward": {"name": "colorfulness"}, "train": {"batch_size": 4, "micro_batch": 2}, "ray": {"request_batch": 2},
    })


def test_on_policy_the_ratio_is_one_and_an_update_moves_the_adapters():
    cfg = make_cfg(timestep_fraction=1.0, skip_last_steps=1)
    seed_lora_init()
    learner = Learner(cfg, build_policy(cfg.policy_spec()))
    assert learner.gas == 2 * 3  # 2 micro-batches x 3 trainable steps
    prompts, seeds = ["a red circle", "a red circle", "two blue squares", "two blue squares"], [1, 2, 3, 4]
    traj = learner.policy.sample(prompts, seeds)
    scores = ColorfulnessReward()(traj.images, prompts).score
    before = {k: v.clone() for k, v in learner.policy.trainable_state().items()}
    stats = learner.update(Chains([0, 1, 2, 3], prompts, seeds, [0] * 4, latents=traj.latents, log_probs=traj.log_probs,
                                  timesteps=traj.timesteps, scores=scores))
    # One optimiser update from the sampling policy: every recomputed log-probability equals the recorded one.
    assert stats["ratio_max_dev"] < 1e-5 and stats["clip_fraction"] == 0.0
    assert stats["kl"] == pytest.approx(0.0, abs=1e-10)  # fresh adapters: still the reference
    assert learner.engine.global_steps == 1 and stats["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in learner.policy.trainable_state().items())


def test_groups_come_from_the_prompt_stream_and_configs_that_split_them_are_refused():
    cfg = make_cfg()
    source = PromptSource(cfg, group_size=build_algorithm(cfg).samples_per_prompt)
    prompts, seeds = source(0, 4)
    assert prompts[0] == prompts[1] and prompts[2] == prompts[3] and len(set(seeds)) == 4
    with pytest.raises(ConfigError, match="groups of 3 per prompt"):
        make_cfg(group_size=3)
    with pytest.raises(ConfigError, match="minibatches=3"):
        make_cfg(minibatches=3)


def test_shared_initial_noise_gives_a_group_one_x_T_and_distinct_chains():
    cfg = make_cfg(shared_initial_noise=True)
    algorithm = build_algorithm(cfg)
    assert algorithm.shares_initial_noise and not build_algorithm(make_cfg()).shares_initial_noise
    assert not build_algorithm(parse_config(TrainConfig, {"algorithm": {"name": "draft"}})).shares_initial_noise
    source = PromptSource(cfg, algorithm.samples_per_prompt, shared_noise=True)
    prompts, seeds = source(0, 4)
    assert prompts == PromptSource(cfg, algorithm.samples_per_prompt)(0, 4)[0]  # the same prompts as without it
    assert seeds[0] == seeds[1] != seeds[2] == seeds[3]
    assert source(5, 1)[1] == source(4, 1)[1] != seeds[2]  # a request that starts mid-group (resume) keeps its x_T
    seed_lora_init()
    traj = build_policy(cfg.policy_spec()).sample(prompts, seeds)
    assert torch.equal(traj.latents[0, 0], traj.latents[1, 0])  # one x_T ...
    assert not torch.allclose(traj.latents[0, -1], traj.latents[1, -1])  # ... and the step noise still tells them apart


def test_rsft_keeps_the_top_k_of_each_group_and_trains_on_them():
    from ralign.algorithms.rsft import top_k_per_group

    assert top_k_per_group(torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.4]), [0, 0, 0, 1, 1, 1], 1) == [1, 5]
    assert top_k_per_group(torch.tensor([0.1, 0.9, 0.5, 0.3]), [0, 0, 0, 1], 2) == [1, 2, 3]  # a group smaller than k
    cfg = parse_config(TrainConfig, {
        "model": {"pipeline": "tiny-random", "policy": {"unet_lora_rank": 2, "steps": 3}},
        "algorithm": {"name": "rsft", "rsft": {"samples_per_prompt": 2, "top_k": 1, "t_min": 500, "anchor_weight": 1.0}},
        "reward": {"name": "colorfulness"}, "train": {"batch_size": 4, "micro_batch": 2}, "ray": {"request_batch": 2},
    })
    seed_lora_init()
    learner = Learner(cfg, build_policy(cfg.policy_spec()))
    prompts, seeds = ["a red circle", "a red circle", "two blue squares", "two blue squares"], [1, 2, 3, 4]
    traj = learner.policy.sample(prompts, seeds)
    before = {k: v.clone() for k, v in learner.policy.trainable_state().items()}
    stats = learner.update(Chains([0, 1, 2, 3], prompts, seeds, [0] * 4, latents=traj.latents, log_probs=traj.log_probs,
                                  timesteps=traj.timesteps, scores=torch.tensor([0.1, 0.5, 0.9, 0.2])))
    assert stats["reward_kept_mean"] == pytest.approx(0.7) and stats["sft_loss"] > 0
    assert stats["anchor_loss"] == pytest.approx(0.0, abs=1e-12)  # fresh adapters predict what the reference does
    assert any(not torch.equal(before[k], v) for k, v in learner.policy.trainable_state().items())
    with pytest.raises(ConfigError, match="nothing is rejected"):
        parse_config(TrainConfig, {"algorithm": {"name": "rsft", "rsft": {"samples_per_prompt": 2, "top_k": 2}},
                                   "reward": {"name": "colorfulness"}, "train": {"batch_size": 4, "micro_batch": 2},
                                   "ray": {"request_batch": 2}})
