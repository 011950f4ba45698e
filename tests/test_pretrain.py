"""`ralign world pretrain` runs end to end on a tiny budget and leaves loadable models with model cards."""

from __future__ import annotations

import json
import shutil

import pytest
from diffusers import StableDiffusionPipeline

from ralign.pretrain.run import pretrain_all
from ralign.pretrain.t2i import T2IPretrainConfig

SMALL_BATCHES = {"clip_batch": 16, "vae_batch": 4, "unet_batch": 8}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One tiny pretraining run, shared: each test works on its own copy. Small batches: the full-size UNet at batch
    64 costs seconds a step, and what is checked here is the layout, the cards and the step bookkeeping."""
    out = tmp_path_factory.mktemp("pretrained")
    return out, pretrain_all(out, ["t2i"], scale=0.002, overrides={"t2i": SMALL_BATCHES})


def test_tiny_t2i_pretraining_produces_a_loadable_pipeline(pretrained, tmp_path):
    source, results = pretrained
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    assert results["t2i"]["unet"]["steps"] == max(1, int(T2IPretrainConfig().unet_steps * 0.002))
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base", local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert (tmp_path / "base" / "MODEL_CARD.md").read_text().startswith("# Toy base")
    assert (tmp_path / "text_clip" / "MODEL_CARD.md").is_file()
    metrics = json.loads((tmp_path / "base" / "pretrain_metrics.json").read_text())
    assert metrics["vae"]["scaling_factor"] > 0
    assert not (tmp_path / ".t2i_staging").exists()


def test_continuing_the_unet_keeps_text_encoder_and_vae_and_counts_steps(pretrained, tmp_path):
    source, first = pretrained
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    before = StableDiffusionPipeline.from_pretrained(tmp_path / "base", local_files_only=True)
    more = pretrain_all(tmp_path, ["t2i"], overrides={"t2i": {**SMALL_BATCHES, "continue_steps": 2, "unet_lr": 1e-3}})
    after = StableDiffusionPipeline.from_pretrained(tmp_path / "base", local_files_only=True)
    assert more["t2i"]["unet"]["steps"] == first["t2i"]["unet"]["steps"] + 2
    assert [r["steps"] for r in more["t2i"]["unet"]["runs"]] == [first["t2i"]["unet"]["steps"], 2]
    for name in ("vae", "text_encoder"):
        a, b = getattr(before, name).state_dict(), getattr(after, name).state_dict()
        assert all((a[k] == b[k]).all() for k in a)
    unet_a, unet_b = before.unet.state_dict(), after.unet.state_dict()
    assert any((unet_a[k] != unet_b[k]).any() for k in unet_a)
    assert "run 2: 2 steps, lr 0.001" in (tmp_path / "base" / "MODEL_CARD.md").read_text()
