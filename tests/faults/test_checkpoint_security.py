"""Weights load only from safetensors; the one pickle the project cannot avoid (DeepSpeed's engine state, read back
when a learner resumes) is checked against the manifest its save wrote and unpickled with weights_only=True.
ralign/models/weights.py explains the two guards and what each does and does not stop."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from ralign.models.weights import CheckpointError
from ralign.training.checkpoint import MANIFEST_GLOB, verify_manifest, write_manifest
from ralign.config import parse_config
from ralign.rollout.batch import Prefixes
from ralign.training.learner import Learner
from ralign.diffusion.policy import build_policy
from ralign.rewards.colorfulness import ColorfulnessReward
from ralign.training.config import TrainConfig

from .cli_runs import REPO

PROJECT_CODE = ("ralign", "actors", "jobs")
PROMPTS, SEEDS = ["a red circle", "two blue squares"], [1, 2]


# ------------------------------------------------------------------------------------------------ source scan


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


WEIGHTLESS_LOADERS = ("Tokenizer", "Processor", "Config", "Scheduler")  # their from_pretrained reads no tensors


def unsafe_loads(source: str, filename: str) -> list[str]:
    """Calls in `source` that could unpickle: torch.load without weights_only=True, pickle / cloudpickle / dill /
    joblib loads, numpy loads allowing pickles, yaml.load without a safe loader, and a model's from_pretrained
    without use_safetensors=True (it would fall back to a pickled .bin file)."""
    found = []
    for call in _calls(ast.parse(source, filename)):
        name = _dotted(call.func)
        where = f"{filename}:{call.lineno}: {name}"
        if name.endswith("torch.load"):
            if not _keyword_is_true(call, "weights_only"):
                found.append(f"{where} without weights_only=True")
        elif name.split(".")[0] in ("pickle", "cloudpickle", "dill", "joblib", "_pickle") and name.split(".")[-1] in ("load", "loads", "Unpickler"):
            found.append(f"{where} unpickles")
        elif name in ("np.load", "numpy.load") and _keyword_is_true(call, "allow_pickle"):
            found.append(f"{where} with allow_pickle=True")
        elif name == "yaml.load" and not any(k.arg == "Loader" and "SafeLoader" in ast.unparse(k.value) for k in call.keywords):
            found.append(f"{where} without a safe loader")
        elif name.endswith(".from_pretrained") and not name.split(".")[-2].endswith(WEIGHTLESS_LOADERS):
            if not _keyword_is_true(call, "use_safetensors"):
                found.append(f"{where} without use_safetensors=True")
    return found


def test_project_code_never_unpickles():
    files = [p for d in PROJECT_CODE for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 40  # the scan saw the project, not an empty directory
    problems = [msg for p in files for msg in unsafe_loads(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    assert problems == []


def test_the_scan_finds_each_kind_of_unsafe_load():
    source = "\n".join([
        "import pickle, torch, numpy as np, yaml",
        "torch.load(f)",
        "torch.load(f, weights_only=False)",
        "torch.load(f, weights_only=True)",  # fine
        "pickle.loads(b)",
        "np.load(f, allow_pickle=True)",
        "yaml.load(text)",
        "yaml.load(text, Loader=yaml.SafeLoader)",  # fine
        "CLIPModel.from_pretrained(path)",
        "CLIPModel.from_pretrained(path, use_safetensors=True)",  # fine
        "AutoTokenizer.from_pretrained(path)",  # fine: no tensors
    ])
    found = unsafe_loads(source, "x.py")
    assert [f.split(":")[1] for f in found] == ["2", "3", "5", "6", "7", "9"], found


# ------------------------------------------------------------------------------- the learner's checkpoint on resume


def _cfg(zero_stage: int = 2) -> TrainConfig:
    return parse_config(TrainConfig, {
        "model": {"pipeline": "tiny-random", "policy": {"unet_lora_rank": 2, "steps": 2}},
        "algorithm": {"name": "draft", "backprop": {"k": 1}},
        "reward": {"name": "colorfulness"},
        "train": {"batch_size": 2, "micro_batch": 2},
        "ray": {"request_batch": 2},
        "deepspeed": {"zero_stage": zero_stage},
    })


def _trained_learner(zero_stage: int = 2) -> Learner:
    cfg = _cfg(zero_stage)
    torch.manual_seed(0)
    learner = Learner(cfg, build_policy(cfg.policy_spec()), ColorfulnessReward())
    learner.update(Prefixes.from_prompts(PROMPTS, SEEDS))  # so that the optimiser has moments to save
    return learner


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A learner and the checkpoint it saved (each test works on its own copy of the directory)."""
    learner = _trained_learner()
    directory = tmp_path_factory.mktemp("checkpoint")
    learner.save(directory, extra={"next_id": 4})
    return learner, directory


