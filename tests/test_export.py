"""`ralign export`: a trained checkpoint, exported, loads into a stock diffusers pipeline (`load_lora_weights`, or
`from_pretrained` for the pipeline format) and gives the images `ralign generate` gives at the same seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from ralign.diffusion.policy import base_pipeline, build_policy, policy_from_checkpoint
from ralign.models.pipeline import generate_images

PROMPTS = ["a red circle", "two blue squares to the left of a yellow triangle"]
# Fused LoRA weights and a separately applied adapter round differently in float32: images agree to within this.
TOLERANCE = 2 / 255


def _checkpoint(directory, policy_settings: dict, seed: int = 0):
    """A checkpoint in the learner's layout whose trainable weights were moved off their initialisation."""
    spec = {"pipeline": "tiny-random", "seed": 0, "policy": policy_settings}
    torch.manual_seed(seed)
    policy = build_policy(spec)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in policy.trainable_state().items()}
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "trainable.safetensors"))
    (directory / "learner_state.json").write_text(json.dumps({"iteration": 3, "version": 3, "policy_spec": spec,
                                                              "trained_with": {"algorithm": "grpo", "reward": "clip_score"}}))
    return directory


def _ours(checkpoint, **overrides) -> list[np.ndarray]:
    return policy_from_checkpoint(checkpoint, **overrides).generate_images(PROMPTS, seed=3)


def _stock(pipe: StableDiffusionPipeline, steps: int) -> list[np.ndarray]:
    pipe.set_progress_bar_config(disable=True)
    return generate_images(pipe, PROMPTS, steps=steps, guidance=3.0, seed=3)


def _close(a, b) -> None:
    diff = max(float(np.abs(x.astype(float) - y.astype(float)).max()) for x, y in zip(a, b)) / 255
    assert diff <= TOLERANCE, f"images differ by {diff:.4f}"


def test_lora_export_loads_into_a_stock_pipeline(ralign_cli_inprocess, tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt", {"unet_lora_rank": 2, "unet_lora_alpha": 4.0, "steps": 3})
    result = ralign_cli_inprocess("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "lora"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "grpo / clip_score" in card and "load_lora_weights" in card
    pipe = base_pipeline({"pipeline": "tiny-random", "seed": 0})
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors")
    _close(_stock(pipe, steps=3), _ours(ckpt))
    plain = _stock(base_pipeline({"pipeline": "tiny-random", "seed": 0}), steps=3)
    assert any(not np.array_equal(x, y) for x, y in zip(plain, _ours(ckpt)))  # the LoRA changes the images


def test_pipeline_export_of_a_tuned_text_encoder_at_an_interpolation_weight(ralign_cli_inprocess, tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt", {"unet_lora_rank": 2, "text_encoder": "full", "steps": 3})
    refused = ralign_cli_inprocess("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"))
    assert refused.exit_code != 0 and "use --format pipeline" in str(refused.exception)
    assert not (tmp_path / "x").exists()
    result = ralign_cli_inprocess("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "pipe"), "--format", "pipeline")
    assert result.exit_code == 0, result.output
    _close(_stock(StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe")), steps=3), _ours(ckpt))
    # At an interpolation weight the exported encoder interpolates weights: close to ralign's embeddings, and said so.
    data = json.loads((ckpt / "learner_state.json").read_text())
    data["policy_spec"]["policy"]["text_encoder_weight"] = 0.5
    (ckpt / "learner_state.json").write_text(json.dumps(data))
    from ralign.ops.export import export_checkpoint

    half = export_checkpoint(str(ckpt), tmp_path / "half", "pipeline")
    assert any("interpolates the encoders' weights" in n for n in half["notes"])


def test_bad_input_is_one_line_and_writes_nothing(ralign_cli_inprocess, tmp_path):
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "keep.txt").write_text("mine")
    ckpt = _checkpoint(tmp_path / "ckpt", {"unet_lora_rank": 2, "steps": 3})
    for args, message in ((["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a")], "is not a ralign checkpoint"),
                          (["--checkpoint", str(ckpt), "--out", str(tmp_path / "occupied")], "not an empty directory"),
                          (["--checkpoint", str(ckpt), "--out", str(tmp_path / "b"), "--format", "onnx"], "--format 'onnx'")):
        result = ralign_cli_inprocess("export", *args)
        assert result.exit_code != 0 and message in str(result.exception), result.output
    (ckpt / "trainable.safetensors").write_bytes(b"not safetensors")
    damaged = ralign_cli_inprocess("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "c"))
    assert damaged.exit_code != 0 and "not a safetensors file" in str(damaged.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "occupied"]
    assert (tmp_path / "occupied" / "keep.txt").read_text() == "mine"
