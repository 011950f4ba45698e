"""Corrupted or mismatched weights, at every place the project loads them: each is one line naming the file and what
is wrong (truncated / not safetensors, a tensor of another shape, a tensor missing or extra, NaN values, a broken
learner_state.json), and a refused `ralign generate` / `ralign eval` writes nothing.

Load paths: a training checkpoint (`generate --checkpoint DIR`, `policy_from_checkpoint`), the same through MLflow
(`runs:/` and `models:/` URIs), `--mix`, `model.init_checkpoint` (`build_policy`), a diffusers pipeline directory
(`model.pipeline`, `eval --pipeline`), the toy reward CLIP / preference model, captioner and segmenter, and CoMat's
discriminator state. The learner's resume path (`Learner.load`) is in test_checkpoint_security.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load, save_file

from ralign.models.weights import CheckpointError
from ralign.models import ModelLoadError
from ralign.models.pipeline import TOY_MODELS_DIR, load_pipeline
from ralign.diffusion.policy import build_policy

from .checkpoints import policy_spec, write_checkpoint

LORA_A = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight"


def _state(**policy) -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    return build_policy(policy_spec(**policy)).trainable_state()


def _read(path) -> dict[str, torch.Tensor]:
    # From bytes, not `load_file`: its tensors map the file, and rewriting a mapped file under them is a bus error.
    return load(path.read_bytes())


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _break_weights(kind: str, directory) -> None:
    weights = directory / "trainable.safetensors"
    state = _read(weights)
    if kind == "truncated":
        _truncate(weights)
    elif kind == "a pickle named .safetensors":
        torch.save(state, weights)  # what a careless export produces; it must never be unpickled
    elif kind == "other LoRA rank":
        save_file(_state(unet_lora_rank=4), str(weights))
    elif kind == "missing tensor":
        save_file({k: v for k, v in state.items() if k != LORA_A}, str(weights))
    elif kind == "extra tensor":
        save_file({**state, "unet.conv_in.extra": torch.zeros(3)}, str(weights))
    elif kind == "NaN values":
        save_file({**state, LORA_A: torch.full_like(state[LORA_A], float("nan"))}, str(weights))
    else:
        raise AssertionError(kind)


WEIGHT_BREAKS = {
    "truncated": "cannot read weights: truncated or not a safetensors file",
    "a pickle named .safetensors": "cannot read weights: truncated or not a safetensors file",
    "other LoRA rank": ".lora_A.default.weight' has shape (4, 16), this policy expects (2, 16)",
    "missing tensor": f"tensor(s) '{LORA_A}' of this policy are missing",
    "extra tensor": "tensor(s) 'unet.conv_in.extra' are not in this policy",
    "NaN values": f"tensor '{LORA_A}' holds NaN or inf values",
}


@pytest.mark.parametrize("kind", list(WEIGHT_BREAKS))
def test_generate_refuses_a_damaged_checkpoint_naming_the_file(ralign_cli, tmp_path, kind):
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    _break_weights(kind, checkpoint)
    out = tmp_path / "out"
    line = ralign_cli("generate", "--checkpoint", checkpoint, "--prompt", "a red circle", "--out", out).one_line_error()
    assert f"{checkpoint}/trainable.safetensors: " in line and WEIGHT_BREAKS[kind] in line, line
    assert not out.exists()


STATE_BREAKS = {
    "not JSON": ('{"version": 1, "policy_spec": ', "learner_state.json: not valid JSON (line 1"),
    "not an object": ("[1, 2]", "learner_state.json: expected a JSON object, got list"),
    "unknown setting": (json.dumps({"version": 1, "policy_spec": policy_spec(lora_rnk=2)}), "policy_spec.policy has unknown setting(s) ['lora_rnk']"),
    "no policy spec": (json.dumps({"version": 1}), "has no policy_spec"),
    "model gone": (json.dumps({"version": 1, "policy_spec": {**policy_spec(), "pipeline": "/nowhere/sd15"}}), "'/nowhere/sd15': no such directory"),
}


@pytest.mark.parametrize("kind", list(STATE_BREAKS))
def test_generate_refuses_a_broken_learner_state(ralign_cli, tmp_path, kind):
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    text, needle = STATE_BREAKS[kind]
    (checkpoint / "learner_state.json").write_text(text)
    out = tmp_path / "out"
    line = ralign_cli("generate", "--checkpoint", checkpoint, "--prompt", "a red circle", "--out", out).one_line_error()
    assert needle in line, line
    assert not out.exists()
    (checkpoint / "learner_state.json").unlink()
    line = ralign_cli("generate", "--checkpoint", checkpoint, "--prompt", "a red circle", "--out", out).one_line_error()
    assert "is not a ralign checkpoint: learner_state.json is missing" in line


def test_mixing_a_mismatched_text_encoder_is_refused(ralign_cli, tmp_path):
    full = {"unet_lora_rank": 0, "text_encoder": "full"}
    a = write_checkpoint(tmp_path / "a", policy_spec(**full))
    b = write_checkpoint(tmp_path / "b", policy_spec(**full))
    key = "text_encoder.embeddings.token_embedding.weight"
    state = _read(b / "trainable.safetensors")
    save_file({**state, key: torch.zeros(7, state[key].shape[1])}, str(b / "trainable.safetensors"))
    out = tmp_path / "out"
    line = ralign_cli("generate", "--checkpoint", a, "--mix", f"{b}=0.5", "--prompt", "a red circle", "--out", out).one_line_error()
    assert f"{b}/trainable.safetensors: tensor 'embeddings.token_embedding.weight' has shape (7, 32), this text encoder expects" in line
    save_file({k: v for k, v in state.items() if k != key}, str(b / "trainable.safetensors"))
    line = ralign_cli("generate", "--checkpoint", a, "--mix", f"{b}=0.5", "--prompt", "a red circle", "--out", out).one_line_error()
    assert "'embeddings.token_embedding.weight' of this text encoder are missing" in line
    _truncate(b / "trainable.safetensors")
    line = ralign_cli("generate", "--checkpoint", a, "--mix", f"{b}=0.5", "--prompt", "a red circle", "--out", out).one_line_error()
    assert f"{b}/trainable.safetensors: cannot read weights" in line
    assert "the weight 'half' is not a number" in ralign_cli("generate", "--checkpoint", a, "--mix", f"{b}=half",
                                                               "--prompt", "x", "--out", out).one_line_error()
    assert not out.exists()


def test_checkpoint_from_mlflow_is_named_by_its_uri(ralign_cli, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("faults", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    checkpoint = write_checkpoint(tmp_path / "checkpoint")
    _break_weights("truncated", checkpoint)
    client.log_artifacts(run_id, str(checkpoint), "checkpoint")
    client.set_terminated(run_id)
    out = tmp_path / "out"
    line = ralign_cli("generate", "--checkpoint", f"runs:/{run_id}/checkpoint", "--tracking-uri", uri, "--prompt", "a red circle",
                      "--out", out).one_line_error()
    assert f"runs:/{run_id}/checkpoint/trainable.safetensors: cannot read weights: truncated" in line, line
    assert not out.exists()


def test_init_checkpoint_must_fit_but_may_cover_part_of_the_policy(tmp_path):
    stage = write_checkpoint(tmp_path / "stage1", state=_state(unet_lora_rank=4))
    with pytest.raises(CheckpointError, match=r"stage1/trainable.safetensors: tensor '.*' has shape \(4, 16\), this policy expects \(2, 16\)"):
        build_policy({**policy_spec(), "init_checkpoint": str(stage)})
    # A later stage may train more than the one it starts from: what the file lacks starts fresh.
    partial = {k: v for k, v in _state().items() if k != LORA_A}
    write_checkpoint(tmp_path / "partial", state=partial)
    policy = build_policy({**policy_spec(), "init_checkpoint": str(tmp_path / "partial")})
    assert all(torch.equal(policy.trainable_state()[k], v) for k, v in partial.items())


# ---------------------------------------------------------------------------------------------- pipelines and models


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    from ralign.models.toy_t2i import tiny_random_pipeline

    root = tmp_path_factory.mktemp("pipeline") / "sd"
    tiny_random_pipeline().save_pretrained(root)
    return root


UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("kind, needle", [
    ("missing", f"{UNET}: tensor(s) 'conv_in.bias' missing"),
    ("extra", f"{UNET}: tensor(s) 'conv_in.extra' not part of the model"),
    ("shape", "conv_in.bias expected shape"),
    ("truncated", "Unable to load weights from checkpoint file for '"),
])
def test_a_damaged_pipeline_directory_is_one_line(saved_pipeline, tmp_path, kind, needle):
    root = tmp_path / "sd"
    shutil.copytree(saved_pipeline, root)
    weights = root / UNET
    state = _read(weights)
    if kind == "missing":
        state.pop("conv_in.bias")
    elif kind == "extra":
        state["conv_in.extra"] = torch.zeros(2)
    elif kind == "shape":
        state["conv_in.bias"] = torch.zeros(3)
    if kind == "truncated":
        _truncate(weights)
    else:
        save_file(state, str(weights))
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(root))
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_eval_of_a_damaged_pipeline_writes_nothing(ralign_cli, saved_pipeline, tmp_path):
    root = tmp_path / "sd"
    shutil.copytree(saved_pipeline, root)
    state = _read(root / UNET)
    state.pop("conv_in.bias")
    save_file(state, str(root / UNET))
    line = ralign_cli("eval", "--pipeline", root, "--n", "1", "--steps", "1", "--json", tmp_path / "eval.json").one_line_error()
    assert f"{root / UNET}: tensor(s) 'conv_in.bias' missing" in line
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "eval_grids").exists()


@pytest.mark.parametrize("model", ["reward_clip", "preference"])
@pytest.mark.parametrize("kind, needle", [
    ("shape", "model.safetensors: tensor 'logit_scale' has shape (2,), the model expects ()"),
    ("missing", "model.safetensors: tensor(s) 'logit_scale' of the model are missing"),
    ("extra", "model.safetensors: tensor(s) 'surplus' are not in the model"),
])
def test_reward_models_refuse_mismatched_weights(tmp_path, model, kind, needle):
    from ralign.models import reward_clip as rc

    directory = tmp_path / model
    shutil.copytree(TOY_MODELS_DIR / model, directory)
    state = _read(directory / rc.WEIGHTS)
    if kind == "shape":
        state["logit_scale"] = torch.zeros(2)
    elif kind == "missing":
        state.pop("logit_scale")
    else:
        state["surplus"] = torch.zeros(1)
    save_file(state, str(directory / rc.WEIGHTS))
    with pytest.raises(CheckpointError) as err:
        rc.load_reward_clip(directory)
    assert f"{directory}/{needle}" in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("model", ["captioner", "segmenter"])
def test_captioner_and_segmenter_refuse_damaged_weights(tmp_path, model):
    from ralign.models.captioner import load_captioner
    from ralign.models.segmenter import load_segmenter

    load = {"captioner": load_captioner, "segmenter": load_segmenter}[model]
    directory = tmp_path / model
    shutil.copytree(TOY_MODELS_DIR / model, directory)
    weights = directory / "model.safetensors"
    state = _read(weights)
    dropped = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, str(weights))
    with pytest.raises(CheckpointError, match=rf"^{directory}: tensor\(s\) '{dropped}' missing \(a damaged file"):
        load(directory)
    _truncate(weights)
    with pytest.raises(CheckpointError, match=rf"^{directory}: cannot load \w+: Error while deserializing header"):
        load(directory)


def test_discriminator_state_must_match_the_discriminator(tmp_path):
    from ralign.rewards.fidelity import STATE_FILE
    from ralign.rewards.registry import build_reward

    build_reward({"name": "fidelity", "lora_rank": 2}).save_state(tmp_path)
    wider = build_reward({"name": "fidelity", "lora_rank": 4})
    with pytest.raises(CheckpointError, match=rf"{STATE_FILE}: tensor '.*lora_A.*' has shape \(2, \d+\), the discriminator expects \(4, \d+\)"):
        wider.load_state(tmp_path)
    _truncate(tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match=rf"{STATE_FILE}: cannot read weights: truncated"):
        wider.load_state(tmp_path)