def _copy(directory: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "checkpoint"
    shutil.copytree(directory, target)
    return target


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_every_zero_stage_resumes_through_the_guards(tmp_path, zero_stage):
    """The allow-list of DeepSpeed classes is enough for what each ZeRO stage writes (else resume would fail)."""
    learner = _trained_learner(zero_stage)
    learner.save(tmp_path, extra={"next_id": 4})
    assert [p.name for p in tmp_path.glob(MANIFEST_GLOB)] == ["checkpoint_manifest.rank0.json"]
    saved_weights = {k: v.clone() for k, v in learner.trainable_state().items()}
    # Restoring weights exactly is tests/test_learner.py's round trip; here the point is that the guarded load goes
    # through (a second update to move away first costs ZeRO-3 seconds for nothing).
    learner.iteration, learner.policy.version = 7, 7
    record = learner.load(tmp_path)
    assert record["next_id"] == 4 and learner.iteration == 1 and learner.policy.version == 1
    assert all(torch.equal(saved_weights[k], v) for k, v in learner.trainable_state().items())


TAMPERING = {
    "a flipped byte in the optimiser state": (lambda d: _flip(next((d / "engine").glob("*optim_states.pt"))), "sha256 differs"),
    "truncated model states": (lambda d: _cut(d / "engine" / "mp_rank_00_model_states.pt"), "(truncated or replaced)"),
    "edited learner state": (lambda d: _edit_json(d / "learner_state.json"), "learner_state.json: "),
    "swapped weights": (lambda d: _flip(d / "trainable.safetensors"), "trainable.safetensors: sha256 differs"),
    "a file slipped in": (lambda d: (d / "engine" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x"),
                          "zero_pp_rank_1_mp_rank_00_optim_states.pt: not in the checkpoint manifest"),
    "a file removed": (lambda d: (d / "latest").unlink(), "latest: listed in the checkpoint manifest but missing"),
    "no manifest": (lambda d: [p.unlink() for p in d.glob(MANIFEST_GLOB)], "no checkpoint_manifest.rank<N>.json"),
}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _edit_json(path: Path) -> None:
    record = json.loads(path.read_text())
    record["version"] += 1
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("case", list(TAMPERING))
def test_a_tampered_checkpoint_is_refused_before_anything_is_read(saved, tmp_path, case):
    learner, original = saved
    directory = _copy(original, tmp_path)
    tamper, needle = TAMPERING[case]
    tamper(directory)
    version_before = learner.policy.version
    with pytest.raises(CheckpointError) as err:
        learner.load(directory)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert learner.policy.version == version_before  # refused before any state was restored


class _Payload:
    """What a poisoned engine file carries: unpickling it calls a function of the attacker's choice (here one that
    creates a marker file; os.system would do as well)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_code_carrying_engine_file_is_not_unpickled_even_with_a_forged_manifest(saved, tmp_path):
    learner, original = saved
    directory = _copy(original, tmp_path)
    marker = tmp_path / "pwned"
    model_states = directory / "engine" / "mp_rank_00_model_states.pt"
    torch.save({"module": _Payload(marker)}, model_states)
    with pytest.raises(CheckpointError, match="manifest"):
        learner.load(directory)
    # Someone able to write the checkpoint can rewrite its manifest too; the unpickler is the last line.
    write_manifest(directory, 0)
    with pytest.raises(CheckpointError) as err:
        learner.load(directory)
    message = str(err.value)
    assert "mp_rank_00_model_states.pt: refused to unpickle" in message and "\n" not in message, message
    assert not marker.exists()
    # The same file loaded the way DeepSpeed 0.19 loads it would have run the payload: the guard is what stopped it.
    torch.load(model_states, weights_only=False)
    assert marker.exists()


def test_manifest_round_trip_and_ray_bookkeeping(tmp_path):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "a.pt").write_bytes(b"abc")
    (tmp_path / "trainable.safetensors").write_bytes(b"def")
    write_manifest(tmp_path, 0)
    (tmp_path / ".metadata.json").write_text("{}")  # Ray Train's own file in a checkpoint directory
    assert verify_manifest(tmp_path) == 2
    (tmp_path / "engine" / ".hidden").write_text("x")  # hidden files elsewhere are not Ray's
    with pytest.raises(CheckpointError, match=r"engine/.hidden: not in the checkpoint manifest"):
        verify_manifest(tmp_path)
