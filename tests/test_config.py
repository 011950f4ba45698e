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
