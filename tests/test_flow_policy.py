"""The flow policy through the engine's learner: GRPO's update on Flow-GRPO's SDE chains (on-policy ratio exactly 1,
the KL to the adapter-off reference 0 before the first step), and the settings it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ralign.config import UserError, parse_config
from ralign.diffusion.flow_policy import FlowPolicy
from ralign.diffusion.seeding import seed_lora_init
from ralign.diffusion.settings import PolicyConfig
from ralign.models.toy_flow import tiny_random_flow_pipeline
from ralign.rollout.batch import Chains
from ralign.training.config import TrainConfig
from ralign.training.learner import Learner


def test_grpo_trains_the_flow_policy_through_the_learner():
    cfg = parse_config(TrainConfig, {
        "model": {"pipeline": "tiny-random-flow", "policy": {"unet_lora_rank": 4, "steps": 4, "eta": 0.7, "guidance": 3.0}},
        "algorithm": {"name": "grpo", "grpo": {"group_size": 2, "minibatches": 1, "beta": 0.1, "timestep_fraction": 1.0,
                                               "skip_last_steps": 1}},
        "reward": {"name": "colorfulness"}, "train": {"batch_size": 4, "micro_batch": 2}, "ray": {"request_batch": 2},
    })
    seed_lora_init()
    policy = FlowPolicy(tiny_random_flow_pipeline(), cfg.model.policy)
    assert set(policy.trainable_modules()) == {"transformer"}
    learner = Learner(cfg, policy)
    prompts, seeds = ["a red circle", "a red circle", "two blue squares", "two blue squares"], [1, 2, 3, 4]
    traj = policy.sample(prompts, seeds)
    assert traj.images.shape == (4, 3, 64, 64) and traj.log_probs.shape == (4, 4) and torch.isfinite(traj.log_probs).all()
    before = policy.trainable_state()
    stats = learner.update(Chains([0, 1, 2, 3], prompts, seeds, [0] * 4, latents=traj.latents, log_probs=traj.log_probs,
                                  timesteps=traj.timesteps, scores=torch.tensor([0.1, 0.9, 0.4, 0.2])))
    assert stats["ratio_max_dev"] < 1e-5 and stats["clip_fraction"] == 0.0
    assert stats["kl"] == pytest.approx(0.0, abs=1e-10) and stats["grad_norm"] > 0
    after = policy.trainable_state()
    assert set(after) == set(before) and any(not torch.equal(before[k], after[k]) for k in before)
    # The reference is the pretrained transformer: with adapters off the update is invisible.
    x, t = traj.latents[:, 1], traj.timesteps[1]
    cond, uncond = policy.encode(prompts)
    with torch.no_grad(), policy.reference():
        ref_after = policy.step_log_prob(x, t, cond, uncond, prev_sample=traj.latents[:, 2]).mean
    policy.load_trainable_state(before, version=0)
    with torch.no_grad():
        fresh = policy.step_log_prob(x, t, cond, uncond, prev_sample=traj.latents[:, 2]).mean
    assert torch.allclose(ref_after, fresh, atol=1e-6)  # fresh LoRA (B = 0) is the reference too


def test_the_engine_builds_flow_policies_by_pipeline_and_refuses_algorithms_that_cannot_train_them():
    from ralign.diffusion.policy import DiffusionPolicy, build_policy
    from ralign.models import pipeline_family

    assert [pipeline_family(n) for n in ("tiny-random", "tiny-random-flow", "base", "flow")] == ["unet", "flow", "unet", "flow"]
    policy = build_policy({"pipeline": "tiny-random-flow", "policy": {"unet_lora_rank": 2, "steps": 2, "eval_steps": 3}})
    assert isinstance(policy, FlowPolicy) and policy.family == "flow"
    assert isinstance(build_policy({"pipeline": "tiny-random", "policy": {"steps": 2}}), DiffusionPolicy)
    # Evaluation images: the ODE at eval_steps, image i fixed by (seed, i) whatever the batching (up to one level of
    # rounding: a batched matmul sums in another order).
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    together = policy.generate_images(prompts, seed=3)
    apart = policy.generate_images(prompts, seed=3, batch_size=1)
    assert together[0].shape == (64, 64, 3)
    assert max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(together, apart)) <= 1
    policy.cfg = policy.cfg.model_copy(update={"eval_steps": 5})
    assert int(np.abs(policy.generate_images(prompts[:1], seed=3)[0].astype(int) - together[0]).max()) > 1

    base = {"model": {"pipeline": "tiny-random-flow", "policy": {"steps": 3}}, "reward": {"name": "colorfulness"},
            "train": {"batch_size": 4, "micro_batch": 2}, "ray": {"request_batch": 2}}
    with pytest.raises(ValueError) as info:
        parse_config(TrainConfig, {**base, "algorithm": {"name": "refl"}})
    assert "algorithm.name=refl trains SD-style UNet models only; model.pipeline=tiny-random-flow is a flow-matching " \
           "transformer model (algorithms for it: alignprop, dpok, draft, grpo, interval, nft, rsft)" in str(info.value)
    for algorithm in ({"name": "dpok"}, {"name": "draft"}, {"name": "nft", "nft": {"group_size": 2}}, {"name": "rsft", "rsft": {"samples_per_prompt": 2}}):
        assert parse_config(TrainConfig, {**base, "algorithm": algorithm}).model.family() == "flow"


def test_the_flow_forward_process_is_the_straight_path_with_the_velocity_as_target():
    policy = FlowPolicy(tiny_random_flow_pipeline(), PolicyConfig(unet_lora_rank=2, steps=3))
    x0, noise = torch.randn(64, 4, 8, 8), torch.randn(64, 4, 8, 8)
    noisy, t, target = policy.noised_for_training(x0, noise, torch.Generator().manual_seed(0), t_min=250)
    sigma = t / 1000
    assert t.shape == (64,) and float(sigma.min()) >= 0.25 and float(sigma.max()) < 1.0 and float(sigma.std()) > 0.1
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(noisy, (1 - s) * x0 + s * noise) and torch.equal(target, noise - x0)
    # One Euler step of the ODE from x_sigma with the exact velocity lands on x_0 at sigma = 0.
    assert torch.allclose(noisy - s * target, x0, atol=1e-5)
    cond, _ = policy.encode(["a red circle"] * 2)
    direct = policy.transformer(hidden_states=noisy[:2], timestep=t[:2], encoder_hidden_states=cond[0], pooled_projections=cond[1]).sample
    assert torch.equal(policy.predict(noisy[:2], t[:2], cond), direct)


def test_settings_a_flow_policy_cannot_honour_are_refused():
    pipe = tiny_random_flow_pipeline()
    with pytest.raises(UserError, match="text_encoder=full is not available for flow-matching"):
        FlowPolicy(pipe, PolicyConfig(text_encoder="full"))
    with pytest.raises(UserError, match="text_encoding=segment"):
        FlowPolicy(pipe, PolicyConfig(text_encoding="segment"))
    with pytest.raises(ValueError, match="at least 2 steps"):
        FlowPolicy(pipe, PolicyConfig(steps=1))
    policy = FlowPolicy(pipe, PolicyConfig(unet_lora_rank=2, steps=4, eta=0.7))
    with pytest.raises(ValueError, match="not on the 4-step grid"):
        policy.step_log_prob(torch.zeros(1, 4, 8, 8), 123.0, *policy.encode(["a red circle"]), prev_sample=torch.zeros(1, 4, 8, 8))


def test_flow_pretraining_writes_a_pipeline_that_loads_offline_and_trains(tmp_path):
    """`ralign world pretrain --only flow` end to end on 2 steps: a StableDiffusion3Pipeline directory (safetensors,
    no T5) with its card and oracle figures, which the flow policy loads and samples."""
    import json

    from ralign.models import TOY_MODELS_DIR
    from ralign.models.toy_flow import load_flow_pipeline
    from ralign.pretrain.run import pretrain_all

    (tmp_path / "base").symlink_to(TOY_MODELS_DIR / "base", target_is_directory=True)
    results = pretrain_all(tmp_path, ["flow"], overrides={"flow": {"steps": 2, "batch": 4, "eval_prompts": 2, "eval_steps": 2,
                                                                        "width": 32, "layers": 1, "heads": 2}})
    assert results["flow"]["train"]["steps"] == 2 and set(results["flow"]["eval_test"]["families"]) >= {"single", "long"}
    card = (tmp_path / "flow" / "MODEL_CARD.md").read_text()
    assert "SD3Transformer2DModel" in card and "| single | 2 |" in card
    assert not list((tmp_path / "flow").rglob("*.bin")) and not (tmp_path / "flow" / "text_encoder_3").exists()
    assert json.loads((tmp_path / "flow" / "pretrain_metrics.json").read_text())["runs"][0]["steps"] == 2
    policy = FlowPolicy(load_flow_pipeline(tmp_path / "flow"), PolicyConfig(unet_lora_rank=2, steps=3, eta=0.7))
    traj = policy.sample(["a red circle"], [0])
    assert traj.images.shape == (1, 3, 64, 64) and torch.isfinite(traj.log_probs).all()


def test_the_committed_toy_flow_model_loads_by_name_and_samples():
    from ralign.models.toy_flow import load_flow_pipeline

    pipe = load_flow_pipeline("flow")
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel" and pipe.text_encoder_3 is None
    policy = FlowPolicy(pipe, PolicyConfig(unet_lora_rank=4, steps=10, eta=0.7))
    traj = policy.sample(["a red circle", "two blue squares"], [0, 1])
    assert traj.images.shape == (2, 3, 64, 64) and torch.isfinite(traj.log_probs).all()


def test_sd35_config_loads_a_flow_pipeline_directory_through_the_same_path(tmp_path):
    """jobs/configs/sd35.yaml with only the machine-sized settings overridden: a StableDiffusion3Pipeline directory
    (no T5, as the toy one) loads through the path a real SD3.5 checkpoint takes, and GRPO updates it."""
    from pathlib import Path

    from ralign.config import load_config
    from ralign.diffusion.policy import build_policy

    tiny_random_flow_pipeline().save_pretrained(tmp_path / "sd3")
    config = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "sd35.yaml"
    cfg = load_config(TrainConfig, config, [
        f"model.pipeline={tmp_path / 'sd3'}", "model.policy.steps=3", "model.policy.eval_steps=4", "reward.name=colorfulness",
        "reward.options={}", "ray.use_gpu=false", "algorithm.grpo.group_size=2", "train.batch_size=4", "train.micro_batch=2",
        "ray.request_batch=2",
    ])
    assert cfg.model.family() == "flow" and cfg.model.policy.guidance == 4.5 and cfg.algorithm.grpo.clip_range == 1e-4
    seed_lora_init()
    policy = build_policy(cfg.policy_spec())
    assert isinstance(policy, FlowPolicy) and policy.transformer.peft_config["default"].r == 32
    learner = Learner(cfg, policy)
    prompts, seeds = ["a red circle", "a red circle", "two blue squares", "two blue squares"], [1, 2, 3, 4]
    traj = policy.sample(prompts, seeds)
    stats = learner.update(Chains([0, 1, 2, 3], prompts, seeds, [0] * 4, latents=traj.latents, log_probs=traj.log_probs,
                                  timesteps=traj.timesteps, scores=torch.tensor([0.1, 0.9, 0.4, 0.2])))
    assert learner.engine.global_steps == 2 and stats["grad_norm"] > 0  # minibatches: 2 optimiser updates per batch
    assert len(policy.generate_images(["a red circle"])) == 1


def test_reward_backprop_on_a_flow_model_refuses_rewards_that_score_cross_attention():
    from ralign.algorithms.backprop_chain import BackpropSettings, backprop_update
    from ralign.rewards.base import Reward

    class AttentionScore(Reward):
        name, differentiable, uses_attention = "attention_score", True, True

        def __call__(self, images, prompts, attention=None):
            raise AssertionError("never reached")

    policy = FlowPolicy(tiny_random_flow_pipeline(), PolicyConfig(unet_lora_rank=2, steps=3))
    with pytest.raises(ValueError, match="reward attention_score scores cross-attention maps"):
        backprop_update(policy, ["a red circle"], [0], AttentionScore(), BackpropSettings(k=1), [2])
