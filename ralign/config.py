"""YAML configs validated by pydantic, with one-line errors that name the offending key.

Every config model forbids unknown keys, so a typo (`lerning_rate`) is an error rather than a silently ignored
setting. `--set a.b=value` overrides are parsed as YAML scalars and validated exactly like the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ralign.ops.credentials import has_credentials, redact_credentials

T = TypeVar("T", bound=BaseModel)


class UserError(ValueError):
    """Something the user can fix (a config, an input, a path, a checkpoint), phrased for a person in one line: the
    CLI prints it as `error: ...` with exit code 2. Anything else is a bug and shows its traceback."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or directory the user named (or a stage should have written) is not there."""


class ConfigError(UserError):
    """A config problem, phrased for a person: one line, naming the key."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def refuse_credentials(uri: str, where: str) -> str:
    """`uri` unchanged, or a ConfigError if it carries a `user:password@` or `token@` part: whatever takes it may log
    it, record it in MLflow or put it on a Ray job's command line. The message never repeats the credential."""
    if has_credentials(uri):
        raise ConfigError(f"{where} {redact_credentials(uri)}: holds credentials; set MLFLOW_TRACKING_USERNAME / "
                          "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead")
    return uri


def _format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        elif e["type"] == "value_error" and not e["loc"]:
            # A cross-field check (model validator): its message already names the keys involved.
            parts.append(str(e["msg"]).removeprefix("Value error, "))
        elif e["type"] == "missing":
            parts.append(f"missing key '{key}'")
        else:
            parts.append(f"'{key}': {e['msg']} (got {redact_credentials(repr(e.get('input')))})")
    return f"{source}: " + "; ".join(parts)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested dict; values are YAML scalars (`3`, `1e-4`, `true`, `[1, 2]`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.iterations=10")
        dotted, raw = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc.__class__.__name__})") from None
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{k}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


def parse_config(model: type[T], data: dict[str, Any] | None, source: str = "config", overrides: list[str] | None = None) -> T:
    data = apply_overrides(dict(data or {}), overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(model: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return parse_config(model, data, source=str(path), overrides=overrides)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
