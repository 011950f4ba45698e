"""Bad configs through the command line: each is refused with exit code 2 and one stderr line naming the file (or
option) and the problem, before anything is started or written.

Already covered elsewhere, not repeated here: the loader's rules in-process (tests/test_config.py), four `ralign
train` refusals in a subprocess (tests/test_train_job.py::test_train_rejects_bad_configs_in_one_line), `ralign k8s
render` with a bad config (tests/test_k8s.py::test_cli_bad_config_is_a_one_line_error). Here: the other ways a file
can be wrong, the impossible combinations the training config rejects, and the other verbs that read configs.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from .cli_runs import REPO, ralign_process, tree

QUICKSTART = (REPO / "jobs" / "configs" / "quickstart.yaml").read_text()

# (file content, --set overrides, what the one line must say)
TRAIN_CASES = {
    "unknown key": ("train:\n  iteratons: 3\n", [], "unknown key 'train.iteratons'"),
    "unknown section": ("trian: {iterations: 3}\n", [], "unknown key 'trian'"),
    "wrong type": ("train:\n  batch_size: eight\n", [], "'train.batch_size'"),
    "list for a number": ("train:\n  lr: [0.1]\n", [], "'train.lr'"),
    "invalid YAML": ("train: {iterations: 3\n", [], "invalid YAML at line"),
    "not a mapping": ("- dpok\n- refl\n", [], "top level must be a mapping"),
    "bad --set": ("{}\n", ["train.iterations"], "expected KEY=VALUE"),
    "--set into a value": ("train: {lr: 0.1}\n", ["train.lr.x=1"], "'lr' is a value, not a section"),
    "refl window outside the chain": ("algorithm: {name: refl, refl: {late_step_max: 50}}\n", [], "must lie inside model.policy.steps=20"),
    "draft longer than the chain": ("algorithm: {name: draft, backprop: {k: 30}}\n", [], "algorithm.backprop.k=30 is longer than model.policy.steps=20"),
    "alignprop longer than the chain": ("algorithm: {name: alignprop, backprop: {k: 21}}\n", [], "algorithm.backprop.k=21 is longer than model.policy.steps=20"),
    "grpo trains no step": ("algorithm: {name: grpo, grpo: {group_size: 2, skip_last_steps: 20}}\n", [], "algorithm.grpo.skip_last_steps=20 leaves no step"),
    "attention reward with dpok": ("reward: {name: grounded_attention}\n", [], "algorithm.name=dpok cannot use them"),
    "attention reward with segments": ("algorithm: {name: interval}\nreward: {name: grounded_attention}\n"
                                       "model: {policy: {text_encoding: segment}}\n", [], "needs model.policy.text_encoding=plain"),
    "interpolating a frozen encoder": ("model: {policy: {text_encoder_weight: 0.5}}\n", [], "text_encoder=frozen has none"),
    "nothing to train": ("model: {policy: {unet_lora_rank: 0}}\n", [], "nothing to train"),
    "request straddles micro-batches": ("algorithm: {name: draft}\nray: {request_batch: 3}\ntrain: {batch_size: 8, micro_batch: 2}\n", [],
                                        "need ray.request_batch=3"),
    "unknown reward term": ("reward: {name: weighted, options: {terms: [{name: nope, weight: 1}]}}\n", [], "unknown reward 'nope'"),
    "credentials in the tracking URI": ("tracking: {tracking_uri: 'https://bob:hunter2@mlflow.example'}\n", [], "MLFLOW_TRACKING_PASSWORD"),
}


def _write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def _refused_without_writes(ralign_cli, tmp_path, monkeypatch, args: Sequence[str], needle: str, name_file: bool = True) -> str:
    monkeypatch.chdir(tmp_path)  # the default MLflow store and Ray storage would land here
    before = tree(tmp_path)
    line = ralign_cli(*args).one_line_error()
    assert needle in line, line
    if name_file:
        assert "config.yaml" in line, line
    assert tree(tmp_path) == before  # no MLflow store, no Ray storage, no output
    return line


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_refuses_a_bad_config_in_one_line(ralign_cli, tmp_path, monkeypatch, case):
    text, overrides, needle = TRAIN_CASES[case]
    config = _write(tmp_path, text)
    args = ["train", "--config", config, *[a for o in overrides for a in ("--set", o)]]
    line = _refused_without_writes(ralign_cli, tmp_path, monkeypatch, args, needle, name_file=not overrides)
    assert "hunter2" not in line  # a refused credential is never repeated


def test_train_refuses_a_non_utf8_or_missing_config(ralign_cli, tmp_path, monkeypatch):
    config = tmp_path / "config.yaml"
    config.write_bytes(b"train:\n  iterations: \xff\xfe\n")
    _refused_without_writes(ralign_cli, tmp_path, monkeypatch, ["train", "--config", config], "not UTF-8")
    _refused_without_writes(ralign_cli, tmp_path, monkeypatch, ["train", "--config", tmp_path / "nowhere.yaml"],
                            "nowhere.yaml: config file not found", name_file=False)


def test_gradient_algorithm_with_a_non_differentiable_reward_is_refused(ralign_cli, tmp_path, monkeypatch):
    """No built-in reward is non-differentiable, but `ralign.rewards.registry.register` takes any: a JPEG-size
    reward (a black box to autograd) is the classic one, and ReFL cannot backpropagate through it."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from ralign.rewards import registry
    from ralign.rewards.base import Reward, RewardOutput

    class JpegCompressibility(Reward):
        name, differentiable = "jpeg_compressibility", False

        def __init__(self, device: str = "cpu"):
            self.device = device

        def __call__(self, images: torch.Tensor, prompts, **_) -> RewardOutput:
            sizes = []
            for img in (images.clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).cpu().numpy():
                buf = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=95)
                sizes.append(-buf.tell() / 1000.0)
            return RewardOutput(torch.tensor(sizes), {})

    monkeypatch.setitem(registry._BUILDERS, "jpeg_compressibility", JpegCompressibility)
    config = _write(tmp_path, "algorithm: {name: refl}\nreward: {name: jpeg_compressibility}\n")
    _refused_without_writes(ralign_cli, tmp_path, monkeypatch, ["train", "--config", config],
                            "algorithm.name=refl needs a differentiable reward; reward.name=jpeg_compressibility is not")
    # The same reward is fine where no gradient flows through it.
    score = JpegCompressibility()(torch.rand(2, 3, 16, 16), ["", ""]).score
    assert score.shape == (2,) and (score < 0).all()


