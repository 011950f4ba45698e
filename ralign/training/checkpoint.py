"""Learner checkpoints that cannot run code or be silently swapped.

The one place a pickle cannot be avoided is DeepSpeed's engine state (optimiser moments, ZeRO partitions:
`engine/*.pt`, written with `torch.save`), which `Learner.load` reads back when a run resumes from its checkpoint in
the Ray storage path. DeepSpeed 0.19's `TorchCheckpointEngine.load` calls `torch.load(..., weights_only=False)`,
which would run any code a doctored file carries. Two guards, both applied by `Learner.load`:

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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ralign.models.weights import CheckpointError, first_line, read_json

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
            reason = lines[0] if lines else first_line(exc)
            raise CheckpointError(f"{path}: refused to unpickle: {reason}") from None
        except (RuntimeError, EOFError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read the DeepSpeed engine state ({first_line(exc)})") from None

    checkpoint_engine.load = load  # an instance attribute shadows the class's unsafe method
    try:
        yield
    finally:
        del checkpoint_engine.load


