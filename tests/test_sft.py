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
