"""Algorithm losses against hand-computed values, and each update's gradient path on a tiny random pipeline."""

from __future__ import annotations

import math

import pytest
import torch

from ralign.algorithms.advantages import PerPromptNormalizer
from ralign.algorithms.alignprop import alignprop_steps
from ralign.algorithms.backprop_chain import BackpropSettings, backprop_update
from ralign.algorithms.dpok import DPOKSettings, dpok_step_loss, dpok_update
from ralign.algorithms.draft import draft_steps
from ralign.algorithms.interval import interval_steps
from ralign.algorithms.refl import ReFLSettings, choose_late_step, prefix, refl_loss, refl_update
from ralign.models.toy_t2i import tiny_random_pipeline
from ralign.diffusion.policy import DiffusionPolicy, PolicyConfig
from ralign.rewards.base import Reward, RewardOutput


class Redness(Reward):
    """A real differentiable reward for tests: mean red minus mean blue of the image."""

    name, differentiable = "redness", True

    def __call__(self, images, prompts, attention=None):
        score = images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2))
        return RewardOutput(score, {"red": images[:, 0].mean((1, 2))})


def make_policy(**kw) -> DiffusionPolicy:
    policy = DiffusionPolicy(tiny_random_pipeline(), PolicyConfig(unet_lora_rank=4, steps=4, **kw))
    with torch.no_grad():  # LoRA B starts at zero; perturb it so the adapted policy differs from the base
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return policy


def test_dpok_loss_hand_values():
    cfg = DPOKSettings(alpha=2.0, beta=0.5, clip_range=0.2)
    logp_old = torch.tensor([0.0, 0.0])
    logp_new = torch.tensor([math.log(1.5), math.log(0.5)])
    adv = torch.tensor([1.0, -1.0])
    mean_new = torch.zeros(2, 1, 1, 2)
    mean_ref = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 2.0]]]])
    std = torch.tensor(2.0)
    loss, stats = dpok_step_loss(logp_new, logp_old, adv, mean_new, mean_ref, std, cfg)
    # sample 0: max(-1*1.5, -1*1.2) = -1.2; sample 1: max(1*0.5, 1*0.8) = 0.8 -> policy loss -0.2
    # kl: (1+1)/(2*4) = 0.25 and 4/8 = 0.5 -> 0.375
    assert stats["policy_loss"] == pytest.approx(-0.2)
    assert stats["kl"] == pytest.approx(0.375)
    assert loss.item() == pytest.approx(2.0 * -0.2 + 0.5 * 0.375)


def test_dpok_on_policy_gradient_is_reward_weighted_logprob_gradient():
    logp = torch.tensor([0.3, -0.2], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    loss, _ = dpok_step_loss(logp, logp.detach(), adv, torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor(1.0), DPOKSettings(beta=0.0))
    loss.backward()
    assert torch.allclose(logp.grad, -adv / 2)  # d/dlogp of -A * exp(logp - logp_old) at ratio 1, batch mean


def test_refl_loss_hand_values():
    r = torch.tensor([0.2, 1.5, 0.9])
    assert refl_loss(r, lam=1.0, scale=2.0).item() == pytest.approx(2.0 * (0.8 + 0.0 + 0.1) / 3)


def test_gradient_step_schedules():
    g = torch.Generator().manual_seed(0)
    assert draft_steps(50, 3) == [47, 48, 49]
    steps = interval_steps(50, 10, g)
    assert len(steps) == 5 and all(b - a == 10 for a, b in zip(steps, steps[1:])) and steps[0] < 10
    for _ in range(5):
        s = alignprop_steps(50, 5, g)
        assert 1 <= len(s) <= 5 and s[-1] == 49
    with pytest.raises(ValueError):
        draft_steps(4, 5)
    assert 15 <= choose_late_step(20, ReFLSettings(late_step_min=0, late_step_max=5)) < 20


def test_per_prompt_normalizer():
    norm = PerPromptNormalizer(min_count=2)
    adv = norm(["a", "a", "b"], torch.tensor([1.0, 3.0, 5.0]))
    assert adv[0] == pytest.approx(-1.0, abs=1e-4) and adv[1] == pytest.approx(1.0, abs=1e-4)


def test_reference_equals_base_model_bit_for_bit():
    base = DiffusionPolicy(tiny_random_pipeline(), PolicyConfig(unet_lora_rank=0, steps=3))
    tuned = make_policy()
    tuned.cfg.steps = 3
    prompts, seeds = ["a red circle", "two blue squares"], [3, 4]
    ref_traj = base.sample(prompts, seeds, decode=False)
    with tuned.reference():
        off = tuned.sample(prompts, seeds, decode=False)
    on = tuned.sample(prompts, seeds, decode=False)
    assert torch.equal(ref_traj.latents, off.latents)
    assert not torch.equal(on.latents, off.latents)


def test_dpok_update_gives_lora_gradients_and_logprob_consistency():
    policy = make_policy()
    traj = policy.sample(["a red circle", "a blue square"], [1, 2], decode=False)
    stats = dpok_update(policy, traj, torch.tensor([1.0, -1.0]), DPOKSettings())
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # on-policy: recomputed log-probs match the sampler's
    assert stats["kl"] > 0
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_refl_prefix_and_update():
    policy = make_policy()
    prompts, seeds = ["a red circle"], [5]
    lat = prefix(policy, prompts, seeds, stop_step=3)
    assert lat.shape == (1, 4, 8, 8) and not lat.requires_grad
    stats = refl_update(policy, prompts, lat, 3, Redness(), ReFLSettings(lam=10.0))
    assert stats["loss"] > 0 and "reward/red" in stats
    assert sum(p.grad.abs().sum() for p in policy.trainable_parameters()) > 0


@pytest.mark.parametrize("mode", ["draft", "interval", "alignprop"])
def test_backprop_update_reaches_lora(mode):
    policy = make_policy()
    g = torch.Generator().manual_seed(0)
    steps = {"draft": draft_steps(4, 2), "interval": interval_steps(4, 2, g), "alignprop": alignprop_steps(4, 2, g)}[mode]
    stats = backprop_update(policy, ["a red circle", "a blue square"], [1, 2], Redness(), BackpropSettings(k=2, interval=2), steps, generator=g)
    assert math.isfinite(stats["loss"])
    assert sum(p.grad.abs().sum() for p in policy.trainable_parameters()) > 0


def test_text_encoder_training_through_backprop():
    policy = DiffusionPolicy(tiny_random_pipeline(), PolicyConfig(unet_lora_rank=0, text_encoder="full", steps=4))
    backprop_update(policy, ["a red circle"], [1], Redness(), BackpropSettings(k=2), draft_steps(4, 2))
    grads = [p.grad for p in policy.text_encoder.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in policy.original_text_encoder.parameters())
