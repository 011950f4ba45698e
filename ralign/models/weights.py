"""Reading weights safely, with one-line errors that name the file and the problem.

Weights are read from safetensors only: a safetensors file is a JSON header plus raw tensor bytes, and reading it
runs no code. Learner checkpoints add one unavoidable pickle (DeepSpeed's engine state); its guards are in
ralign/training/checkpoint.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from ralign.config import UserError

_MAX_LISTED = 3


class CheckpointError(UserError):
    """A weights or checkpoint file that cannot be used; one line naming the file and what is wrong with it."""


def _listing(names) -> str:
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return shown + (f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_safetensors(path: str | Path, label: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; `label` is how the file is named in errors (default: its path)."""
    path = Path(path)
    label = label or str(path)
    if not path.is_file():
        raise CheckpointError(f"{label}: missing")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        # safetensors reports a short or garbled header as a deserialisation error of its own type.
        raise CheckpointError(f"{label}: cannot read weights: truncated or not a safetensors file ({first_line(exc)})") from None


def read_json(path: str | Path, label: str | None = None) -> dict:
    path = Path(path)
    label = label or str(path)
    if not path.is_file():
        raise CheckpointError(f"{label}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{label}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{label}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{label}: expected a JSON object, got {type(data).__name__}")
    return data


def check_fits(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size | tuple], label: str,
               complete: bool, finite: bool = True, what: str = "the model") -> None:
    """Refuse `state` unless every tensor is one `expected` names, with its shape (and, with `complete`, every
    expected tensor is there; with `finite`, no value is NaN/inf)."""
    unknown = [k for k in state if k not in expected]
    if unknown:
        raise CheckpointError(f"{label}: tensor(s) {_listing(unknown)} are not in {what} (written for other model or "
                              "policy settings?)")
    for key, value in state.items():
        want = tuple(expected[key])
        if tuple(value.shape) != want:
            raise CheckpointError(f"{label}: tensor '{key}' has shape {tuple(value.shape)}, {what} expects {want}")
    if complete:
        missing = [k for k in expected if k not in state]
        if missing:
            raise CheckpointError(f"{label}: tensor(s) {_listing(missing)} of {what} are missing (an incomplete or "
                                  "mismatched file)")
    if finite:
        for key, value in state.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{label}: tensor '{key}' holds NaN or inf values")


# ------------------------------------------------------------------------------------------ transformers models


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """diffusers' and transformers' per-file loading bars: a screenful of noise in a command's output (around its
    one-line answer) and in every actor's log, for loads that take a second."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    restore = [m for m in (diffusers_logging, transformers_logging) if m.is_progress_bar_enabled()]
    for m in restore:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m in restore:
            m.enable_progress_bar()


def load_pretrained(model_cls, path: str | Path, strict: bool = True):
    """`model_cls.from_pretrained(path)` from safetensors only, as one CheckpointError naming the directory when the
    files are unreadable or, with `strict`, when the files lack tensors of the model or hold tensors it does not have
    (transformers only warns about those, leaving the missing ones at their random initialisation)."""
    from safetensors import SafetensorError

    try:
        with no_progress_bars():
            model, info = model_cls.from_pretrained(str(path), use_safetensors=True, output_loading_info=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot load {model_cls.__name__}: {first_line(exc)}") from None
    if strict:
        for key, problem in (("missing_keys", "missing"), ("unexpected_keys", "not part of the model"),
                             ("mismatched_keys", "of another shape than the model's")):
            names = [k if isinstance(k, str) else k[0] for k in info.get(key) or ()]
            if names:
                raise CheckpointError(f"{path}: tensor(s) {_listing(names)} {problem} (a damaged file, or weights of another model)")
    return model.eval()


def directories_read(constructor, options: Mapping) -> list[Path]:
    """The model directories a constructor reads with these options: every parameter whose given value (or default)
    names an existing directory. Rewards and segmenters take their weights as such path parameters."""
    import inspect

    found = []
    for name, parameter in inspect.signature(constructor).parameters.items():
        value = options.get(name, parameter.default)
        if isinstance(value, (str, Path)) and str(value) and Path(value).expanduser().is_dir():
            found.append(Path(value).expanduser().resolve())
    return found


def weights_fingerprint(directory: str | Path) -> str:
    """A short digest of a model directory's weights and configs (every safetensors and JSON file under it), so a
    result can say which weights it was measured with and a later change to them is noticed."""
    import hashlib

    root = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
        digest.update(path.relative_to(root).as_posix().encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]
