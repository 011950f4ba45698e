"""TextCraftor: interpolation of tuned and original text embeddings (formula, policy, CLI), mixing two tuned encoders,
and checkpoints that load on their own."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ralign.models.toy_t2i import tiny_random_pipeline
from ralign.diffusion.policy import DiffusionPolicy, PolicyConfig, policy_from_checkpoint
from ralign.diffusion.text_encoding import interpolate_embeddings

PROMPTS = ["a red circle", "two blue squares"]


def test_interpolation_formula_on_hand_made_tensors():
    orig, tuned, other = torch.zeros(1, 2, 3), torch.ones(1, 2, 3), torch.full((1, 2, 3), 4.0)
    torch.testing.assert_close(interpolate_embeddings(orig, [(0.0, tuned)]), orig)
    torch.testing.assert_close(interpolate_embeddings(orig, [(1.0, tuned)]), tuned)
    torch.testing.assert_close(interpolate_embeddings(orig, [(0.25, tuned)]), torch.full((1, 2, 3), 0.25))
    # two tuned encoders: 0.5·1 + 0.25·4 + 0.25·0
    torch.testing.assert_close(interpolate_embeddings(orig, [(0.5, tuned), (0.25, other)]), torch.full((1, 2, 3), 1.5))
    with pytest.raises(ValueError, match="differ in shape"):
        interpolate_embeddings(orig, [(1.0, torch.ones(1, 3, 3))])


def _tuned_policy(weight: float = 1.0, seed: int = 0) -> DiffusionPolicy:
    policy = DiffusionPolicy(tiny_random_pipeline(), PolicyConfig(unet_lora_rank=0, text_encoder="full", steps=2, text_encoder_weight=weight))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in policy.text_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy


@torch.no_grad()
def test_policy_interpolation_at_0_and_1_reproduces_original_and_tuned_embeddings():
    tuned = _tuned_policy(1.0)
    original = tuned.encode(PROMPTS, original=True)
    full = tuned.encode(PROMPTS)
    assert not torch.allclose(full[0], original[0])
    tuned.cfg.text_encoder_weight = 0.0
    for got, want in zip(tuned.encode(PROMPTS), original):
        torch.testing.assert_close(got, want)
    tuned.cfg.text_encoder_weight = 0.5
    for got, a, b in zip(tuned.encode(PROMPTS), original, full):
        torch.testing.assert_close(got, 0.5 * a + 0.5 * b)


@torch.no_grad()
def test_mixing_a_second_tuned_encoder():
    a, b = _tuned_policy(seed=1), _tuned_policy(seed=2)
    ea, eb, e0 = a.encode(PROMPTS)[0], b.encode(PROMPTS)[0], a.encode(PROMPTS, original=True)[0]
    a.cfg.text_encoder_weight = 0.5
    a.mix_text_encoder(b.trainable_state(), 0.3)
    torch.testing.assert_close(a.encode(PROMPTS)[0], 0.5 * ea + 0.3 * eb + 0.2 * e0)
    with pytest.raises(ValueError, match="no text-encoder weights"):
        a.mix_text_encoder({"unet.x": torch.zeros(1)}, 0.1)


def _write_checkpoint(directory, policy: DiffusionPolicy) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in policy.trainable_state().items()}, str(directory / "trainable.safetensors"))
    spec = {"pipeline": "tiny-random", "seed": 0, "policy": {"unet_lora_rank": 0, "text_encoder": "full", "steps": 2}}
    (directory / "learner_state.json").write_text(json.dumps({"version": 3, "policy_spec": spec}))


@torch.no_grad()
def test_checkpoint_loads_on_its_own_with_an_interpolation_weight(tmp_path):
    tuned = _tuned_policy()
    _write_checkpoint(tmp_path / "ckpt", tuned)
    loaded = policy_from_checkpoint(tmp_path / "ckpt", text_encoder_weight=0.0)
    assert loaded.version == 3 and loaded.cfg.text_encoder_weight == 0.0
    torch.testing.assert_close(loaded.encode(PROMPTS)[0], tuned.encode(PROMPTS, original=True)[0])
    loaded.cfg.text_encoder_weight = 1.0
    torch.testing.assert_close(loaded.encode(PROMPTS)[0], tuned.encode(PROMPTS)[0])
    with pytest.raises(FileNotFoundError, match="not a ralign checkpoint"):
        policy_from_checkpoint(tmp_path)


def test_generate_cli_interpolates_and_mixes(ralign_cli, tmp_path):
    _write_checkpoint(tmp_path / "a", _tuned_policy(seed=1))
    _write_checkpoint(tmp_path / "b", _tuned_policy(seed=2))

    def run(*args):  # the console script's own `main`, in this process (a subprocess each costs seconds of imports)
        return ralign_cli("generate", "--prompt", "a red circle", "--prompt", "three green triangles", "--steps", "2", *args)

    outs = {}
    for name, extra in {"w0": ["--text-encoder-weight", "0"], "w1": [], "mix": ["--text-encoder-weight", "0.5", "--mix", f"{tmp_path / 'b'}=0.5"]}.items():
        outcome = run("--checkpoint", str(tmp_path / "a"), "--out", str(tmp_path / name), *extra)
        assert outcome.code == 0, outcome.err[-2000:]
        assert (tmp_path / name / "grid.png").is_file() and (tmp_path / name / "0001.png").is_file()
        outs[name] = (tmp_path / name / "0000.png").read_bytes()
    assert outs["w0"] != outs["w1"] and outs["mix"] != outs["w1"]
    assert run("--text-encoder-weight", "0.5", "--out", str(tmp_path / "x")).one_line_error().startswith(
        "error: --text-encoder-weight and --mix need a --checkpoint")
    assert "CHECKPOINT_DIR=WEIGHT" in run("--checkpoint", str(tmp_path / "a"), "--mix", "nonsense", "--out", str(tmp_path / "y")).one_line_error()
