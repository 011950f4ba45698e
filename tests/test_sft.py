"""LongAlign's supervised stage: the denoising loss trains only the trainable weights with the policy's encoding,
writes a self-describing checkpoint atomically, and a training config starts from it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from jobs.sft import run_sft
from ralign.training.config import SFTConfig
from ralign.config import ConfigError, parse_config
from ralign.diffusion.policy import build_policy, policy_from_checkpoint
from ralign.training.config import TrainConfig


def test_sft_stage_writes_a_checkpoint_that_training_starts_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(SFTConfig, {
        "model": {"pipeline": "tiny-random", "policy": {"unet_lora_rank": 4, "text_encoding": "segment", "segment_budget": 32, "steps": 2}},
        "families": ["long", "single"], "steps": 4, "batch_size": 2, "lr": 1e-2, "log_every": 2, "out": "stage1",
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "sft-test"},
    })
    before = build_policy(cfg.policy_spec()).trainable_state()
    result = run_sft(cfg)
    assert result["steps"] == 4 and result["final_loss"] > 0
    weights = load_file(str(tmp_path / "stage1" / "trainable.safetensors"))
    assert weights.keys() == before.keys()
    assert any(not torch.equal(weights[k], before[k]) for k in weights if "lora_B" in k)  # LoRA B starts at 0 and moved
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sft_")]  # no half-written directory left
    state = json.loads((tmp_path / "stage1" / "learner_state.json").read_text())
    assert state["policy_spec"]["policy"]["text_encoding"] == "segment"
    # a training config resolves the relative path and its policy starts from the stage's weights
    train_cfg = parse_config(TrainConfig, {"model": {"pipeline": "tiny-random", "init_checkpoint": "stage1",
                                                     "policy": {"unet_lora_rank": 4, "text_encoding": "segment", "segment_budget": 32, "steps": 2}}})
    assert train_cfg.model.init_checkpoint == str(tmp_path / "stage1")
    started = build_policy(train_cfg.policy_spec()).trainable_state()
    assert all(torch.equal(started[k], weights[k]) for k in weights)
    assert all(torch.equal(policy_from_checkpoint(tmp_path / "stage1").trainable_state()[k], weights[k]) for k in weights)


def test_missing_or_mismatched_init_checkpoint_is_a_clear_error(tmp_path):
    cfg = parse_config(TrainConfig, {"model": {"pipeline": "tiny-random", "init_checkpoint": str(tmp_path / "nowhere")}})
    with pytest.raises(FileNotFoundError, match="ralign sft"):
        build_policy(cfg.policy_spec())
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config(SFTConfig, {"stepz": 3})


def _tiny_policy(encoding: str, **extra):
    return build_policy({"pipeline": "tiny-random", "policy": {"unet_lora_rank": 4, "text_encoding": encoding, "segment_budget": 32,
                                                               "steps": 2, **extra}})


def test_plain_teacher_gap_is_zero_for_the_teacher_itself_and_skips_prompts_it_cannot_read():
    from ralign.algorithms.sft import _denoising_terms, plain_teacher_gap

    torch.manual_seed(0)
    policy = _tiny_policy("plain")  # fresh LoRA (B = 0) with the plain encoding: the policy is its own teacher
    latents = torch.randn(2, *policy.latent_shape())
    short = ["a red circle", "two blue squares"]
    noisy, t, prediction, _ = _denoising_terms(policy, latents, short, torch.Generator().manual_seed(1))
    assert plain_teacher_gap(policy, noisy, t, prediction, short).item() == pytest.approx(0.0, abs=1e-10)
    # a prompt longer than one encoder pass has no plain teacher: no term, but a graph that backward accepts
    long = [" ".join(["there is a small red circle."] * 8)] * 2
    gap = plain_teacher_gap(policy, noisy, t, prediction, long)
    assert gap.item() == 0.0 and gap.requires_grad


def test_plain_teacher_gap_pulls_a_segment_encoded_policy_toward_the_plain_teacher():
    from ralign.algorithms.sft import _denoising_terms, plain_teacher_gap

    torch.manual_seed(0)
    policy = _tiny_policy("segment")
    prompts = ["a red circle", "two blue squares"]
    latents = torch.randn(2, *policy.latent_shape())
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    gaps = []
    for step in range(8):
        noisy, t, prediction, _ = _denoising_terms(policy, latents, prompts, torch.Generator().manual_seed(1))
        gap = plain_teacher_gap(policy, noisy, t, prediction, prompts)
        gaps.append(gap.item())
        gap.backward()
        opt.step()
        opt.zero_grad()
    assert gaps[0] > 0 and gaps[-1] < 0.5 * gaps[0]  # the same noisy latents each step: the gap must shrink


def test_the_pretrained_spec_keeps_the_base_and_sampler_and_drops_every_stage():
    from ralign.diffusion.policy import pretrained_spec

    staged = {"pipeline": "base", "seed": 3, "init_checkpoint": "/runs/stage1",
              "policy": {"unet_lora_rank": 8, "text_encoding": "segment", "segment_plain_short": True, "text_encoder": "lora",
                         "steps": 10, "eval_steps": 40, "eta": 0.7, "guidance": 4.5}}
    spec = pretrained_spec(staged)
    assert spec["pipeline"] == "base" and spec["seed"] == 3 and spec["init_checkpoint"] is None
    assert spec["policy"] == {"steps": 10, "eval_steps": 40, "eta": 0.7, "guidance": 4.5, "unet_lora_rank": 0,
                              "text_encoder": "frozen", "text_encoding": "plain"}
    assert build_policy({**spec, "pipeline": "tiny-random"}).trainable_state() == {}  # nothing trained
