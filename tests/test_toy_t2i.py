"""The committed toy text-to-image model loads offline through the same code as real checkpoints, and generates."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import AutoTokenizer, CLIPModel

from ralign.models.pipeline import TOY_MODELS_DIR, ModelLoadError, generate_images, load_pipeline, resolve_model_path
from ralign.world.prompts import TEXT_MAX_TOKENS

BASE = TOY_MODELS_DIR / "base"


def test_base_loads_offline_with_plain_diffusers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(BASE, use_safetensors=True, local_files_only=True)
    assert pipe.tokenizer.model_max_length == TEXT_MAX_TOKENS
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert not list(BASE.rglob("*.bin")), "weights must be safetensors only"


def test_text_clip_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = TOY_MODELS_DIR / "text_clip"
    model = CLIPModel.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(["a red circle", "a blue square"], padding="max_length", max_length=TEXT_MAX_TOKENS, return_tensors="pt")
    feats = model.get_text_features(**enc).pooler_output
    assert feats.shape[0] == 2 and torch.isfinite(feats).all()
    # The diffusion text encoder is exactly this CLIP's text tower.
    pipe_te = StableDiffusionPipeline.from_pretrained(BASE, local_files_only=True).text_encoder
    for (name, a), b in zip(model.text_model.state_dict().items(), pipe_te.state_dict().values()):
        assert torch.equal(a, b), name


def test_generate_is_deterministic_and_batch_independent():
    pipe = load_pipeline("base")
    prompts = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]
    a = generate_images(pipe, prompts, steps=3, seed=7, batch_size=3)
    b = generate_images(pipe, prompts, steps=3, seed=7, batch_size=1)
    assert len(a) == 3 and a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8
    for x, y in zip(a, b):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1  # batched BLAS may differ in the last bit
    c = generate_images(pipe, prompts[:1], steps=3, seed=8)
    assert not np.array_equal(a[0], c[0])


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        resolve_model_path(str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(BASE, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cannot load pipeline"):
        load_pipeline(str(broken))
