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


@pytest.fixture
def tagged_store(tmp_path):
    """A real MLflow store holding three finished runs with `ralign train`'s reward-hacking verdicts."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("soup-flags")
    ids = {}
    for name, tags in {"clean": {"ralign.reward_hacking": "none"},
                       "hacked": {"ralign.reward_hacking": "counting,size"},
                       "hacked_vs_pretrained": {"ralign.reward_hacking": "none", "ralign.reward_hacking_vs_pretrained": "binding"}}.items():
        run = client.create_run(experiment, tags=tags)
        client.set_terminated(run.info.run_id)
        ids[name] = run.info.run_id
    return uri, ids


def _checkpoint_of_run(directory, run_id: str, seed: int):
    path = _checkpoint(directory, {"unet_lora_rank": 2, "steps": 3}, seed=seed)
    record = json.loads((path / "learner_state.json").read_text())
    (path / "learner_state.json").write_text(json.dumps({**record, "run_id": run_id}))
    return path


@pytest.mark.parametrize("flagged_run, families", [("hacked", "counting, size"), ("hacked_vs_pretrained", "binding")])
def test_a_run_flagged_for_reward_hacking_is_refused_unless_allowed(tmp_path, tagged_store, flagged_run, families):
    uri, ids = tagged_store
    clean = _checkpoint_of_run(tmp_path / "clean", ids["clean"], seed=1)
    flagged = _checkpoint_of_run(tmp_path / "flagged", ids[flagged_run], seed=2)
    with pytest.raises(UserError, match=re.escape(f"{flagged} (run {ids[flagged_run]}: {families})")) as err:
        soup_checkpoints([str(clean), str(flagged)], tmp_path / "soup", tracking_uri=uri)
    assert "\n" not in str(err.value) and "--allow-flagged" in str(err.value)
    assert not (tmp_path / "soup").exists()

    result = soup_checkpoints([str(clean), str(flagged)], tmp_path / "soup", tracking_uri=uri, allow_flagged=True)
    assert result["flagged"] == {str(flagged): families.split(", ")} and result["unchecked"] == []
    record = json.loads((tmp_path / "soup" / "learner_state.json").read_text())
    assert [s["reward_hacking"] for s in record["souped_from"]] == [[], families.split(", ")]


def test_runs_the_store_does_not_hold_are_souped_and_reported_unchecked(tmp_path, tagged_store, ralign_cli_inprocess):
    uri, ids = tagged_store
    clean = _checkpoint_of_run(tmp_path / "clean", ids["clean"], seed=1)
    elsewhere = _checkpoint_of_run(tmp_path / "elsewhere", "0123456789abcdef0123456789abcdef", seed=2)
    result = ralign_cli_inprocess("soup", str(clean), str(elsewhere), "--out", str(tmp_path / "soup"), "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    assert f"no reward-hacking verdict found for {elsewhere}" in result.output
    record = json.loads((tmp_path / "soup" / "learner_state.json").read_text())
    assert [s["reward_hacking"] for s in record["souped_from"]] == [[], "unchecked"]
