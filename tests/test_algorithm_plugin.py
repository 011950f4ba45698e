"""A new algorithm is one class plus one registration: defined here, in the test file, and trained by the in-process
DeepSpeed learner with nothing else in the system told about it (config validation, settings, the update)."""

from __future__ import annotations

import pytest
import torch
from pydantic import Field

from ralign.algorithms import registry
from ralign.algorithms.base import RolloutAlgorithm, UpdateContext
from ralign.config import ConfigError, StrictModel, parse_config
from ralign.diffusion.policy import build_policy
from ralign.diffusion.seeding import seed_lora_init
from ralign.rewards.colorfulness import ColorfulnessReward
from ralign.rollout.batch import Chains
from ralign.training.config import TrainConfig
from ralign.training.learner import Learner


class ReinforceSettings(StrictModel):
    baseline: float = 0.0  # subtracted from every reward
    steps_per_update: int = Field(2, ge=1)  # the last N steps of each chain are trained on


class Reinforce(RolloutAlgorithm):
    """Plain REINFORCE over the chain: loss = -(r - baseline) * mean over the last steps of log p(x_{t-1} | x_t)."""

    name = "reinforce_toy"
    section = "reinforce_toy"
    Settings = ReinforceSettings

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        s = cfg.algorithm.settings_of(cls.section)
        if s.steps_per_update > cfg.model.policy.steps:
            raise ValueError(f"algorithm.reinforce_toy.steps_per_update={s.steps_per_update} exceeds model.policy.steps")

    def backwards_per_update(self) -> int:
        return self.cfg.train.batch_size // self.cfg.train.micro_batch

    def update(self, batch: Chains, ctx: UpdateContext) -> dict[str, float]:
        policy, mb = ctx.policy, ctx.micro_batch
        advantages = torch.as_tensor(batch.scores).float() - self.settings.baseline
        n_steps = batch.log_probs.shape[1]
        total = 0.0
        for lo in range(0, len(batch), mb):
            part = batch.select(range(lo, min(lo + mb, len(batch))))
            latents = torch.as_tensor(part.latents)
            cond, uncond = policy.encode(part.prompts)
            log_prob = 0.0
            for k in range(n_steps - self.settings.steps_per_update, n_steps):
                out = policy.step_log_prob(latents[:, k], int(part.timesteps[k]), cond, uncond, prev_sample=latents[:, k + 1],
                                           steps=n_steps)
                log_prob = log_prob + out.log_prob / self.settings.steps_per_update
            loss = -(advantages[lo:lo + mb] * log_prob).mean()
            ctx.backward(loss)
            total += loss.item()
        ctx.end_update()
        return {"loss": total, "reward_mean": float(advantages.mean() + self.settings.baseline)}


@pytest.fixture
def registered(monkeypatch):
    # One registration line (here undone after the test, so other tests see the stock registry).
    monkeypatch.setitem(registry._ALGORITHMS, Reinforce.name, Reinforce)
    monkeypatch.setitem(registry._SECTIONS, Reinforce.name, Reinforce.section)
    yield Reinforce


def config(**algorithm) -> TrainConfig:
    return parse_config(TrainConfig, {
        "model": {"pipeline": "tiny-random", "policy": {"unet_lora_rank": 2, "steps": 3}},
        "algorithm": {"name": "reinforce_toy", **algorithm}, "reward": {"name": "colorfulness"},
        "train": {"batch_size": 4, "micro_batch": 2}, "ray": {"request_batch": 2},
    })


def test_a_plugged_in_algorithm_trains_with_the_deepspeed_learner(registered):
    cfg = config(reinforce_toy={"baseline": 0.1, "steps_per_update": 2})
    assert cfg.algorithm.reinforce_toy.baseline == 0.1  # its settings, validated by its own model
    seed_lora_init()
    learner = Learner(cfg, build_policy(cfg.policy_spec()))
    assert isinstance(learner.algorithm, Reinforce) and learner.gas == 2
    prompts, seeds = ["a red circle", "two blue squares", "a red circle", "a green triangle"], [1, 2, 3, 4]
    traj = learner.policy.sample(prompts, seeds)
    scores = ColorfulnessReward()(traj.images, prompts).score
    before = {k: v.clone() for k, v in learner.policy.trainable_state().items()}
    stats = learner.update(Chains(list(range(4)), prompts, seeds, [0] * 4, latents=traj.latents, log_probs=traj.log_probs,
                                  timesteps=traj.timesteps, scores=scores))
    assert learner.engine.global_steps == 1 and stats["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in learner.policy.trainable_state().items())


def test_its_settings_and_checks_are_its_own(registered):
    with pytest.raises(ConfigError, match=r"unknown key 'algorithm.reinforce_toy.baselin'"):
        config(reinforce_toy={"baselin": 0.1})
    with pytest.raises(ConfigError, match="steps_per_update=5 exceeds model.policy.steps"):
        config(reinforce_toy={"steps_per_update": 5})
    with pytest.raises(ConfigError, match="needs model.policy.eta > 0"):  # what every rollout algorithm refuses
        parse_config(TrainConfig, {"algorithm": {"name": "reinforce_toy"}, "reward": {"name": "colorfulness"},
                                   "model": {"policy": {"eta": 0.0}}})


def test_unregistered_it_is_unknown():
    with pytest.raises(ConfigError, match="'algorithm.name': not a known algorithm"):
        config()
