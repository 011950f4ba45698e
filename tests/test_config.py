"""Config loading: unknown keys, wrong types and bad YAML are one-line errors naming the key."""

from __future__ import annotations

import pytest

from ralign.config import ConfigError, StrictModel, apply_overrides, load_config, parse_config


class Optim(StrictModel):
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


class Demo(StrictModel):
    name: str = "demo"
    iterations: int = 10
    optim: Optim = Optim()


def test_valid_file_and_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\noptim:\n  lr: 0.01\n")
    cfg = load_config(Demo, path, overrides=["iterations=3", "optim.betas=[0.5, 0.6]"])
    assert (cfg.name, cfg.iterations, cfg.optim.lr, cfg.optim.betas) == ("x", 3, 0.01, (0.5, 0.6))


@pytest.mark.parametrize(
    "text, needle",
    [
        ("iteratons: 3\n", "unknown key 'iteratons'"),
        ("optim:\n  lr: fast\n", "'optim.lr'"),
        ("iterations: [1, 2]\n", "'iterations'"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("name: [unclosed\n", "invalid YAML at line"),
    ],
)
def test_bad_config_is_one_line_naming_the_problem(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(Demo, path)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message
    assert str(path) in message


def test_override_errors():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["iterations"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])
    with pytest.raises(ConfigError, match="unknown key 'optim.momentum'"):
        parse_config(Demo, {}, overrides=["optim.momentum=0.9"])


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Demo, tmp_path / "nope.yaml")
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(Demo, bad)


def test_every_shipped_training_config_validates():
    from pathlib import Path

    from ralign.config import load_config
    from ralign.training.config import TrainConfig

    configs = sorted((Path(__file__).resolve().parent.parent / "jobs" / "configs").glob("*.yaml"))
    assert {"quickstart.yaml", "dpok.yaml", "refl.yaml", "draft.yaml", "alignprop.yaml"} <= {c.name for c in configs}
    from ralign.training.config import SFTConfig

    for path in configs:
        if path.name.startswith("serve"):
            continue
        if path.stem.endswith("_sft"):  # supervised stages (`ralign sft`)
            assert load_config(SFTConfig, path).steps >= 1
            continue
        cfg = load_config(TrainConfig, path)
        assert cfg.train.iterations >= 1


def test_impossible_training_combinations_are_one_line_errors():
    import pytest

    from ralign.config import ConfigError, parse_config
    from ralign.training.config import TrainConfig

    cases = {
        "refl late-step window": {"algorithm": {"name": "refl", "refl": {"late_step_max": 50}}},
        "nothing to train": {"model": {"policy": {"unet_lora_rank": 0}}},
        "need ray.request_batch=3": {"algorithm": {"name": "draft"}, "ray": {"request_batch": 3}, "train": {"batch_size": 8, "micro_batch": 2}},
        "algorithm.name": {"algorithm": {"name": "ppo"}},
    }
    for needle, data in cases.items():
        with pytest.raises(ConfigError) as err:
            parse_config(TrainConfig, data)
        assert needle in str(err.value) and "\n" not in str(err.value)


def test_credentials_in_the_tracking_uri_are_refused_and_never_echoed():
    from ralign.training.config import TrainConfig

    with pytest.raises(ConfigError) as info:
        parse_config(TrainConfig, {"tracking": {"tracking_uri": "https://bob:s3cret@mlflow.example:5000"}})
    assert "MLFLOW_TRACKING_PASSWORD" in str(info.value) and "s3cret" not in str(info.value)
    assert parse_config(TrainConfig, {"tracking": {"tracking_uri": "https://mlflow.example:5000"}}).tracking.tracking_uri
