"""Reading weights and checkpoints safely, with one-line errors that name the file and the problem.

Weights are read from safetensors only: a safetensors file is a JSON header plus raw tensor bytes, and reading it
runs no code. The one place a pickle cannot be avoided is DeepSpeed's engine state (optimiser moments, ZeRO
partitions: `engine/*.pt`, written with `torch.save`), which `Learner.load` reads back when a run resumes from its
checkpoint in the Ray storage path. DeepSpeed 0.19's `TorchCheckpointEngine.load` calls `torch.load(...,
weights_only=False)`, which would run any code a doctored file carries. Two guards, both applied by `Learner.load`:

- `verify_manifest`: every learner rank's `Learner.save` ends by writing `checkpoint_manifest.rank<N>.json`, the
  sha256 and size of every file that rank wrote. Before anything is read, every listed file must be present with
  that hash, and no unlisted file may sit where a loader looks. This catches truncation, corruption, a swapped or an
  added file. It is not a signature: someone who can rewrite the files can rewrite the manifest beside them too.
- `weights_only_engine_loads`: DeepSpeed's checkpoint engine loads with `weights_only=True` and an allow-list of the
  few DeepSpeed classes its files hold (loss scaler, ZeRO stage enum, fragment addresses), so even a file whose
  manifest was forged cannot make the unpickler call anything else.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

MANIFEST_PREFIX = "checkpoint_manifest.rank"
MANIFEST_GLOB = f"{MANIFEST_PREFIX}*.json"
# The DeepSpeed classes its engine files hold: what ZeRO stages 0-3 write in fp32 (tests/faults/
# test_checkpoint_security.py resumes each), plus DynamicLossScaler, which fp16 runs save instead of LossScaler (read
# from DeepSpeed's source; no GPU here to write one). A class missing from this list fails a resume with "refused to
# unpickle: ... GLOBAL <class>", never silently.
DEEPSPEED_PICKLE_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_MAX_LISTED = 3


class CheckpointError(ValueError):
    """A weights or checkpoint file that cannot be used; one line naming the file and what is wrong with it."""


def _listing(names) -> str:
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return shown + (f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _first_line(exc: BaseException) -> str:
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
        raise CheckpointError(f"{label}: cannot read weights: truncated or not a safetensors file ({_first_line(exc)})") from None


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


# ---------------------------------------------------------------------------------------------- checkpoint manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> Iterator[str]:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            yield path.relative_to(directory).as_posix()


def _is_manifest(rel: str) -> bool:
    return "/" not in rel and rel.startswith(MANIFEST_PREFIX) and rel.endswith(".json")


def write_manifest(directory: str | Path, rank: int) -> Path:
    """Record the sha256 and size of every file in `directory` (what this rank's save wrote there); the last step of
    a save, so a checkpoint interrupted before it has no manifest and is refused on load."""
    directory = Path(directory)
    files = {rel: {"sha256": _sha256(directory / rel), "bytes": (directory / rel).stat().st_size}
             for rel in _files(directory) if not _is_manifest(rel)}
    path = directory / f"{MANIFEST_PREFIX}{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def verify_manifest(directory: str | Path) -> int:
    """Check every file of a checkpoint directory against the manifests its ranks wrote; returns the number of files
    checked. Ray's own bookkeeping files (hidden, at the top level) are the only files allowed to be unlisted."""
    directory = Path(directory)
    manifests = sorted(directory.glob(MANIFEST_GLOB))
    if not manifests:
        raise CheckpointError(f"{directory}: no {MANIFEST_PREFIX}<N>.json (not written by this ralign, or an interrupted "
                              "save); refusing to load files whose integrity cannot be checked")
    listed: dict[str, dict] = {}
    for manifest in manifests:
        data = read_json(manifest)
        files = data.get("files")
        if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values()):
            raise CheckpointError(f"{manifest}: not a checkpoint manifest (no 'files' with sha256 entries)")
        listed.update(files)
    for rel, entry in listed.items():
        path = directory / rel
        if ".." in Path(rel).parts or not path.is_file():
            raise CheckpointError(f"{directory / rel}: listed in the checkpoint manifest but missing")
        size = path.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the checkpoint manifest says {entry['bytes']} (truncated or replaced)")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: sha256 differs from the checkpoint manifest (modified after it was saved)")
    for rel in _files(directory):
        if rel in listed or _is_manifest(rel) or ("/" not in rel and rel.startswith(".")):
            continue
        raise CheckpointError(f"{directory / rel}: not in the checkpoint manifest (added after the checkpoint was saved)")
    return len(listed)


# ------------------------------------------------------------------------------------- DeepSpeed engine state (pickles)


def _allowed_classes() -> list:
    import importlib

    out = []
    for dotted in DEEPSPEED_PICKLE_CLASSES:
        module, _, name = dotted.rpartition(".")
        out.append(getattr(importlib.import_module(module), name))
    return out


@contextmanager
def weights_only_engine_loads(engine) -> Iterator[None]:
    """Inside this block the DeepSpeed engine's checkpoint engine reads its files with `torch.load(weights_only=True)`
    allowing only `DEEPSPEED_PICKLE_CLASSES`; a file asking for anything else is refused with a CheckpointError."""
    checkpoint_engine = engine.checkpoint_engine
    allowed = _allowed_classes()

    def load(path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's message spans many lines; the line naming the refused global is the useful one.
            lines = [ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
            reason = lines[0] if lines else _first_line(exc)
            raise CheckpointError(f"{path}: refused to unpickle: {reason}") from None
        except (RuntimeError, EOFError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read the DeepSpeed engine state ({_first_line(exc)})") from None

    checkpoint_engine.load = load  # an instance attribute shadows the class's unsafe method
    try:
        yield
    finally:
        del checkpoint_engine.load


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
        raise CheckpointError(f"{path}: cannot load {model_cls.__name__}: {_first_line(exc)}") from None
    if strict:
        for key, problem in (("missing_keys", "missing"), ("unexpected_keys", "not part of the model"),
                             ("mismatched_keys", "of another shape than the model's")):
            names = [k if isinstance(k, str) else k[0] for k in info.get(key) or ()]
            if names:
                raise CheckpointError(f"{path}: tensor(s) {_listing(names)} {problem} (a damaged file, or weights of another model)")
    return model.eval()
