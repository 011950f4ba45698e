"""The flow policy through the engine's learner: GRPO's update on Flow-GRPO's SDE chains (on-policy ratio exactly 1,
the KL to the adapter-off reference 0 before the first step), and the settings it refuses."""

from __future__ import annotations

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
        "model": {"pipeline": "tiny-random", "policy": {"unet_lora_rank": 4, "steps": 4, "eta": 0.7, "guidance": 3.0}},
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
    results = pretrain_all(tmp_path, ["flow"], flow_overrides={"steps": 2, "batch": 4, "eval_prompts": 2, "eval_steps": 2,
                                                               "width": 32, "layers": 1, "heads": 2})
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