def test_tracking_uri_option_with_credentials_is_refused_and_not_echoed(ralign_cli, tmp_path, monkeypatch):
    config = _write(tmp_path, QUICKSTART)
    for uri in ("https://bob:hunter2@mlflow.example", "https://hunter2token@mlflow.example"):
        outcome = ralign_cli("train", "--config", config, "--tracking-uri", uri)
        line = outcome.one_line_error()
        assert "--tracking-uri https://***@mlflow.example: holds credentials" in line, line
        assert "hunter2" not in outcome.err + outcome.out
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("verb, text, needle", [
    ("sft", "stepz: 3\n", "unknown key 'stepz'"),
    ("sft", "steps: many\n", "'steps'"),
    ("serve", "deployments: [{name: x, reward: {name: preference}, autoscaling: {min_replicas: 3, max_replicas: 1}}]\n",
     "autoscaling.min_replicas=3 exceeds autoscaling.max_replicas=1"),
    ("serve", "http: {port: http}\n", "'http.port'"),
])
def test_other_verbs_refuse_a_bad_config_in_one_line(ralign_cli, tmp_path, monkeypatch, verb, text, needle):
    config = _write(tmp_path, text)
    _refused_without_writes(ralign_cli, tmp_path, monkeypatch, [verb, "--config", config], needle)


def test_submit_validates_the_config_before_contacting_the_cluster(ralign_cli, tmp_path, monkeypatch):
    # Nothing listens on port 9: a config error must come first, and nothing is shipped.
    config = _write(tmp_path, "ray: {samplerz: 2}\n")
    _refused_without_writes(ralign_cli, tmp_path, monkeypatch,
                            ["submit", "--address", "http://127.0.0.1:9", "--config", config], "unknown key 'ray.samplerz'")
    line = ralign_cli("submit", "--address", "http://127.0.0.1:9", "--config", REPO / "jobs/configs/quickstart.yaml",
                      "--tracking-uri", "https://bob:hunter2@mlflow.example").one_line_error()
    assert "holds credentials" in line and "hunter2" not in line


def test_a_real_process_exits_2_with_one_line(tmp_path):
    """The in-process runs above use the console script's function; this is the same refusal from a fresh
    interpreter, where nothing (logging set-up, warnings at import) can hide behind pytest's capture."""
    config = _write(tmp_path, "algorithm: {name: alignprop, backprop: {k: 99, chekpointing: false}}\n")
    outcome = ralign_process("train", "--config", config, cwd=tmp_path)
    assert "config.yaml: unknown key 'algorithm.backprop.chekpointing'" in outcome.one_line_error()
    assert tree(tmp_path) == ["config.yaml"]
