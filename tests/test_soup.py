"""`ralign soup`: the soup's weight change is exactly the weighted average of its checkpoints' changes, it loads and
samples through every path a checkpoint does, and what cannot be souped is refused in one line with nothing written."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ralign.config import UserError
from ralign.diffusion.policy import build_policy, policy_from_checkpoint
from ralign.ops.soup import soup_checkpoints

PROMPTS = ["a red circle", "two blue squares"]


def _checkpoint(directory, policy_settings: dict, seed: int, pipeline: str = "tiny-random"):
    """A learner-layout checkpoint whose trainable tensors were moved off their initialisation; `seed` also sets the
    LoRA initialisation, as `train.seed` does, so two checkpoints start from different factors."""
    spec = {"pipeline": pipeline, "seed": seed, "policy": policy_settings}
    torch.manual_seed(seed)
    policy = build_policy(spec)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in policy.trainable_state().items()}
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "trainable.safetensors"))
    (directory / "learner_state.json").write_text(json.dumps({"iteration": 5, "version": 5, "policy_spec": spec, "run_id": f"run{seed}",
                                                              "trained_with": {"algorithm": "grpo", "reward": "detector"}}))
    return directory


def _deltas(policy) -> dict[str, torch.Tensor]:
    """Each LoRA layer's weight change (peft's own `get_delta_weight`: scale x B @ A) and every fully trained tensor."""
    out = {}
    for prefix, module in policy.lora_modules().items():
        for name, layer in module.named_modules():
            if hasattr(layer, "get_delta_weight") and "default" in getattr(layer, "lora_A", {}):
                out[f"{prefix}.{name}"] = layer.get_delta_weight("default").detach()
    for key, value in policy.trainable_state().items():
        if ".lora_" not in key:
            out[key] = value
    return out


def test_soup_is_the_weighted_average_of_the_changes(tmp_path):
    a = _checkpoint(tmp_path / "a", {"unet_lora_rank": 2, "unet_lora_alpha": 4.0, "steps": 3}, seed=1)
    b = _checkpoint(tmp_path / "b", {"unet_lora_rank": 3, "steps": 3}, seed=2)  # another rank and scale
    result = soup_checkpoints([str(a), str(b)], tmp_path / "soup", weights=[3, 1])
    assert result["weights"] == [0.75, 0.25]
    assert result["policy"]["unet_lora_rank"] == 5 and result["policy"]["unet_lora_alpha"] == 5.0
    da, db = _deltas(policy_from_checkpoint(a)), _deltas(policy_from_checkpoint(b))
    soup = _deltas(policy_from_checkpoint(tmp_path / "soup"))
    assert set(soup) == set(da) and len(soup) > 0
    for key in soup:
        torch.testing.assert_close(soup[key], 0.75 * da[key] + 0.25 * db[key], rtol=1e-5, atol=1e-6)
    record = json.loads((tmp_path / "soup" / "learner_state.json").read_text())
    assert [s["run_id"] for s in record["souped_from"]] == ["run1", "run2"]
    assert record["policy_spec"]["init_checkpoint"] is None


def test_a_soup_of_one_run_with_itself_samples_the_same_images(tmp_path):
    a = _checkpoint(tmp_path / "a", {"unet_lora_rank": 2, "steps": 3}, seed=1)
    soup_checkpoints([str(a), str(a)], tmp_path / "soup")
    same = policy_from_checkpoint(tmp_path / "soup").generate_images(PROMPTS, seed=3)
    for x, y in zip(same, policy_from_checkpoint(a).generate_images(PROMPTS, seed=3)):
        assert float(np.abs(x.astype(float) - y.astype(float)).max()) <= 1.0  # one level of rounding at most


def test_fully_tuned_text_encoders_are_averaged(tmp_path):
    settings = {"unet_lora_rank": 2, "text_encoder": "full", "steps": 3}
    a, b = _checkpoint(tmp_path / "a", settings, seed=1), _checkpoint(tmp_path / "b", settings, seed=2)
    soup_checkpoints([str(a), str(b)], tmp_path / "soup")
    sa, sb = (policy_from_checkpoint(c).trainable_state() for c in (a, b))
    soup = policy_from_checkpoint(tmp_path / "soup").trainable_state()
    text = [k for k in soup if k.startswith("text_encoder.")]
    assert text
    for key in text:
        torch.testing.assert_close(soup[key], 0.5 * (sa[key] + sb[key]))


def test_the_cli_writes_a_soup_that_eval_reads(ralign_cli_inprocess, tmp_path):
    a = _checkpoint(tmp_path / "a", {"unet_lora_rank": 2, "steps": 3}, seed=1)
    b = _checkpoint(tmp_path / "b", {"unet_lora_rank": 2, "steps": 3}, seed=2)
    result = ralign_cli_inprocess("soup", str(a), str(b), "--out", str(tmp_path / "soup"), "--weights", "1,1")
    assert result.exit_code == 0, result.output
    assert "unet_lora_rank 4" in result.output
    report = ralign_cli_inprocess("eval", "--checkpoint", str(tmp_path / "soup"), "--n", "2", "--families", "single",
                                  "--json", str(tmp_path / "eval.json"))
    assert report.exit_code == 0, report.output
    assert json.loads((tmp_path / "eval.json").read_text())["families"]["single"]["n"] == 2


@pytest.mark.parametrize("case", ["one", "other_settings", "other_pipeline", "other_tensors", "negative_weight", "weights_count", "not_empty"])
def test_what_cannot_be_souped_is_refused_and_nothing_is_written(tmp_path, case):
    a = _checkpoint(tmp_path / "a", {"unet_lora_rank": 2, "steps": 3}, seed=1)
    b_settings, b_pipeline = {"unet_lora_rank": 2, "steps": 3}, "tiny-random"
    if case == "other_settings":
        b_settings = {**b_settings, "steps": 4}
    b = _checkpoint(tmp_path / "b", b_settings, seed=2, pipeline=b_pipeline)
    if case == "other_tensors":  # e.g. a checkpoint of an older layout: same settings, a tensor fewer
        from safetensors.torch import load_file

        tensors = load_file(str(b / "trainable.safetensors"))
        tensors.pop(sorted(tensors)[0])
        save_file(tensors, str(b / "trainable.safetensors"))
    if case == "other_pipeline":
        record = json.loads((b / "learner_state.json").read_text())
        record["policy_spec"]["pipeline"] = "base"
        (b / "learner_state.json").write_text(json.dumps(record))
    refs, weights, out = [str(a), str(b)], None, tmp_path / "soup"
    if case == "one":
        refs = [str(a)]
    if case == "negative_weight":
        weights = [1.0, -0.5]
    if case == "weights_count":
        weights = [1.0]
    if case == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    expected = {"one": "at least 2", "other_settings": "['steps']", "other_pipeline": "one base model",
                "other_tensors": "different tensors", "negative_weight": ">= 0", "weights_count": "1 value(s) for 2",
                "not_empty": "not an empty directory"}[case]
    with pytest.raises(UserError, match=re.escape(expected)) as err:
        soup_checkpoints(refs, out, weights)
    assert "\n" not in str(err.value)
    if case == "not_empty":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".soup")]  # no staging left behind
