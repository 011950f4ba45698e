"""`ralign world pretrain` runs end to end on a tiny budget and leaves loadable models with model cards."""

from __future__ import annotations

import json

from diffusers import StableDiffusionPipeline

from ralign.pretrain.run import pretrain_all
from ralign.pretrain.t2i import T2IPretrainConfig


def test_tiny_t2i_pretraining_produces_a_loadable_pipeline(tmp_path):
    results = pretrain_all(tmp_path, ["t2i"], scale=0.002)
    assert results["t2i"]["unet"]["steps"] == max(1, int(T2IPretrainConfig().unet_steps * 0.002))
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base", local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert (tmp_path / "base" / "MODEL_CARD.md").read_text().startswith("# Toy base")
    assert (tmp_path / "text_clip" / "MODEL_CARD.md").is_file()
    metrics = json.loads((tmp_path / "base" / "pretrain_metrics.json").read_text())
    assert metrics["vae"]["scaling_factor"] > 0
    assert not (tmp_path / ".t2i_staging").exists()
